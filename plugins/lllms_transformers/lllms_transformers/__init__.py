"""The ``transformers`` engine: Hugging Face transformers models on PyTorch.

- chat-completion / text-completion: causal language models with a chat template
  (a GGUF file is converted once to safetensors in the cache);
- embedding: sentence-transformers style models (pooling and normalisation read
  from ``modules.json`` and ``1_Pooling/config.json``);
- speech-to-text: Whisper-family models, long audio in chunks of at most 30 s;
- embedding of texts and images in one space: CLIP-style models (SigLIP...);
- image-to-text: captioning and OCR (BLIP, Florence-2, TrOCR...), also through chat.

torch and transformers are imported when a model is prepared or loaded, never
when this module is imported.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import msgspec
import trio

from lllms_core.plugin_api import (
    DetokenizeResult,
    Device,
    Engine,
    EngineInstance,
    InvalidRequestError,
    ModelLoadError,
    TokenizeResult,
    hookimpl,
    import_module,
)


RUNTIME_BYTES = 300 * 1024 * 1024
"""What importing torch and transformers adds to a process (measured: about 230 MiB for
torch 2.13 and transformers 5 on Linux, more once a model's modules are imported)."""


class TransformersOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of a ``transformers`` model (flat in its table)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights' dtype; ``auto``: float32 on the CPU, the model's own dtype on CUDA."""
    gguf_file: str | None = None
    """The GGUF file inside a model directory, when ``location`` is a directory holding several."""
    pooling: Literal["mean", "cls", "last"] | None = None
    """Embedding pooling when a request names none; default: the model's ``1_Pooling`` config, else mean."""
    normalize: bool | None = None
    """Scale embeddings to unit length; default: as the model's ``Normalize`` module says, else yes."""
    max_chunk_tokens: int | None = None
    """Speech: the most tokens generated per 30 s chunk; default: what the model allows."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with the model."""
    chat_template: str | None = None
    """A Jinja chat template replacing the model's own."""
    caption_prompt: str | None = None
    """Image to text: the prompt when a request gives none (Florence-2: a task token such as
    ``<OCR>``; default ``<MORE_DETAILED_CAPTION>`` for Florence-2, none for others)."""


class TransformersInstance(EngineInstance):
    """One loaded model (``loaded``: a text generator, embedder or transcriber) with one slot."""

    def info(self) -> dict:
        return self.loaded.info() if self.loaded is not None else {}


class TransformersEngine(Engine):
    name = "transformers"
    tasks = frozenset({"chat-completion", "text-completion", "embedding", "speech-to-text", "rerank", "image-to-text"})
    default_task = "chat-completion"
    options = TransformersOptions
    capabilities = frozenset(
        {
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty",
            "logit_bias", "seed", "grammar",
            "n", "logprobs", "json_object", "json_schema", "tools", "echo", "token_prompt",
            "token_input", "pooling", "vision", "image_embeddings", "translate", "reasoning_budget",
        }
    )  # fmt: skip
    logits_processors = True

    async def prepare_model(self, model, location: Path | None):
        if location is None:
            raise ModelLoadError(f"model {model.id!r}: the transformers engine needs a model file or directory")
        from lllms_transformers import loading

        return await trio.to_thread.run_sync(loading.prepare, model, Path(location), self._cache_dir())

    def _cache_dir(self) -> Path:
        if self.store is not None:
            return Path(self.store.cache_dir)
        from lllms_core.plugin_api import default_cache_dir

        return default_cache_dir()

    def memory_estimate(self, model, location, device):
        """The model's files, plus torch and transformers themselves the first time."""
        estimate = super().memory_estimate(model, location, device) or 0
        return estimate + (0 if "torch" in sys.modules else RUNTIME_BYTES)

    async def create_instance(self, model, prepared, device: Device) -> TransformersInstance:
        from lllms_transformers import loading

        loaded = await trio.to_thread.run_sync(loading.load, model, prepared, device)
        template = getattr(loaded, "template", None)
        return TransformersInstance(slots=1, limiter=trio.CapacityLimiter(1), loaded=loaded,
                                    memory_bytes=loading.host_bytes(loaded.model),
                                    chat_template=template.source if template is not None else None)

    async def save_states(self, instance: EngineInstance, cache, keys) -> None:
        SlotState = (await import_module("lllms_transformers.generation")).SlotState
        save_slot = (await import_module("lllms_transformers.states")).save_slot

        def save() -> None:
            for state, key in zip(instance.slot_states, keys):
                if isinstance(state, SlotState):
                    save_slot(state, cache, key)

        await trio.to_thread.run_sync(save, limiter=instance.limiter)

    async def dispose_instance(self, instance: EngineInstance) -> None:
        loaded = instance.loaded
        instance.loaded = None
        instance.slot_states = [None] * instance.slots
        await trio.to_thread.run_sync(loaded.close)

    def check_request(self, model, request):
        """Parse the request's grammar before it is queued (a 400, also for a streamed request)."""
        from lllms_core.plugin_api import checked_grammar

        from lllms_transformers.structured import check_grammar

        return checked_grammar(request, check_grammar) if model.task in ("chat-completion", "text-completion") else None

    async def preload(self, context):
        if context.model.task in ("chat-completion", "text-completion"):
            generation = await import_module("lllms_transformers.generation")
            await generation.preload(context)

    async def chat_completion(self, context, request, sink):
        generation = await import_module("lllms_transformers.generation")
        vision = await import_module("lllms_transformers.vision")
        if isinstance(context.instance.loaded, vision.Captioner):
            return await vision.caption_chat(self, context, request, sink)
        return await generation.chat_completion(self, context, request, sink)

    async def text_completion(self, context, request, sink):
        generation = await import_module("lllms_transformers.generation")
        return await generation.text_completion(self, context, request, sink)

    async def embedding(self, context, request):
        loaded = context.instance.loaded
        return await trio.to_thread.run_sync(loaded.embed, request, context.images, limiter=context.instance.limiter)

    async def image_to_text(self, context, request):
        loaded = context.instance.loaded
        return await trio.to_thread.run_sync(loaded.image_to_text, request, context.images, limiter=context.instance.limiter)

    async def rerank(self, context, request):
        loaded = context.instance.loaded
        return await trio.to_thread.run_sync(loaded.rerank, request, limiter=context.instance.limiter)

    async def tokenize(self, context, request):
        return await trio.to_thread.run_sync(_tokenize, context.instance.loaded, request, limiter=context.instance.limiter)

    async def detokenize(self, context, request):
        tokenizer = _tokenizer(context.instance.loaded)
        content = await trio.to_thread.run_sync(tokenizer.decode, request.tokens, limiter=context.instance.limiter)
        return DetokenizeResult(content=content)

    async def speech_to_text(self, context, request):
        loaded = context.instance.loaded
        return await trio.to_thread.run_sync(loaded.transcribe, context.audio, request, limiter=context.instance.limiter)


def _tokenizer(loaded):
    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
        raise InvalidRequestError("this model has no text tokenizer", param="model")
    return tokenizer


def _tokenize(loaded, request) -> TokenizeResult:
    tokenizer = _tokenizer(loaded)
    if request.messages is not None:
        template = getattr(loaded, "template", None)
        if template is None:
            raise InvalidRequestError("this model has no chat template", param="messages")
        from lllms_core.plugin_api import tool_setup

        tokens = loaded.tokenize_rendered(template.prompt(request.messages, tool_setup(request, template.tool_format)))
    else:
        tokens = tokenizer.encode(request.content, add_special_tokens=request.add_special)
    tokens = [int(token) for token in tokens]
    pieces = [tokenizer.decode([token]) for token in tokens] if request.with_pieces else None
    return TokenizeResult(tokens=tokens, pieces=pieces)


@hookimpl
def register_engines(register):
    register(TransformersEngine)
