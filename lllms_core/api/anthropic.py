"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

An adapter: a Messages request becomes the core's :class:`ChatCompletionRequest`, is
answered by the :class:`~lllms_core.server.ModelServer` like any chat (same pool, context
reuse, limits, cancellation and metrics), and its chunks are written back as Anthropic's
message or its stream of events. Errors have Anthropic's shape
``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from quart import Blueprint, Response

from lllms_core.api.common import error_shape, json_response, read_request, state
from lllms_core.api.openai import ChunkEvents, complete, open_chat_stream, stream_events
from lllms_core.errors import InvalidRequestError, LllmsError
from lllms_core.images import image_part
from lllms_core.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionChunk,
    FunctionCall,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    PositiveInt,
    Probability,
    Request,
    SystemMessage,
    ImageUrlPart,
    TextPart,
    TokenizeRequest,
    Tool,
    ToolCall,
    ToolMessage,
    Usage,
    UserMessage,
)
from lllms_core.server import CompletionStream

api = Blueprint("anthropic", __name__)

PREFIX = "/v1/messages"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


@error_shape(PREFIX)
def anthropic_error(error: LllmsError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


# --- requests --------------------------------------------------------------------


class TextBlock(Struct, tag_field="type", tag="text", kw_only=True):
    text: str


class ImageBlock(Struct, tag_field="type", tag="image", kw_only=True):
    source: dict[str, Any] | UnsetType = UNSET


class DocumentBlock(Struct, tag_field="type", tag="document", kw_only=True):
    source: dict[str, Any] | UnsetType = UNSET


class ToolUseBlock(Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[Union[TextBlock, ImageBlock, DocumentBlock]] = ""
    is_error: bool = False


class ThinkingBlock(Struct, tag_field="type", tag="thinking", kw_only=True):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking", kw_only=True):
    data: str = ""


ContentBlock = Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock]


class MessageParam(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(Struct, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    input_schema: dict[str, Any]
    description: str | UnsetType = UNSET
    type: str | None = None
    """``custom`` or absent; Anthropic's server tools (``bash_...``, ``web_search_...``) are not served."""


class ToolChoiceAuto(Struct, tag_field="type", tag="auto", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Struct, tag_field="type", tag="any", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Struct, tag_field="type", tag="tool", kw_only=True):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Struct, tag_field="type", tag="none", kw_only=True):
    pass


AnthropicToolChoice = Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone]


class ThinkingEnabled(Struct, tag_field="type", tag="enabled", kw_only=True):
    budget_tokens: Annotated[int, Meta(ge=0)]


class ThinkingDisabled(Struct, tag_field="type", tag="disabled", kw_only=True):
    pass


class ThinkingAdaptive(Struct, tag_field="type", tag="adaptive", kw_only=True):
    """The model decides how long to think: no budget."""


class Metadata(Struct, kw_only=True):
    user_id: str | None = None


class CountTokensRequest(Request, kw_only=True, omit_defaults=True):
    model: str
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlock] | UnsetType = UNSET
    tools: list[ToolParam] | UnsetType = UNSET
    tool_choice: AnthropicToolChoice | UnsetType = UNSET
    thinking: Union[ThinkingEnabled, ThinkingDisabled, ThinkingAdaptive] | UnsetType = UNSET


class MessagesRequest(CountTokensRequest, kw_only=True, omit_defaults=True):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | UnsetType = UNSET
    temperature: Annotated[float, Meta(ge=0, le=1)] | UnsetType = UNSET
    top_p: Probability | UnsetType = UNSET
    top_k: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    stream: bool = False


# --- Anthropic → the core's chat request -----------------------------------------------


def _refuse_media(block: Any, where: str) -> None:
    if isinstance(block, DocumentBlock):
        raise InvalidRequestError("documents are not supported yet: no engine of this server reads them", param=where)
    if isinstance(block, ImageBlock):
        raise InvalidRequestError("images are read in user messages only", param=where)


def _image(block: ImageBlock, where: str) -> ImageUrlPart:
    """An image block as the core's chat image part (the core fetches and decodes it)."""
    source = block.source if block.source is not UNSET else {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return image_part(data=source["data"], media_type=str(source.get("media_type") or "image/png"), param=where)
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return image_part(source["url"], param=where)
    raise InvalidRequestError("an image's source must be base64 data or a url", param=f"{where}.source")


def _text(content: str | list, where: str) -> str:
    if isinstance(content, str):
        return content
    for number, block in enumerate(content):
        _refuse_media(block, f"{where}[{number}]")
    return "\n".join(block.text for block in content if isinstance(block, TextBlock))


def chat_messages(body: CountTokensRequest) -> list[ChatMessage]:
    """Anthropic's system prompt and messages as the core's chat messages: a user message's
    ``tool_result`` blocks become tool messages, an assistant's ``tool_use`` blocks its tool
    calls; thinking blocks of earlier turns are left out (templates drop them too)."""
    messages: list[ChatMessage] = []
    if body.system is not UNSET:
        system = _text(body.system, "system")
        if system:
            messages.append(SystemMessage(content=system))
    for number, message in enumerate(body.messages):
        where = f"messages[{number}].content"
        blocks = [TextBlock(text=message.content)] if isinstance(message.content, str) else message.content
        texts: list[str] = []
        images: list[tuple[int, ImageUrlPart]] = []
        calls: list[ToolCall] = []
        for position, block in enumerate(blocks):
            if isinstance(block, ImageBlock) and message.role == "user":
                images.append((len(texts), _image(block, f"{where}[{position}]")))
                continue
            _refuse_media(block, f"{where}[{position}]")
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise InvalidRequestError("tool_result blocks belong in user messages", param=f"{where}[{position}]")
                result = _text(block.content, f"{where}[{position}].content")
                messages.append(ToolMessage(content=f"Error: {result}" if block.is_error else result, tool_call_id=block.tool_use_id))
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise InvalidRequestError("tool_use blocks belong in assistant messages", param=f"{where}[{position}]")
                calls.append(ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=json.dumps(block.input))))
        if message.role == "user":
            if images:
                parts: list[Any] = [TextPart(text=text) for text in texts]
                for offset, (before, image) in enumerate(images):
                    parts.insert(before + offset, image)  # each image where it was among the texts
                messages.append(UserMessage(content=parts))
            elif texts or isinstance(message.content, str):
                messages.append(UserMessage(content=[TextPart(text=text) for text in texts] if len(texts) > 1 else "".join(texts)))
        else:
            messages.append(AssistantMessage(content="".join(texts) or None, tool_calls=calls or UNSET))
    if len(messages) == 0 or isinstance(messages[-1], SystemMessage):
        raise InvalidRequestError("messages must hold at least one user message", param="messages")
    return messages


def chat_tools(body: CountTokensRequest) -> tuple[list[Tool] | None, Any, bool | None]:
    """Tools, tool choice and whether parallel calls are allowed, in the core's terms."""
    if body.tools is UNSET or not body.tools:
        tools = None
    else:
        for number, tool in enumerate(body.tools):
            if tool.type not in (None, "custom"):
                raise InvalidRequestError(f"the server tool {tool.type!r} is not supported; give client tools with an input_schema", param=f"tools[{number}]")
        tools = [Tool(function=FunctionDefinition(name=t.name, description=t.description, parameters=t.input_schema)) for t in body.tools]
    choice = body.tool_choice
    if choice is UNSET:
        return tools, None, None
    parallel = None if isinstance(choice, ToolChoiceNone) or not choice.disable_parallel_tool_use else False
    if isinstance(choice, ToolChoiceAny):
        return tools, "required", parallel
    if isinstance(choice, ToolChoiceTool):
        if not tools or choice.name not in {tool.function.name for tool in tools}:
            raise InvalidRequestError(f"tool_choice names the tool {choice.name!r}, which is not in tools", param="tool_choice")
        return tools, NamedToolChoice(function=NamedFunction(name=choice.name)), parallel
    return tools, "none" if isinstance(choice, ToolChoiceNone) else "auto", parallel


def chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    tools, tool_choice, parallel = chat_tools(body)
    values: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body),
        "max_tokens": body.max_tokens,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
    }
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not UNSET:
            values[name] = value
    if body.stop_sequences is not UNSET:
        values["stop"] = body.stop_sequences
    if body.metadata is not UNSET and body.metadata.user_id:
        values["user"] = body.metadata.user_id
    if isinstance(body.thinking, ThinkingEnabled):
        values["reasoning_budget"] = body.thinking.budget_tokens
    return ChatCompletionRequest(**values)


# --- the core's answer → Anthropic ---------------------------------------------------


def stop_reason(choice: Choice) -> str:
    if choice.finish_reason == "tool_calls":
        return "tool_use"
    if choice.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if choice.stop_sequence else "end_turn"


def usage_of(usage: Usage) -> dict[str, int]:
    """Anthropic counts the prompt tokens read from the cache apart from ``input_tokens``."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message_id(stream: CompletionStream) -> str:
    return "msg_" + stream.id.removeprefix("cmpl-")


def message_body(stream: CompletionStream) -> dict[str, Any]:
    [choice] = stream.choices
    content: list[dict[str, Any]] = []
    if choice.reasoning:
        content.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
    if choice.text:
        content.append({"type": "text", "text": choice.text})
    for call in choice.tool_calls:
        content.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": tool_input(call.function.arguments)})
    return {
        "id": message_id(stream),
        "type": "message",
        "role": "assistant",
        "model": stream.model,
        "content": content,
        "stop_reason": stop_reason(choice),
        "stop_sequence": choice.stop_sequence,
        "usage": usage_of(stream.usage),
    }


def event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode({"type": name, **body}) + b"\n\n"


PING = event("ping", {})


class MessageEvents(ChunkEvents):
    """Anthropic's stream: ``message_start``; per content block ``content_block_start``,
    its deltas, ``content_block_stop`` (a ``ping`` after the first block starts); then
    ``message_delta`` with the stop reason and usage, and ``message_stop``."""

    keepalive = PING

    def __init__(self, streams: list[CompletionStream], chat: ChatCompletionRequest):
        super().__init__(streams, chat)
        [self.stream] = streams
        self.block = -1
        self.kind: str | None = None
        self.calls: set[int] = set()

    def begin(self) -> list[bytes]:
        message = {
            "id": message_id(self.stream), "type": "message", "role": "assistant", "model": self.stream.model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage_of(Usage()),
        }  # fmt: skip
        return [event("message_start", {"message": message})]

    def _start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        events = self._stop()
        self.block += 1
        self.kind = kind
        events.append(event("content_block_start", {"index": self.block, "content_block": block}))
        if self.block == 0:
            events.append(PING)
        return events

    def _stop(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.block})]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"index": self.block, "delta": delta})

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        events: list[bytes] = []
        if chunk.reasoning:
            if self.kind != "thinking":
                events += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(self._delta({"type": "thinking_delta", "thinking": chunk.reasoning}))
        if chunk.text:
            if self.kind != "text":
                events += self._start("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": chunk.text}))
        for delta in chunk.tool_calls or ():
            call = stream.choices[0].tool_calls[delta.index]
            if delta.index not in self.calls:
                self.calls.add(delta.index)
                events += self._start("tool_use", {"type": "tool_use", "id": call.id, "name": call.function.name, "input": {}})
            if delta.arguments:
                events.append(self._delta({"type": "input_json_delta", "partial_json": delta.arguments}))
        return events

    def finish(self) -> list[bytes]:
        [choice] = self.stream.choices
        delta = {"stop_reason": stop_reason(choice), "stop_sequence": choice.stop_sequence}
        return self._stop() + [
            event("message_delta", {"delta": delta, "usage": usage_of(self.stream.usage)}),
            event("message_stop", {}),
        ]

    def error(self, error: LllmsError) -> list[bytes]:
        return [event("error", {"error": anthropic_error(error)["error"]})]

    def done(self) -> list[bytes]:
        return []


# --- routes --------------------------------------------------------------------------


@api.post(PREFIX)
async def messages() -> Response:
    body = await read_request(MessagesRequest)
    chat = chat_request(body)
    server = state().server
    if body.stream:
        return await stream_events(lambda: open_chat_stream(server, chat), lambda streams: MessageEvents(streams, chat))
    [stream] = await complete(lambda: open_chat_stream(server, chat))
    return json_response(message_body(stream))


@api.post(PREFIX + "/count_tokens")
async def count_tokens() -> Response:
    body = await read_request(CountTokensRequest)
    tools, tool_choice, _ = chat_tools(body)
    counted = await state().server.tokenize(
        TokenizeRequest(model=body.model, messages=chat_messages(body), tools=None if tool_choice == "none" else tools)
    )
    return json_response({"input_tokens": len(counted.tokens)})

