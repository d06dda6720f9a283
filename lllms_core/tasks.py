"""The task registry's built-in tasks: request Struct, engine method, optional features."""

from __future__ import annotations

from typing import Any, Callable

import msgspec

from lllms_core.hookspecs import hookimpl
from lllms_core.images import chat_image_sources, is_image_data_url
from lllms_core.schemas import (
    ChatCompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
    ImageToTextRequest,
    RerankRequest,
    SpeechRequest,
    TextCompletionRequest,
    TokenizeRequest,
    TranscriptionRequest,
)


class Feature(msgspec.Struct, frozen=True):
    """An optional part of a task an engine may or may not implement.

    ``requested(request)`` tells whether a request asks for it; ``param`` is the field
    named in the error when the engine cannot do it.
    """

    name: str
    param: str
    requested: Callable[[Any], bool]


class Task(msgspec.Struct, frozen=True):
    name: str
    request: type
    method: str
    """Name of the Engine method that runs it."""
    features: tuple[Feature, ...] = ()
    streams: bool = False
    images: Callable[[Any], list[tuple[Any, str]]] | None = None
    """Where a request's images are: (source, param) pairs the core fetches and decodes
    before the request takes a slot (see :mod:`lllms_core.images`)."""


def _embedding_images(request: EmbeddingRequest) -> list[tuple[Any, str]]:
    return [(item, f"input[{index}]") for index, item in enumerate(request.inputs) if is_image_data_url(item)]


def _edit_images(request: ImageGenerationRequest) -> list[tuple[Any, str]]:
    found: list[tuple[Any, str]] = [(image, "image") for image in request.image]
    if request.mask is not None:
        found.append((request.mask, "mask"))
    return found


def _response_format(kind: str) -> Callable[[Any], bool]:
    # the tag ("type") of a tagged Struct is not an attribute; it is in the class's config
    return lambda request: (
        request.response_format is not None and type(request.response_format).__struct_config__.tag == kind
    )


COMPLETION_FEATURES = (
    Feature("n", "n", lambda r: r.choices > 1),
)
CHAT_FEATURES = COMPLETION_FEATURES + (
    Feature("logprobs", "logprobs", lambda r: bool(r.logprobs) or bool(r.top_logprobs)),
    Feature("json_object", "response_format", _response_format("json_object")),
    Feature("json_schema", "response_format", _response_format("json_schema")),
    Feature("tools", "tools", lambda r: bool(r.tools) and r.tool_choice != "none"),
    Feature("reasoning_budget", "reasoning_effort", lambda r: r.thinking_budget is not None),
    Feature("vision", "messages", lambda r: bool(chat_image_sources(r))),
)
TEXT_FEATURES = COMPLETION_FEATURES + (
    Feature("logprobs", "logprobs", lambda r: r.logprobs is not None),
    Feature("echo", "echo", lambda r: bool(r.echo)),
    Feature("suffix", "suffix", lambda r: bool(r.suffix)),
    Feature("best_of", "best_of", lambda r: (r.best_of or 1) > r.choices),
    Feature("token_prompt", "prompt", lambda r: any(not isinstance(p, str) for p in r.prompts)),
)
EMBEDDING_FEATURES = (
    Feature("token_input", "input", lambda r: any(not isinstance(i, str) for i in r.inputs)),
    Feature("pooling", "pooling", lambda r: r.pooling is not None),
    Feature("image_embeddings", "input", lambda r: any(is_image_data_url(i) for i in r.inputs)),
)
IMAGE_GENERATION_FEATURES = (
    Feature("image_edit", "image", lambda r: bool(r.image)),
    Feature("mask", "mask", lambda r: r.mask is not None),
    Feature("negative_prompt", "negative_prompt", lambda r: bool(r.negative_prompt)),
)

TRANSCRIPTION_FEATURES = (
    Feature("translate", "task", lambda r: r.task == "translate"),
    Feature("word_timestamps", "timestamp_granularities", lambda r: r.word_timestamps),
    Feature("vad_filter", "vad_filter", lambda r: bool(r.vad_filter)),
)
SPEECH_FEATURES = (
    Feature("instructions", "instructions", lambda r: bool(r.instructions)),
)

BUILTIN_TASKS = (
    Task("chat-completion", ChatCompletionRequest, "chat_completion", CHAT_FEATURES, streams=True, images=chat_image_sources),
    Task("text-completion", TextCompletionRequest, "text_completion", TEXT_FEATURES, streams=True),
    Task("embedding", EmbeddingRequest, "embedding", EMBEDDING_FEATURES, images=_embedding_images),
    Task("speech-to-text", TranscriptionRequest, "speech_to_text", TRANSCRIPTION_FEATURES, streams=True),
    Task("text-to-speech", SpeechRequest, "text_to_speech", SPEECH_FEATURES, streams=True),
    Task("image-to-text", ImageToTextRequest, "image_to_text", images=lambda r: [(r.image, "image")]),
    Task("image-generation", ImageGenerationRequest, "image_generation", IMAGE_GENERATION_FEATURES, images=_edit_images),
    Task("rerank", RerankRequest, "rerank"),
    Task("tokenize", TokenizeRequest, "tokenize"),
    Task("detokenize", DetokenizeRequest, "detokenize"),
)

# A chat model also answers text completions (raw prompts, no template); an embedding
# model also reranks (the core scores documents by cosine similarity); a captioning model
# answers chat (an image part and an optional prompt).
SERVED_TASKS = {
    "chat-completion": ("chat-completion", "text-completion"),
    "embedding": ("embedding", "rerank"),
    "image-to-text": ("image-to-text", "chat-completion"),
}
ANY_MODEL_TASKS = ("tokenize", "detokenize")
"""Tasks every model answers whose engine implements them."""


def tasks_served(model_task: str) -> tuple[str, ...]:
    """The task names a model configured for ``model_task`` answers."""
    return SERVED_TASKS.get(model_task, (model_task,)) + ANY_MODEL_TASKS


@hookimpl
def register_tasks(register):
    for task in BUILTIN_TASKS:
        register(task)
