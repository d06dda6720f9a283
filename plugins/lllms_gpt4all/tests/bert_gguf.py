"""Write a sentence-transformers BERT model (safetensors + vocab.txt) as a BERT GGUF that
the llama.cpp inside gpt4all 2.8.2 loads as an embedding model.

What that loader expects (llama.cpp, mid 2024): architecture ``bert``; hyper-parameters
under ``bert.*`` with ``attention.causal = false`` and the sentence-transformers
pooling as ``pooling_type``; a WordPiece vocabulary (``tokenizer.ggml.model = "bert"``)
written in "phantom space" form (a word-initial piece gets a leading U+2581, a ``##``
continuation loses its ``##``, ``[SPECIAL]`` tokens stay); ``[CLS]``/``[SEP]`` ids
(the tokenizer adds them); tensors under llama.cpp's BERT names, with 1-D tensors,
position and token-type embeddings in F32 and the other matrices in F16.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# that llama.cpp reads [CLS] from tokenizer.ggml.cls_token_id, a key newer gguf packages dropped
SPECIAL_TOKEN_KEYS = {
    "[UNK]": (gguf.Keys.Tokenizer.UNK_ID,),
    "[SEP]": (gguf.Keys.Tokenizer.SEP_ID, gguf.Keys.Tokenizer.EOS_ID),
    "[PAD]": (gguf.Keys.Tokenizer.PAD_ID,),
    "[CLS]": ("tokenizer.ggml.cls_token_id", gguf.Keys.Tokenizer.BOS_ID),
    "[MASK]": (gguf.Keys.Tokenizer.MASK_ID,),
}


def phantom_space(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert_bert(model_dir: Path, out: Path, name: str) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if pooling["pooling_mode_mean_tokens"]:
        pooling_type = gguf.PoolingType.MEAN
    elif pooling["pooling_mode_cls_token"]:
        pooling_type = gguf.PoolingType.CLS
    else:
        raise ValueError("only mean and CLS pooling exist in llama.cpp's BERT")
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    blocks = config["num_hidden_layers"]

    writer = gguf.GGUFWriter(out, "bert")
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(blocks)
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("bert")
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    writer.add_token_list([phantom_space(token) for token in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in SPECIAL_TOKEN_KEYS else gguf.TokenType.NORMAL for token in vocab]
    )
    for token, keys in SPECIAL_TOKEN_KEYS.items():
        for key in keys:
            writer.add_uint32(key, vocab.index(token))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
    keep_f32 = ("position_embd.weight", "token_types.weight")
    for hf_name, data in load_file(model_dir / "model.safetensors").items():
        if hf_name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no llama.cpp BERT name for tensor {hf_name!r}")
        if data.ndim == 2 and gguf_name not in keep_f32:
            data = data.astype(np.float16)
        else:
            data = data.astype(np.float32)
        writer.add_tensor(gguf_name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
