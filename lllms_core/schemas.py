"""Request Structs (OpenAI's shapes) and the results engines return.

Requests accept unknown fields, so that a newer OpenAI client never breaks a
request; ``UNSET`` tells a missing field from an explicit ``null``. The same
request Structs are used by the HTTP API and the Python facade, and engines
receive them as they are.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]


class Request(Struct, kw_only=True, omit_defaults=True):
    """Base of request Structs: unknown fields are accepted and ignored."""


# --- chat messages -------------------------------------------------------------


class TextPart(Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImageUrl(Struct, kw_only=True):
    url: str
    detail: str | UnsetType = UNSET


class ImageUrlPart(Struct, tag_field="type", tag="image_url", kw_only=True):
    image_url: ImageUrl


class InputAudio(Struct, kw_only=True):
    data: str
    format: str


class InputAudioPart(Struct, tag_field="type", tag="input_audio", kw_only=True):
    input_audio: InputAudio


class RefusalPart(Struct, tag_field="type", tag="refusal", kw_only=True):
    refusal: str


ContentPart = Union[TextPart, ImageUrlPart, InputAudioPart, RefusalPart]


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str


class ToolCall(Struct, kw_only=True, omit_defaults=False):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class SystemMessage(Struct, tag_field="role", tag="system", kw_only=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class DeveloperMessage(Struct, tag_field="role", tag="developer", kw_only=True):
    content: str | list[TextPart]
    name: str | UnsetType = UNSET


class UserMessage(Struct, tag_field="role", tag="user", kw_only=True):
    content: str | list[ContentPart]
    name: str | UnsetType = UNSET


class AssistantMessage(Struct, tag_field="role", tag="assistant", kw_only=True):
    content: str | list[Union[TextPart, RefusalPart]] | None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    name: str | UnsetType = UNSET
    refusal: str | None | UnsetType = UNSET


class ToolMessage(Struct, tag_field="role", tag="tool", kw_only=True):
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage]


def message_text(message: ChatMessage, image_marker: str | None = None) -> str:
    """The text of a message's content (parts joined; non-text parts left out, except that
    with ``image_marker`` each image part is that text, in its place)."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.text
        if isinstance(part, TextPart)
        else image_marker
        if image_marker is not None and isinstance(part, ImageUrlPart)
        else getattr(part, "refusal", "")
        for part in content
    )


# --- tools and structured output ----------------------------------------------


class FunctionDefinition(Struct, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET


class Tool(Struct, kw_only=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class JsonSchemaFormat(Struct, kw_only=True):
    name: str
    schema: dict[str, Any] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET


class ResponseFormatText(Struct, tag_field="type", tag="text", kw_only=True):
    pass


class ResponseFormatJsonObject(Struct, tag_field="type", tag="json_object", kw_only=True):
    pass


class ResponseFormatJsonSchema(Struct, tag_field="type", tag="json_schema", kw_only=True):
    json_schema: JsonSchemaFormat


ResponseFormat = Union[ResponseFormatText, ResponseFormatJsonObject, ResponseFormatJsonSchema]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


# --- completion requests -------------------------------------------------------


class CompletionParameters(Request, kw_only=True, omit_defaults=True):
    """Sampling and output parameters shared by chat and text completions."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Probability | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repeat_penalty: Annotated[float, Meta(ge=0)] | None = None
    repeat_penalty_num: Annotated[int, Meta(ge=-1)] | None = None
    repeat_last_n: Annotated[int, Meta(ge=-1)] | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Meta(max_length=16)] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    grammar: str | None = None
    user: str | None = None
    plugin_parameters: dict[str, Any] = {}
    """Values for plugin samplers' parameters, filled by the API from the request body."""
    keep_alive: float | None = None
    """Non-spec: seconds the model's instance stays loaded once idle after this request
    (instead of the model's ``ttl``); negative: until the server stops."""

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def repeat_window(self) -> int | None:
        return self.repeat_last_n if self.repeat_last_n is not None else self.repeat_penalty_num

    @property
    def choices(self) -> int:
        return self.n or 1


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]

REASONING_BUDGETS: dict[str, int | None] = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": None}
"""The thinking budget, in tokens, of each ``reasoning_effort`` (None: unbounded)."""


class ChatCompletionRequest(CompletionParameters, kw_only=True, omit_defaults=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    reasoning_budget: Annotated[int, Meta(ge=0)] | None = None
    """Non-spec: the most tokens a reasoning model may think for (wins over ``reasoning_effort``)."""

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def thinking_budget(self) -> int | None:
        """Tokens the model may spend thinking before it must answer; None: unbounded."""
        if self.reasoning_budget is not None:
            return self.reasoning_budget
        return REASONING_BUDGETS[self.reasoning_effort] if self.reasoning_effort is not None else None


Prompt = Union[str, list[Union[str, int, list[int]]]]
"""A string, a list of strings, a list of token ids, or a list of token-id lists."""


def _split_inputs(value: Any, field_name: str) -> list[str | list[int]]:
    from lllms_core.errors import InvalidRequestError

    if isinstance(value, str):
        return [value]
    if all(isinstance(item, int) for item in value):
        return [value] if value else []
    if not all(isinstance(item, (str, list)) for item in value):
        raise InvalidRequestError(
            f"`{field_name}` must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param=field_name,
        )
    for index, item in enumerate(value):
        if isinstance(item, list) and not item:
            raise InvalidRequestError(f"`{field_name}[{index}]` is an empty list of token ids", param=f"{field_name}[{index}]")
    return list(value)


class TextCompletionRequest(CompletionParameters, kw_only=True, omit_defaults=True):
    prompt: Prompt
    suffix: str | None = None
    echo: bool | None = None
    best_of: Annotated[int, Meta(ge=1, le=20)] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one completion (or ``n``) per entry."""
        return _split_inputs(self.prompt, "prompt")


class EmbeddingRequest(Request, kw_only=True, omit_defaults=True):
    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    pooling: Literal["mean", "cls", "last"] | None = None
    user: str | None = None
    keep_alive: float | None = None
    """Non-spec: as in completions."""

    @property
    def inputs(self) -> list[str | list[int]]:
        return _split_inputs(self.input, "input")


class RerankDocument(Struct, kw_only=True):
    text: str


class RerankRequest(Request, kw_only=True, omit_defaults=True):
    model: str
    query: str
    documents: Annotated[list[Union[str, RerankDocument]], Meta(min_length=1)]
    top_n: PositiveInt | None = None
    return_documents: bool = True

    @property
    def texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]


class TokenizeRequest(Request, kw_only=True, omit_defaults=True):
    """Either ``content`` (a text) or ``messages`` (a chat, rendered with the model's
    template, ``tools`` included, as a chat completion's prompt would be)."""

    model: str
    content: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special: bool = True
    """Add the tokens the model's tokenizer adds to a text (BOS...)."""
    with_pieces: bool = False
    """Return each token's text beside its id."""


class DetokenizeRequest(Request, kw_only=True, omit_defaults=True):
    model: str
    tokens: list[Annotated[int, Meta(ge=0)]]


class TranscriptionRequest(Request, kw_only=True, omit_defaults=True):
    """Speech to text (``/v1/audio/transcriptions``), or to English text with
    ``task: translate`` (``/v1/audio/translations``)."""

    model: str
    audio: bytes = b""
    """The uploaded file, as it came; the core decodes it for the engine (``TaskContext.audio``)."""
    filename: str = "audio"
    language: str | None = None
    """The language spoken (ISO-639-1, e.g. ``en``); detected when omitted."""
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: Temperature | None = None
    """0 or omitted: greedy, with the fallback to higher temperatures Whisper uses when
    a window's decoding fails its checks."""
    timestamp_granularities: list[Literal["word", "segment"]] | None = None
    """With ``word``, ``verbose_json`` has the time of each word."""
    stream: bool | None = None
    vad_filter: bool | None = None
    """Non-spec: leave out the parts without speech (voice-activity detection) before
    transcribing; the times stay those of the whole audio."""
    task: Literal["transcribe", "translate"] = "transcribe"
    """``translate``: English text whatever language is spoken."""

    @property
    def word_timestamps(self) -> bool:
        return "word" in (self.timestamp_granularities or ())


class ImageToTextRequest(Request, kw_only=True, omit_defaults=True):
    model: str
    image: bytes
    """The encoded image (PNG, JPEG, WebP, GIF or BMP)."""
    prompt: str | None = None
    max_tokens: PositiveInt | None = None


ImageSize = Annotated[str, Meta(pattern=r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$")]
"""``<width>x<height>`` in pixels, or ``auto`` (the model's default size)."""


class ImageGenerationRequest(Request, kw_only=True, omit_defaults=True):
    """OpenAI's image generation (and, with ``image``, image edit) request, with the
    settings a diffusion model needs as extensions (``steps``, ``guidance_scale``,
    ``negative_prompt``, ``seed``, ``strength``)."""

    model: str
    prompt: str
    n: Annotated[int, Meta(ge=1, le=10)] | None = None
    size: ImageSize | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    seed: int | None = None
    """Extension: the same seed, prompt and settings give the same images (image ``i`` uses ``seed + i``)."""
    steps: Annotated[int, Meta(ge=1, le=1000)] | None = None
    """Extension: denoising steps; default: the model's."""
    guidance_scale: Annotated[float, Meta(ge=0, le=100)] | None = None
    """Extension: classifier-free guidance; default: the model's."""
    negative_prompt: str | None = None
    """Extension: what the image should not show."""
    strength: Annotated[float, Meta(gt=0, le=1)] | None = None
    """Extension, edits: how much of the input image is replaced (1: all of it)."""
    image: list[bytes] = []
    """Edits: the input image(s), filled by the API from the upload."""
    mask: bytes | None = None
    """Edits: where to paint (transparent pixels), filled by the API from the upload."""
    user: str | None = None

    @property
    def count(self) -> int:
        return self.n or 1

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """(width, height) asked for, or None for the model's default."""
        if self.size is None or self.size == "auto":
            return None
        width, _, height = self.size.partition("x")
        return int(width), int(height)


# --- what engines produce ------------------------------------------------------


class TopLogprob(Struct, kw_only=True, omit_defaults=False):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True, omit_defaults=False):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = []


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A piece of a tool call: the first piece of a call carries id and name."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class CompletionChunk(Struct, kw_only=True, omit_defaults=True):
    """What an engine emits while generating: text, tool-call pieces or both.

    ``reasoning``: thinking text, separated from ``text`` by the core (see
    :mod:`lllms_core.reasoning`); engines emit everything as ``text``."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None
    logprobs: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class Usage(Struct, kw_only=True, omit_defaults=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
        )


class CompletionResult(Struct, kw_only=True):
    """What an engine returns once generation ends (the text went out as chunks)."""

    finish_reasons: list[FinishReason]
    """One per choice, by choice index."""
    usage: Usage
    stop_sequences: list[str | None] = []
    """Optional, by choice index: the stop string that ended the choice, where an engine knows it."""


class Choice(Struct, kw_only=True):
    """One accumulated choice of a completion (built by the core from chunks)."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] | None = None
    logprobs_offset: int = 0
    """Where in ``text`` the first token with logprobs starts (after an echoed prompt)."""
    finish_reason: FinishReason = "stop"
    stop_sequence: str | None = None
    """The stop string that ended the choice, when its engine reports it."""


class Completion(Struct, kw_only=True):
    """A whole completion: what the non-streaming facade methods return."""

    id: str
    model: str
    created: int
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class EmbeddingResult(Struct, kw_only=True):
    embeddings: list[list[float]]
    prompt_tokens: int


class RerankResult(Struct, kw_only=True):
    scores: list[float]
    """One relevance score per document, in document order (higher is more relevant)."""
    prompt_tokens: int


class TokenizeResult(Struct, kw_only=True):
    tokens: list[int]
    pieces: list[str] | None = None
    """Each token's text, when asked for (``with_pieces``)."""


class DetokenizeResult(Struct, kw_only=True):
    content: str


class TranscriptionSegment(Struct, kw_only=True):
    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    """Where the window this segment was decoded in starts, in 10 ms frames."""
    tokens: list[int] = []
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


class TranscriptionWord(Struct, kw_only=True):
    word: str
    start: float
    end: float
    probability: float | None = None


class TranscriptionResult(Struct, kw_only=True):
    text: str
    language: str | None = None
    duration: float | None = None
    segments: list[TranscriptionSegment] = []
    words: list[TranscriptionWord] = []
    """Every word with its time, when the request asked for ``word`` timestamps."""


SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceId(Struct, kw_only=True):
    id: str


class SpeechRequest(Request, kw_only=True, omit_defaults=True):
    """Text to speech (``/v1/audio/speech``)."""

    model: str
    input: Annotated[str, Meta(min_length=1, max_length=4096)]
    voice: str | VoiceId | None = None
    """One of the model's voices; its default voice when omitted."""
    response_format: SpeechFormat = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    """``audio``: the audio file, sent as it is synthesized; ``sse``: server-sent events
    ``speech.audio.delta`` (base64 pieces of it), then ``speech.audio.done``."""
    instructions: Annotated[str, Meta(max_length=4096)] | None = None

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class AudioChunk(Struct, kw_only=True):
    """A piece of synthesized speech: 16-bit signed little-endian mono samples."""

    pcm: bytes
    sample_rate: int


class SpeechResult(Struct, kw_only=True):
    """What a text-to-speech engine returns once the audio went out as chunks."""

    sample_rate: int
    samples: int
    """How many samples were sent."""
    input_tokens: int = 0
    """What the engine read (for Piper: phoneme ids)."""
    output_tokens: int = 0
    """What it generated (for Piper: audio frames)."""

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0


class ImageToTextResult(Struct, kw_only=True):
    text: str


class ImageGenerationResult(Struct, kw_only=True):
    images: list[Any]
    """Pillow images, one per image asked for (the API encodes them)."""
    seed: int | None = None
    """The seed of the first image, when the engine seeds."""


json_decoder_cache: dict[type, msgspec.json.Decoder] = {}


def decoder_for(kind: type) -> msgspec.json.Decoder:
    """A JSON decoder for a request Struct, built once per type."""
    decoder = json_decoder_cache.get(kind)
    if decoder is None:
        decoder = json_decoder_cache[kind] = msgspec.json.Decoder(kind)
    return decoder


__all__ = [name for name in dir() if not name.startswith("_")] + ["UNSET", "field"]
