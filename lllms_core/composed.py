"""The ``composed`` engine: a chat model that hears, made of other models of the same server.

A composed model answers chat requests by calling other models through
``TaskContext.models``: each audio part of a user message (``input_audio``, as
OpenAI's clients send voice) is transcribed by its ``speech_model`` and replaced by
the text heard, then the conversation goes to its ``chat_model`` — with the model's
``tools`` when the request brings none — and that model's answer (text or tool calls)
streams back as the composed model's own. A voice request is thus answered, or turned
into tool calls, by a text-only chat model.

Images likewise: with a ``vision_model`` (``image-to-text``), each image part becomes
the caption that model writes (``[Image: ...]``), so a chat model that sees no images
hears what they show; without one, image parts go to the chat model as they are.
"""

from __future__ import annotations

import base64
import binascii
from functools import partial
from typing import Annotated, Awaitable, Callable

import msgspec

from lllms_core.config import Config, ModelConfig
from lllms_core.engine import ChunkSink, Engine, EngineInstance, TaskContext
from lllms_core.errors import ConfigError, InvalidRequestError
from lllms_core.hookspecs import hookimpl
from lllms_core.images import describe_images
from lllms_core.samplers import BUILTIN_SAMPLERS
from lllms_core.schemas import (
    ChatCompletionRequest,
    CompletionResult,
    ImageToTextRequest,
    InputAudioPart,
    SystemMessage,
    TextCompletionRequest,
    TextPart,
    Tool,
    ToolChoice,
    TranscriptionRequest,
    UserMessage,
)
from lllms_core.tasks import CHAT_FEATURES, TEXT_FEATURES


class ComposedOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of a ``composed`` model (flat in its table)."""

    chat_model: str
    """The id of the chat model that answers."""
    speech_model: str | None = None
    """The id of the speech-to-text model that hears audio parts; without it they go to the
    chat model as they are."""
    language: str | None = None
    """The language spoken in audio parts (ISO-639-1); detected when omitted."""
    vision_model: str | None = None
    """The id of the image-to-text model that captions image parts; without it they go to the
    chat model as they are."""
    caption_prompt: str | None = None
    """What the vision model is asked about each image, for models that take a prompt."""
    system_prompt: str | None = None
    """A system message put first when a request has none."""
    tools: list[Tool] = []
    """Tools offered to the chat model when a request brings none."""
    tool_choice: ToolChoice | None = None
    """The tool choice used with those tools (the chat model's default when omitted)."""
    parallel: Annotated[int, msgspec.Meta(ge=1)] = 8
    """Requests a composed instance takes at once (it only waits for the others)."""


PartReader = Callable[["ComposedEngine", TaskContext, object], Awaitable[object]]


async def hear(engine: "ComposedEngine", context: TaskContext, part: InputAudioPart) -> object:
    """An audio part, as the text its speech model hears in it."""
    options: ComposedOptions = context.model.options
    if options.speech_model is None:
        return part
    try:
        audio = base64.b64decode(part.input_audio.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("an input_audio part's `data` is not base64", param="messages") from None
    heard = await context.models.speech_to_text(
        TranscriptionRequest(
            model=options.speech_model,
            audio=audio,
            filename=f"audio.{part.input_audio.format}",
            language=options.language,
        )
    )
    return TextPart(text=heard.text.strip())


PART_READERS: dict[type, PartReader] = {InputAudioPart: hear}
"""How each kind of content part of a user message becomes something the chat model reads
(images are captioned for the whole request at once, see :func:`caption`)."""


async def caption(context: TaskContext, url: str) -> str:
    """What the vision model says an image of the request shows."""
    options: ComposedOptions = context.model.options
    described = await context.models.image_to_text(
        ImageToTextRequest(model=options.vision_model, image=context.image(url).data, prompt=options.caption_prompt)
    )
    return described.text.strip()


async def relay(opening, sink: ChunkSink) -> CompletionResult:
    """Send on the chunks of another model's completion stream; return its result."""
    async with opening as stream:
        async for chunk in stream:
            await sink.send(chunk)
    completion = stream.completion()
    return CompletionResult(finish_reasons=[choice.finish_reason for choice in completion.choices], usage=completion.usage)


class ComposedEngine(Engine):
    name = "composed"
    tasks = frozenset({"chat-completion"})
    default_task = "chat-completion"
    options = ComposedOptions
    # everything a chat model may do: the chat model itself refuses what it cannot
    capabilities = frozenset(
        {sampler.name for sampler in BUILTIN_SAMPLERS} | {f.name for f in CHAT_FEATURES + TEXT_FEATURES}
    )
    logits_processors = True
    needs_model_file = False

    def check_model(self, model: ModelConfig, config: Config) -> None:
        options: ComposedOptions = model.options
        uses = ((options.chat_model, "chat-completion"), (options.speech_model, "speech-to-text"),
                (options.vision_model, "image-to-text"))  # fmt: skip
        for model_id, task in uses:
            if model_id is None:
                continue
            used = config.models.get(model_id)
            if used is None or model_id == model.id:
                raise ConfigError(f"model {model.id!r}: {model_id!r} is not another model of this configuration")
            if used.task != task:
                raise ConfigError(f"model {model.id!r}: model {model_id!r} is a {used.task} model, not {task}")

    async def create_instance(self, model, prepared, device) -> EngineInstance:
        return EngineInstance(slots=model.options.parallel)

    async def chat_completion(self, context: TaskContext, request: ChatCompletionRequest, sink: ChunkSink) -> CompletionResult:
        options: ComposedOptions = context.model.options
        if options.vision_model is not None:
            request = await describe_images(request, partial(caption, context))
        messages = [await self._read(context, message) for message in request.messages]
        if options.system_prompt and not isinstance(messages[0], SystemMessage):
            messages.insert(0, SystemMessage(content=options.system_prompt))
        changes: dict = {"model": options.chat_model, "messages": messages}
        if not request.tools and options.tools:
            changes["tools"] = options.tools
            if request.tool_choice is None and options.tool_choice is not None:
                changes["tool_choice"] = options.tool_choice
        forwarded = msgspec.structs.replace(request, **changes)
        return await relay(context.models.stream_chat_completion(forwarded), sink)

    async def text_completion(self, context: TaskContext, request: TextCompletionRequest, sink: ChunkSink) -> CompletionResult:
        forwarded = msgspec.structs.replace(request, model=context.model.options.chat_model)
        return await relay(context.models.stream_text_completion(forwarded), sink)

    async def _read(self, context: TaskContext, message):
        if not isinstance(message, UserMessage) or isinstance(message.content, str):
            return message
        parts = []
        for part in message.content:
            reader = PART_READERS.get(type(part))
            parts.append(await reader(self, context, part) if reader else part)
        return msgspec.structs.replace(message, content=parts)


@hookimpl
def register_engines(register):
    register(ComposedEngine)
