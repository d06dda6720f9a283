"""The plugin API: everything an engine, task or sampler plugin may use from lllms.

A plugin imports from this module only, never from the modules behind it, so that lllms
can move code around without breaking plugins::

    from lllms_core.plugin_api import Engine, EngineInstance, CompletionChunk, hookimpl

What ``__all__`` lists is the contract (documented in docs/plugins.md). It grows only by
addition: names are never removed or changed within a major version of
:data:`API_VERSION`, and engine methods never change their signatures — what an engine
gets with a task grows by new fields of :class:`TaskContext`, and new tasks come as new
optional ``Engine`` methods. Request and result Structs only gain fields.

Versions: lllms 0.x offers plugin API 1. ``API_VERSION`` is ``(major, minor)``; the minor
number counts additions. A plugin pins the lllms releases it works with in its
``pyproject.toml``: ``"lllms>=0.1,<1"`` (from the first release with the names it uses,
below the next major release).
"""

from __future__ import annotations

from msgspec import UNSET

from lllms_core.audio import DecodedAudio
from lllms_core.config import ChatMessageConfig, DeviceConfig, ModelConfig, default_cache_dir
from lllms_core.context import common_prefix
from lllms_core.engine import (
    ChunkSink,
    Device,
    Engine,
    EngineInstance,
    NoOptions,
    StopStringFilter,
    TaskContext,
    check_token_ids,
    normalize_embedding,
)
from lllms_core.errors import (
    ChecksumMismatchError,
    ContextLengthExceededError,
    DownloadError,
    EngineError,
    InvalidRequestError,
    LllmsError,
    ModelLoadError,
    NotFoundError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UnsupportedParameterError,
)
from lllms_core.hookspecs import hookimpl
from lllms_core.images import Image, RequestImages, chat_image_sources, describe_images, is_image_data_url
from lllms_core.reasoning import ThinkingBudget, ThinkSyntax, think_syntax
from lllms_core.samplers import Sampler, requested_logits_processors
from lllms_core.schemas import (
    AssistantMessage,
    AudioChunk,
    ChatCompletionRequest,
    ChatMessage,
    CompletionChunk,
    CompletionParameters,
    CompletionResult,
    ContentPart,
    DetokenizeRequest,
    DetokenizeResult,
    DeveloperMessage,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    FunctionCall,
    FunctionDefinition,
    ImageGenerationRequest,
    ImageGenerationResult,
    ImageToTextRequest,
    ImageToTextResult,
    ImageUrl,
    ImageUrlPart,
    InputAudio,
    InputAudioPart,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    RefusalPart,
    RerankDocument,
    RerankRequest,
    RerankResult,
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseFormatText,
    SpeechRequest,
    SpeechResult,
    SystemMessage,
    TextCompletionRequest,
    TextPart,
    TokenizeRequest,
    TokenizeResult,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolMessage,
    TopLogprob,
    TranscriptionRequest,
    TranscriptionResult,
    TranscriptionSegment,
    TranscriptionWord,
    Usage,
    UserMessage,
    message_text,
)
from lllms_core.store import ModelStore, source_fields
from lllms_core.tasks import Feature, Task

API_VERSION = (1, 1)
"""(major, minor) of this module's contract: the minor number grows with each addition."""

__all__ = [
    "API_VERSION",
    # hooks and the registries they fill
    "hookimpl",
    "Task",
    "Feature",
    "Sampler",
    "requested_logits_processors",
    # the engine protocol
    "Engine",
    "EngineInstance",
    "TaskContext",
    "ChunkSink",
    "Device",
    "NoOptions",
    "ModelConfig",
    "DeviceConfig",
    "ChatMessageConfig",
    "ModelStore",
    # helpers
    "StopStringFilter",
    "normalize_embedding",
    "check_token_ids",
    "common_prefix",
    "message_text",
    "default_cache_dir",
    "UNSET",
    "think_syntax",
    "ThinkSyntax",
    "ThinkingBudget",
    "Image",
    "RequestImages",
    "chat_image_sources",
    "is_image_data_url",
    "describe_images",
    "DecodedAudio",
    "source_fields",
    # errors
    "LllmsError",
    "InvalidRequestError",
    "UnsupportedParameterError",
    "ContextLengthExceededError",
    "NotFoundError",
    "ModelLoadError",
    "DownloadError",
    "ChecksumMismatchError",
    "EngineError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    # requests
    "CompletionParameters",
    "ChatCompletionRequest",
    "TextCompletionRequest",
    "EmbeddingRequest",
    "TranscriptionRequest",
    "SpeechRequest",
    "ImageToTextRequest",
    "ImageGenerationRequest",
    "RerankRequest",
    "RerankDocument",
    "TokenizeRequest",
    "DetokenizeRequest",
    # chat messages
    "ChatMessage",
    "SystemMessage",
    "DeveloperMessage",
    "UserMessage",
    "AssistantMessage",
    "ToolMessage",
    "ContentPart",
    "TextPart",
    "RefusalPart",
    "ImageUrlPart",
    "ImageUrl",
    "InputAudioPart",
    "InputAudio",
    "ToolCall",
    "FunctionCall",
    # tools and structured output
    "Tool",
    "FunctionDefinition",
    "ToolChoice",
    "NamedToolChoice",
    "NamedFunction",
    "ResponseFormat",
    "ResponseFormatText",
    "ResponseFormatJsonObject",
    "ResponseFormatJsonSchema",
    "JsonSchemaFormat",
    # what engines produce
    "CompletionChunk",
    "ToolCallDelta",
    "TokenLogprob",
    "TopLogprob",
    "CompletionResult",
    "FinishReason",
    "Usage",
    "EmbeddingResult",
    "TranscriptionResult",
    "TranscriptionSegment",
    "TranscriptionWord",
    "AudioChunk",
    "SpeechResult",
    "ImageToTextResult",
    "ImageGenerationResult",
    "RerankResult",
    "TokenizeResult",
    "DetokenizeResult",
]
