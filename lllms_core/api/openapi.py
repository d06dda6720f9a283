"""lllms' own OpenAPI 3.1 description, generated from its msgspec Structs.

Request bodies are the Structs the API decodes (:mod:`lllms_core.schemas`), so the
document says exactly what is validated. The responses are described by the small
Structs below, in the shapes OpenAI sends (and lllms with them).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from lllms_core.audio import MEDIA_TYPES
from lllms_core.schemas import (
    ChatCompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    FinishReason,
    ImageGenerationRequest,
    RerankRequest,
    SpeechRequest,
    TextCompletionRequest,
    TokenLogprob,
    TokenizeRequest,
    ToolCall,
    TranscriptionRequest,
)

REF = "#/components/schemas/{name}"
ALIAS_BASE = "/openai"
"""The OpenAI routes are also served under this prefix (``/openai/v1/...``)."""


# --- response shapes -------------------------------------------------------------


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int
    """Prompt tokens whose evaluation was reused from an earlier request."""


class CompletionUsage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None | UnsetType = UNSET


class ChatCompletionMessage(Struct, kw_only=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    """The model's thinking, apart from its answer (models that reason in `<think>` blocks)."""
    reasoning: str | UnsetType = UNSET
    """The same as `reasoning_content`, under the name other servers use."""


class ChatCompletionChoice(Struct, kw_only=True):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    system_fingerprint: str | None | UnsetType = UNSET


class FunctionCallDelta(Struct, kw_only=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallChunk(Struct, kw_only=True):
    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: FunctionCallDelta | UnsetType = UNSET


class ChoiceDelta(Struct, kw_only=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | None | UnsetType = UNSET
    tool_calls: list[ToolCallChunk] | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET


class ChatCompletionChunkChoice(Struct, kw_only=True):
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One event of a streamed chat completion; with `stream_options.include_usage` the last has the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    system_fingerprint: str | None | UnsetType = UNSET
    usage: CompletionUsage | None | UnsetType = UNSET


class TextLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TextCompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: FinishReason | None
    """Null in the chunks of a stream before the last one of a choice."""
    logprobs: TextLogprobs | None = None


class TextCompletion(Struct, kw_only=True):
    """A text completion, or (streamed) one server-sent event of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
    system_fingerprint: str | None | UnsetType = UNSET
    usage: CompletionUsage | None | UnsetType = UNSET


class Embedding(Struct, kw_only=True):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str
    """Floats, or base64 of little-endian float32s with ``encoding_format: base64``."""


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class VerboseSegment(Struct, kw_only=True):
    id: int
    seek: int
    start: float
    """Seconds from the start of the audio."""
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Word(Struct, kw_only=True):
    word: str
    start: float
    """Seconds from the start of the audio."""
    end: float


class DurationUsage(Struct, kw_only=True):
    type: Literal["duration"]
    seconds: float
    """The duration of the audio."""


class Transcription(Struct, kw_only=True):
    """`response_format` json; `verbose_json` adds task, language, duration and segments,
    and with `timestamp_granularities[]=word` the words. A translation's `language` is `english`."""

    text: str
    usage: DurationUsage | UnsetType = UNSET
    task: Literal["transcribe", "translate"] | UnsetType = UNSET
    language: str | UnsetType = UNSET
    duration: float | UnsetType = UNSET
    segments: list[VerboseSegment] | UnsetType = UNSET
    words: list[Word] | UnsetType = UNSET


class TranscriptTextDelta(Struct, kw_only=True, tag_field="type", tag="transcript.text.delta"):
    """More of the text (`stream: true`); the deltas joined are the text."""

    delta: str


class TranscriptTextDone(Struct, kw_only=True, tag_field="type", tag="transcript.text.done"):
    """The last event of a streamed transcription."""

    text: str


class SpeechAudioDelta(Struct, kw_only=True, tag_field="type", tag="speech.audio.delta"):
    """More of the audio (`stream_format: sse`), base64 of the bytes in `response_format`."""

    audio: str


class SpeechUsage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDone(Struct, kw_only=True, tag_field="type", tag="speech.audio.done"):
    """The last event of streamed speech."""

    usage: SpeechUsage


class GeneratedImage(Struct, kw_only=True):
    b64_json: str
    """The image, base64-encoded in `output_format`."""


class ImagesResponse(Struct, kw_only=True):
    created: int
    data: list[GeneratedImage]
    output_format: Literal["png", "jpeg", "webp"]


class Model(Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(Struct, kw_only=True):
    error: ErrorDetail


class DownloadStatus(Struct, kw_only=True):
    url: str
    file: str
    downloaded: int
    total: int | None
    percent: float | None
    speed: float
    """Bytes per second."""
    eta: float | None
    """Seconds left, if known."""


class ModelStatus(Struct, kw_only=True):
    engine: str
    task: str
    state: Literal["unprepared", "preparing", "ready", "error"]
    """How far preparing the model's files got (download, verification, conversion)."""
    error: str | None
    """Why preparing failed."""
    location: str | None
    """The model's file: its name, or its path with ``http.expose_paths``."""
    downloads: list[DownloadStatus]
    start_error: str | None = None
    """For a model the server must have ready at start: why its last load failed, while no
    instance of it is ready (the server is then not ready)."""


class Progress(Struct, kw_only=True):
    done: int
    total: int | None
    unit: str
    """What is counted: `steps` of an image generation."""


class SlotStatus(Struct, kw_only=True):
    index: int
    busy: bool
    context: str | None
    """A hash naming the context the slot holds (never its text)."""
    context_depth: int
    progress: Progress | None = None
    """How far the slot's task has come, for engines that report it (image generation)."""


class InstanceStatus(Struct, kw_only=True):
    id: str
    model: str
    engine: str
    state: Literal["loading", "idle", "busy", "disposing"]
    device: str
    created: str | None
    last_used: str | None
    slots: list[SlotStatus]
    info: dict[str, Any]


class Health(Struct, kw_only=True):
    status: Literal["ok", "loading", "starting", "failed"]
    """`loading`: models that must be ready at start are still loading; `starting`: the pool is
    not up yet; `failed`: loading or preparing one of them failed (`errors` says why; loads are retried)."""
    errors: dict[str, str] | UnsetType = UNSET
    """With `failed`: the error of each model that failed, by model id."""


class ServerStatus(Struct, kw_only=True):
    ready: bool
    processing: int
    queued: int
    concurrency: int | None
    models: dict[str, ModelStatus]
    instances: list[InstanceStatus]


# --- the document -----------------------------------------------------------------

ERRORS = {
    "400": "The request is invalid; `error.param` names the field.",
    "401": "An API key is configured and the request did not send it as a Bearer token.",
    "404": "The model does not exist.",
    "413": "The request body is larger than the server accepts.",
    "429": "Too many requests are waiting; retry after `Retry-After` seconds.",
    "500": "The engine failed.",
    "503": "The model could not be loaded, or the server is shutting down.",
    "504": "The request took longer than the configured request timeout.",
}


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": REF.format(name=kind.__name__)}


def _json(kind: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(kind)}}}


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def _streamed(kind: type, chunk: type, what: str) -> dict[str, Any]:
    return {
        "description": f"The {what}; with `stream: true`, server-sent events each carrying a "
        f"`{chunk.__name__}` as `data`, ending with `data: [DONE]`.",
        "content": {
            "application/json": {"schema": _ref(kind)},
            "text/event-stream": {"schema": {"type": "string"}, "x-event-schema": _ref(chunk)},
        },
    }


def _post(operation_id: str, summary: str, body: dict[str, Any], ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["OpenAI"],
            "requestBody": {"required": True, "content": body},
            "responses": {"200": ok, **_errors("400", "401", "404", "413", "429", "500", "503", "504")},
        }
    }


def _without_internal_fields(components: dict[str, Any]) -> None:
    """Drop the Struct fields the API fills itself rather than reading them from the body."""
    for name in ("ChatCompletionRequest", "TextCompletionRequest"):
        components[name]["properties"].pop("plugin_parameters", None)
    for name in ("image", "mask", "strength"):  # edits only: see the multipart form
        components["ImageGenerationRequest"]["properties"].pop(name, None)


def _edit_form(components: dict[str, Any]) -> dict[str, Any]:
    """The multipart form of an image edit: the generation's fields as form fields, the
    image(s) and the mask as uploaded files."""
    fields = copy.deepcopy(components["ImageGenerationRequest"])
    upload = {"type": "string", "contentMediaType": "application/octet-stream"}
    properties = {
        "image": {
            "oneOf": [upload, {"type": "array", "items": upload}],
            "description": "The image to edit (PNG, JPEG, WebP, GIF or BMP); also sent as `image[]`. "
            "The first image is edited.",
        },
        "mask": {**upload, "description": "Optional: transparent pixels mark where to paint; the image's size."},
        "strength": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 1,
            "description": "Extension: how much of the image is replaced (1: all of it); default: the model's.",
        },
        **fields["properties"],
    }  # fmt: skip
    return {"type": "object", "properties": properties, "required": ["image", *fields.get("required", [])]}

def _transcription_form(components: dict[str, Any]) -> dict[str, Any]:
    """The multipart form of a transcription or translation request: the Struct's fields,
    with the audio as an uploaded ``file`` rather than the bytes the API decodes it into,
    and without ``task``, which the route sets."""
    fields = copy.deepcopy(components.pop(TranscriptionRequest.__name__))
    properties = {
        "file": {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "The audio file: any format FFmpeg reads (wav, mp3, flac, ogg, opus, webm, m4a...).",
        },
        **{name: value for name, value in fields["properties"].items() if name not in ("audio", "filename", "task")},
    }
    return {"type": "object", "properties": properties, "required": ["file", *fields.get("required", [])]}


def _events(name: str, *kinds: type) -> dict[str, Any]:
    """A component that is one of several server-sent event bodies."""
    return {name: {"oneOf": [_ref(kind) for kind in kinds]}}


def _transcription_route(operation_id: str, summary: str, form: dict[str, Any]) -> dict[str, Any]:
    return _post(
        operation_id,
        summary,
        {"multipart/form-data": {"schema": form}},
        {
            "description": "The text: JSON for `json` and `verbose_json`, plain text for `text`, "
            "`srt` and `vtt`; with `stream: true`, server-sent events `transcript.text.delta`, "
            "then `transcript.text.done`.",
            "content": {
                "application/json": {"schema": _ref(Transcription)},
                "text/plain": {"schema": {"type": "string"}},
                "text/vtt": {"schema": {"type": "string"}},
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "x-event-schema": {"$ref": REF.format(name="TranscriptionStreamEvent")},
                },
            },
        },
    )


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of lllms' HTTP API (built once; do not modify it)."""
    from importlib.metadata import version

    response_kinds = (ChatCompletion, ChatCompletionChunk, TextCompletion, EmbeddingList, Transcription,
                      TranscriptTextDelta, TranscriptTextDone, SpeechAudioDelta, SpeechAudioDone,
                      ModelList, Model, Error, ServerStatus, Health)
    response_kinds += (ImagesResponse,)
    request_kinds = (ChatCompletionRequest, TextCompletionRequest, EmbeddingRequest, TranscriptionRequest,
                     ImageGenerationRequest, SpeechRequest)
    from lllms_core.api import anthropic, ollama, responses

    other_requests = (anthropic.MessagesRequest, anthropic.CountTokensRequest, responses.CreateResponse,
                      ollama.ChatBody, ollama.GenerateBody, ollama.EmbedBody, ollama.ModelBody,
                      RerankRequest, TokenizeRequest, DetokenizeRequest)  # fmt: skip
    _, components = msgspec.json.schema_components(request_kinds + response_kinds + other_requests, ref_template=REF)
    _without_internal_fields(components)
    transcription_form = _transcription_form(components)
    edit_form = _edit_form(components)
    components.update(_events("TranscriptionStreamEvent", TranscriptTextDelta, TranscriptTextDone))
    components.update(_events("SpeechStreamEvent", SpeechAudioDelta, SpeechAudioDone))
    audio = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}

    alias = {"servers": [{"url": "/"}, {"url": ALIAS_BASE, "description": "The same routes under /openai"}]}
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            **alias,
            **_post(
                "createChatCompletion",
                "Answer a conversation",
                {"application/json": {"schema": _ref(ChatCompletionRequest)}},
                _streamed(ChatCompletion, ChatCompletionChunk, "chat completion"),
            ),
        },
        "/v1/completions": {
            **alias,
            **_post(
                "createCompletion",
                "Continue a prompt",
                {"application/json": {"schema": _ref(TextCompletionRequest)}},
                _streamed(TextCompletion, TextCompletion, "text completion"),
            ),
        },
        "/v1/embeddings": {
            **alias,
            **_post(
                "createEmbedding",
                "Embed texts",
                {"application/json": {"schema": _ref(EmbeddingRequest)}},
                _json(EmbeddingList, "One embedding per input, in input order."),
            ),
        },
        "/v1/audio/transcriptions": {
            **alias,
            **_transcription_route("createTranscription", "Transcribe audio", transcription_form),
        },
        "/v1/audio/translations": {
            **alias,
            **_transcription_route("createTranslation", "Translate speech into English text", transcription_form),
        },
        "/v1/audio/speech": {
            **alias,
            **_post(
                "createSpeech",
                "Speak a text",
                {"application/json": {"schema": _ref(SpeechRequest)}},
                {
                    "description": "The audio in `response_format`, sent as it is synthesized (`pcm`: "
                    "16-bit little-endian mono at 24 kHz); with `stream_format: sse`, server-sent events "
                    "`speech.audio.delta`, then `speech.audio.done`.",
                    "content": {
                        **{media_type: audio for media_type in dict.fromkeys(MEDIA_TYPES.values())},
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-event-schema": {"$ref": REF.format(name="SpeechStreamEvent")},
                        },
                    },
                },
            ),
        },
        "/v1/images/generations": {
            **alias,
            **_post(
                "createImage",
                "Generate images from a prompt",
                {"application/json": {"schema": _ref(ImageGenerationRequest)}},
                _json(ImagesResponse, "The images, as base64 (`response_format: url` is refused: lllms keeps no files)."),
            ),
        },
        "/v1/images/edits": {
            **alias,
            **_post(
                "createImageEdit",
                "Edit an image (where a mask is transparent, or all of it) following a prompt",
                {"multipart/form-data": {"schema": edit_form}},
                _json(ImagesResponse, "The edited images, as base64."),
            ),
        },
        "/v1/models": {
            **alias,
            "get": {
                "operationId": "listModels",
                "summary": "The configured models",
                "tags": ["OpenAI"],
                "responses": {"200": _json(ModelList, "Every configured model."), **_errors("401")},
            },
        },
        "/v1/models/{model}": {
            **alias,
            "get": {
                "operationId": "retrieveModel",
                "summary": "One configured model",
                "tags": ["OpenAI"],
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(Model, "The model."), **_errors("401", "404")},
            },
        },
        "/": {
            "get": {
                "operationId": "getStatus",
                "summary": "The server's state: models, downloads, instances and their slots, queue",
                "tags": ["lllms"],
                "responses": {"200": _json(ServerStatus, "The status report."), **_errors("401", "503")},
            }
        },
        "/health": {
            "get": {
                "operationId": "getHealth",
                "summary": "Whether the server is ready (for load balancers and orchestrators)",
                "tags": ["lllms"],
                "security": [],
                "responses": {
                    "200": _json(Health, "Ready: the models that must be loaded at start are."),
                    "503": _json(Health, "Not ready: the server is starting or loading models, or a model it must start with failed."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics",
                "tags": ["lllms"],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors("401"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenapi",
                "summary": "This document",
                "tags": ["lllms"],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 description of this API.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("401"),
                },
            }
        },
    }
    paths.update(other_api_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lllms",
            "version": version("lllms"),
            "summary": "Local LLM inference server with an OpenAI-compatible API",
            "description": "The OpenAI routes (`/v1/...`) are also served under `/openai/v1/...`. "
            "When API keys are configured, every route except `/health` requires one as a Bearer token.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "OpenAI", "description": "Routes compatible with OpenAI's API and clients."},
            {"name": "Anthropic", "description": "Anthropic's Messages API; errors in Anthropic's shape."},
            {"name": "Ollama", "description": "Ollama's API; NDJSON streams, errors as `{\"error\": ...}`."},
            {"name": "Rerank and tokenize", "description": "Reranking (Jina/Cohere shapes) and llama-server's tokenizer routes."},
            {"name": "lllms", "description": "The server's own routes."},
        ],
        "security": [{}, {"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {
                f"Error{status}": _json(Error, description) for status, description in ERRORS.items()
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(method: str, operation_id: str, summary: str, tag: str, ok: str, body: type | None = None,
               media: str = "application/json", parameters: tuple[str, ...] = ()) -> dict[str, Any]:
    """An operation of the other APIs: its request body is the Struct the route decodes."""
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "responses": {
            "200": {"description": ok, "content": {media: {"schema": {"type": "object"}}}},
            "4XX": {"description": "Bad input, an unknown model or route, a missing key: the API's own error shape."},
            "5XX": {"description": "The engine failed, or the model could not be loaded."},
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if parameters:
        operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in parameters]
    return {method: operation}


def other_api_paths() -> dict[str, Any]:
    from lllms_core.api import anthropic, ollama, responses

    stream = "application/json (or server-sent events with `stream: true`)"
    ndjson = "One JSON body with `stream: false`; else NDJSON lines (`application/x-ndjson`)."
    return {
        "/v1/messages": _operation("post", "createMessage", "Anthropic Messages", "Anthropic",
                                   f"A message, {stream} in Anthropic's event order.", anthropic.MessagesRequest),
        "/v1/messages/count_tokens": _operation("post", "countMessageTokens", "Count a Messages request's input tokens",
                                                "Anthropic", "`{\"input_tokens\": n}`", anthropic.CountTokensRequest),
        "/v1/responses": _operation("post", "createResponse", "OpenAI Responses", "OpenAI",
                                    f"A response, {stream} with the semantic events.", responses.CreateResponse),
        "/v1/responses/{response_id}": {
            **_operation("get", "getResponse", "A stored response", "OpenAI", "The response.", parameters=("response_id",)),
            **_operation("delete", "deleteResponse", "Delete a stored response", "OpenAI", "`{id, object: response.deleted, deleted: true}`",
                         parameters=("response_id",)),
        },
        "/v1/responses/{response_id}/input_items": _operation(
            "get", "listInputItems", "A stored response's input items (`limit`, `order`, `after`)", "OpenAI",
            "A list of items.", parameters=("response_id",)),
        "/api/chat": _operation("post", "ollamaChat", "Ollama chat", "Ollama", ndjson, ollama.ChatBody),
        "/api/generate": _operation("post", "ollamaGenerate", "Ollama generate (an empty prompt loads or unloads)", "Ollama", ndjson, ollama.GenerateBody),
        "/api/embed": _operation("post", "ollamaEmbed", "Ollama embeddings", "Ollama", "`{model, embeddings}`", ollama.EmbedBody),
        "/api/tags": _operation("get", "ollamaTags", "The configured models", "Ollama", "`{models: [...]}`"),
        "/api/show": _operation("post", "ollamaShow", "One model's details and capabilities", "Ollama", "The model.", ollama.ModelBody),
        "/api/ps": _operation("get", "ollamaPs", "Loaded instances and when they expire", "Ollama", "`{models: [...]}`"),
        "/api/version": _operation("get", "ollamaVersion", "lllms' version", "Ollama", "`{version}`"),
        "/api/pull": _operation("post", "ollamaPull", "Download and verify a configured model", "Ollama",
                                "Progress lines (`status`, `total`, `completed`), then `{\"status\": \"success\"}`.", ollama.ModelBody),
        "/v1/rerank": _operation("post", "rerank", "Rerank documents for a query (also at /rerank)", "Rerank and tokenize",
                                 "`{id, model, results: [{index, relevance_score, document}], usage}`", RerankRequest),
        "/rerank": _operation("post", "rerankAlias", "The same as /v1/rerank", "Rerank and tokenize", "As /v1/rerank.", RerankRequest),
        "/tokenize": _operation("post", "tokenize", "Token ids (and pieces) of a text or a chat", "Rerank and tokenize",
                                "`{model, tokens, count}`", TokenizeRequest),
        "/detokenize": _operation("post", "detokenize", "The text of token ids", "Rerank and tokenize", "`{model, content}`", DetokenizeRequest),
    }
