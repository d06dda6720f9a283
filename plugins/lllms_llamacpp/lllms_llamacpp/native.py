"""Thin wrappers over llama.cpp's C API (through llama_cpp's ctypes bindings).

This module imports llama_cpp at its top, so only the engine's methods import it,
never the package itself.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from lllms_core.plugin_api import InvalidRequestError, ModelLoadError

log = logging.getLogger("lllms.llamacpp")

POOLING_NAMES = {1: "mean", 2: "cls", 3: "last"}


native_log = logging.getLogger("lllms.llamacpp.native")
# ggml's levels: 1 debug, 2 info, 3 warning, 4 error, 5 continuation of the previous line
# its warnings at load time are advice for llama.cpp developers: info, so a default log stays quiet
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_last_level = [logging.DEBUG]
_last_error = threading.local()
"""The last error llama.cpp logged on this thread: a failed call returns only NULL, the reason is in its log."""


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    python_level = _LOG_LEVELS.get(level, _last_level[0])
    _last_level[0] = python_level
    if level == 4:
        _last_error.message = text.decode("utf-8", "replace").strip()
    if native_log.isEnabledFor(python_level):
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            native_log.log(python_level, "%s", message)


def native_error_reason(call, *args):
    """Run a llama.cpp call; return its result and the error it logged meanwhile (empty if none),
    without the function name llama.cpp puts before its messages."""
    _last_error.message = ""
    result = call(*args)
    return result, re.sub(r"^\w+: ", "", _last_error.message)


def quiet_llama_logs() -> None:
    """Route llama.cpp's own log (every load detail, on stderr) to Python logging, where
    load details are debug messages."""
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_GGUF_INTEGERS = {0: ctypes.c_uint8, 1: ctypes.c_int8, 2: ctypes.c_uint16, 3: ctypes.c_int16, 4: ctypes.c_uint32,
                  5: ctypes.c_int32, 10: ctypes.c_uint64, 11: ctypes.c_int64}
_GGUF_ARRAY = 9


def _ggml_base():
    """ggml's own library, which llama_cpp loaded (it holds the GGUF reader)."""
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    name = next(n for n in sorted(os.listdir(folder)) if n.startswith(("libggml-base.", "ggml-base.")))
    lib = ctypes.CDLL(os.path.join(folder, name))
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    for function in ("gguf_get_kv_type", "gguf_get_arr_type"):
        getattr(lib, function).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, function).restype = ctypes.c_int
    lib.gguf_get_arr_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_n.restype = ctypes.c_size_t
    lib.gguf_get_arr_data.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_data.restype = ctypes.c_void_p
    lib.gguf_get_val_data.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_data.restype = ctypes.c_void_p
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    return lib


def gguf_facts(path: str) -> dict[str, int] | None:
    """What a GGUF file's header says about its size in memory, without loading it: the
    weights' bytes, the training context and the KV bytes per token (f16 keys and values);
    None when the header does not say."""
    lib = _ggml_base()
    context = lib.gguf_init_from_file(path.encode(), _GgufInitParams(True, None))
    if not context:
        return None
    try:
        def string(key: str) -> str | None:
            found = lib.gguf_find_key(context, key.encode())
            return lib.gguf_get_val_str(context, found).decode() if found >= 0 else None

        def integer(key: str) -> int | None:
            """A number, or the largest of an array of them (per-layer values)."""
            found = lib.gguf_find_key(context, key.encode())
            if found < 0:
                return None
            kind = lib.gguf_get_kv_type(context, found)
            if kind == _GGUF_ARRAY:
                element = _GGUF_INTEGERS.get(lib.gguf_get_arr_type(context, found))
                count = lib.gguf_get_arr_n(context, found)
                if element is None or not count:
                    return None
                return max((element * count).from_address(lib.gguf_get_arr_data(context, found)))
            element = _GGUF_INTEGERS.get(kind)
            return element.from_address(lib.gguf_get_val_data(context, found)).value if element else None

        architecture = string("general.architecture")
        if architecture is None:
            return None
        facts = {name: integer(f"{architecture}.{key}") for name, key in (
            ("n_layer", "block_count"), ("n_head", "attention.head_count"), ("n_head_kv", "attention.head_count_kv"),
            ("n_embd", "embedding_length"), ("key_length", "attention.key_length"),
            ("value_length", "attention.value_length"), ("n_ctx_train", "context_length"),
        )}  # fmt: skip
        tokens = lib.gguf_find_key(context, b"tokenizer.ggml.tokens")
        facts["n_vocab"] = lib.gguf_get_arr_n(context, tokens) if tokens >= 0 else 0
    finally:
        lib.gguf_free(context)
    if not (facts["n_layer"] and facts["n_embd"] and facts["n_head"]):
        return None
    head = facts["n_embd"] // facts["n_head"]
    per_layer = (facts["key_length"] or head) + (facts["value_length"] or head)
    return {
        "weights_bytes": os.path.getsize(path),
        "n_ctx_train": facts["n_ctx_train"] or 0,
        "n_vocab": facts["n_vocab"],
        "kv_bytes_per_token": 2 * facts["n_layer"] * per_layer * (facts["n_head_kv"] or facts["n_head"]),
    }


class Model:
    """A loaded GGUF model and its vocabulary (read-only, so usable from any thread)."""

    def __init__(self, path: str, *, gpu_layers: int, mmap: bool, mem_lock: bool):
        quiet_llama_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        self.gpu_layers = gpu_layers
        params.use_mmap = mmap
        params.use_mlock = mem_lock
        if not os.path.exists(path):
            raise ModelLoadError(f"model file {path!r} does not exist")
        self.pointer = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.pointer:
            raise ModelLoadError(f"llama.cpp could not load {path!r} (not a GGUF model it supports?)")
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(self.pointer)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.pointer)
        self.n_embd = llama_cpp.llama_model_n_embd(self.pointer)
        self.size_bytes = llama_cpp.llama_model_size(self.pointer)
        self.metadata = self._read_metadata()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.fim = tuple(
            getter(self.vocab)
            for getter in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf, llama_cpp.llama_vocab_fim_mid)
        )
        self.recurrent = bool(
            llama_cpp.llama_model_is_recurrent(self.pointer) or llama_cpp.llama_model_is_hybrid(self.pointer)
        )
        """A recurrent state cannot be cut back to a prefix, nor copied in part."""
        self._pieces: dict[int, bytes] = {}
        self._spellings: dict[int, bytes] = {}
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special_texts = frozenset(
            text
            for token in range(self.n_vocab)
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & special
            and (text := self.piece_text(token))
        )
        """Texts that tokenize to a special token when special tokens are parsed."""
        self._eog = np.array([bool(llama_cpp.llama_vocab_is_eog(self.vocab, t)) for t in range(self.n_vocab)])
        n_layer = llama_cpp.llama_model_n_layer(self.pointer)
        n_head = max(1, llama_cpp.llama_model_n_head(self.pointer))
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.pointer)
        # keys and values, f16, per layer: what one token of one sequence holds in the KV cache
        self.kv_bytes_per_token = 2 * 2 * n_layer * (self.n_embd // n_head) * n_head_kv

    def _read_metadata(self) -> dict[str, str]:
        values: dict[str, str] = {}
        size = 4096
        buffer = ctypes.create_string_buffer(size)
        for index in range(llama_cpp.llama_model_meta_count(self.pointer)):
            llama_cpp.llama_model_meta_key_by_index(self.pointer, index, buffer, size)
            key = buffer.value.decode("utf-8", "replace")
            if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "scores", "token_type", "merges")):
                continue
            needed = llama_cpp.llama_model_meta_val_str_by_index(self.pointer, index, buffer, size)
            if needed >= size:
                big = ctypes.create_string_buffer(needed + 1)
                llama_cpp.llama_model_meta_val_str_by_index(self.pointer, index, big, needed + 1)
                values[key] = big.value.decode("utf-8", "replace")
            else:
                values[key] = buffer.value.decode("utf-8", "replace")
        return values

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def pooling(self) -> str | None:
        value = self.metadata.get(f"{self.architecture}.pooling_type")
        return POOLING_NAMES.get(int(value)) if value and value.lstrip("-").isdigit() else None

    @property
    def ranks(self) -> bool:
        """Whether the GGUF is a reranker (pooling type rank: a classifier head scores a sequence)."""
        return self.metadata.get(f"{self.architecture}.pooling_type") == str(llama_cpp.LLAMA_POOLING_TYPE_RANK)

    @property
    def has_fim(self) -> bool:
        return all(token >= 0 for token in self.fim)

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens render as nothing)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._token_bytes(token, special=False)
        return piece

    def piece_text(self, token: int) -> str:
        """The text of a token, special tokens included (``<|im_start|>``...)."""
        return self._token_bytes(token, special=True).decode("utf-8", "replace")

    def spell(self, tokens: list[int]) -> bytes:
        """The bytes of tokens as a prompt spells them, special tokens included."""
        spellings = self._spellings
        for token in tokens:
            if token not in spellings:
                spellings[token] = self._token_bytes(token, special=True)
        return b"".join([spellings[token] for token in tokens])

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        count = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if count < 0:
            buffer = ctypes.create_string_buffer(-count)
            count = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -count, 0, special)
        return buffer.raw[: max(count, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(token) for token in tokens).decode("utf-8", "replace")

    def check_tokens(self, tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise InvalidRequestError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})", param=param)

    def close(self) -> None:
        if self.pointer:
            llama_cpp.llama_model_free(self.pointer)
            self.pointer = None


@dataclass
class ContextSettings:
    n_ctx: int
    n_seq: int
    n_batch: int
    n_ubatch: int
    threads: int
    flash_attention: bool | None = None
    embeddings: bool = False
    rank: bool = False
    """With ``embeddings``: rank pooling, the pooled output of a sequence is its reranker score(s)."""
    kv_unified: bool = True
    """One KV cache for all sequences (cells shared, prefixes copied without data); else
    one per sequence (each of ``n_ctx / n_seq`` cells, attention scans only its own)."""


class Context:
    """A llama context with its memory (KV cache) and one reusable batch."""

    def __init__(self, model: Model, settings: ContextSettings, lora: list[tuple[str, float]] = ()):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_ubatch
        params.n_seq_max = settings.n_seq
        params.n_threads = settings.threads
        params.n_threads_batch = settings.threads
        params.kv_unified = settings.kv_unified
        params.no_perf = True
        params.embeddings = settings.embeddings
        if settings.embeddings:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK if settings.rank else llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[settings.flash_attention]
        self.model = model
        self.settings = settings
        self.pointer = llama_cpp.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {settings.n_ctx} tokens for {model.path!r} (out of memory?)"
            )
        self.memory = llama_cpp.llama_get_memory(self.pointer)
        self.kv_bytes = llama_cpp.llama_n_ctx(self.pointer) * model.kv_bytes_per_token
        self.n_batch = llama_cpp.llama_n_batch(self.pointer)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.adapters = []
        for path, _ in lora:
            self.adapters.append(self._load_lora(path))
        if self.adapters:
            array = (llama_cpp.llama_adapter_lora_p_ctypes * len(self.adapters))(*self.adapters)
            scales = (ctypes.c_float * len(lora))(*(scale for _, scale in lora))
            llama_cpp.llama_set_adapters_lora(self.pointer, array, len(self.adapters), scales)

    def _load_lora(self, path: str):
        if not os.path.exists(path):
            self.close()
            raise ModelLoadError(f"LoRA adapter file {path!r} does not exist")
        adapter, reason = native_error_reason(llama_cpp.llama_adapter_lora_init, self.model.pointer, path.encode())
        if not adapter:
            self.close()
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path!r}: {reason or 'see its log'}")
        return adapter

    # --- batch ------------------------------------------------------------------

    def clear_batch(self) -> None:
        self.batch.n_tokens = 0

    def add(self, token: int, position: int, seq: int, logits: bool) -> int:
        """Add a token to the batch; returns its index (for sampling its logits)."""
        batch = self.batch
        index = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        return index

    def decode(self) -> int:
        return llama_cpp.llama_decode(self.pointer, self.batch)

    def logits(self, index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.pointer, index)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab,))

    def embeddings(self, index: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_embeddings_ith(self.pointer, index)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_embd,)).copy()

    # --- memory -----------------------------------------------------------------

    def remove(self, seq: int, start: int = 0) -> bool:
        """Drop the positions ``start..`` of a sequence; False when it cannot keep a part."""
        if not self.memory:
            return True
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1))

    def copy(self, source: int, target: int, length: int) -> None:
        """Make ``target`` hold the first ``length`` positions of ``source``."""
        if self.settings.kv_unified:  # the cells are shared: only their sequence sets change
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, length)
            return
        # across per-sequence caches llama.cpp copies only whole ones, every cell used or not; a
        # short sequence goes faster through its saved state. The tail is cut after.
        if not (self._copies_through_state(source) and self.restore_state(target, self.save_state(source))):
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, target, length, -1)

    def _copies_through_state(self, source: int) -> bool:
        """Whether a sequence is copied faster through its saved state than as a whole cache: in
        host RAM, when it uses under a quarter of its cells, its state kept under 256 MiB. For
        SmolLM2-135M's 4096 cells (`bench/kv_layout.py --prefix-copy`): the whole cache takes
        11-16 ms whatever it holds; the state of 300 tokens 1 ms, 1024 tokens 9 ms, 1536 tokens 34 ms."""
        held = llama_cpp.llama_memory_seq_pos_max(self.memory, source) + 1
        cells = self.settings.n_ctx // self.settings.n_seq
        return self.model.gpu_layers == 0 and 4 * held <= cells and held * self.model.kv_bytes_per_token <= 256 << 20

    # --- saved states -------------------------------------------------------------

    def save_state(self, seq: int) -> bytearray:
        """A copy of one sequence's memory (its KV cells with their positions), in host RAM."""
        size = llama_cpp.llama_state_seq_get_size_ext(self.pointer, seq, 0)
        data = bytearray(size)
        if size:
            written = llama_cpp.llama_state_seq_get_data_ext(
                self.pointer, (ctypes.c_uint8 * size).from_buffer(data), size, seq, 0
            )
            del data[written:]
        return data

    def restore_state(self, seq: int, data) -> bool:
        """Replace a sequence's memory with a saved one (from ``save_state`` of a context with
        the same model and settings); False when llama.cpp could not (no room, wrong layout)."""
        size = len(data)
        read, reason = native_error_reason(
            llama_cpp.llama_state_seq_set_data_ext, self.pointer, (ctypes.c_uint8 * size).from_buffer(data), size, seq, 0
        )
        if read != size:
            log.info("restoring a saved state into sequence %d failed: %s", seq, reason or "no reason given")
            self.remove(seq)
            return False
        return True

    def clear(self) -> None:
        if self.memory:
            llama_cpp.llama_memory_clear(self.memory, False)

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.pointer:
            llama_cpp.llama_free(self.pointer)
            self.pointer = None
        for adapter in self.adapters:  # after the context that used them
            llama_cpp.llama_adapter_lora_free(adapter)
        self.adapters = []


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_window: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    grammar: str | None = None


class Sampler:
    """A native llama.cpp sampler chain; freed by whoever ends the generation."""

    def __init__(self, model: Model, params: SamplingParams, seed: int):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.pointer = chain
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for slot, (token, bias) in enumerate(params.logit_bias.items()):
                biases[slot].token = token
                biases[slot].bias = bias
            add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(params.logit_bias), biases))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    model.n_vocab,
                    params.repeat_window,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, params.grammar.encode(), b"root")
            if not grammar:
                self.close()
                raise InvalidRequestError("the grammar is not valid GBNF (or has no `root` rule)", param="grammar")
            add(grammar)
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1:
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, context: Context, index: int) -> int:
        """Sample the token at batch ``index`` (llama.cpp also accepts it into the chain)."""
        return llama_cpp.llama_sampler_sample(self.pointer, context.pointer, index)

    def close(self) -> None:
        if self.pointer:
            llama_cpp.llama_sampler_free(self.pointer)
            self.pointer = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - math.log(float(np.exp(shifted).sum()))
