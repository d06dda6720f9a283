"""OpenAI's Responses API: ``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items``.

An adapter over the core's chat request, like the Messages API. A stored response keeps
the whole conversation it ended (in the core's chat messages), in the cache directory,
so that ``previous_response_id`` continues it: the follow-up's messages extend the stored
ones, and the pool routes it to the slot that holds their context. The store is bounded
in bytes and age (``server.responses_store_mb``, ``server.responses_store_days``).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
import trio
from msgspec import UNSET, Meta, Struct, UnsetType
from quart import Blueprint, Response, request

from lllms_core.api.common import json_response, read_request, sse, state
from lllms_core.api.openai import ChunkEvents, complete, open_chat_stream, stream_events
from lllms_core.config import cache_dir
from lllms_core.errors import InvalidRequestError, LllmsError, NotFoundError
from lllms_core.images import image_part
from lllms_core.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    CompletionChunk,
    DeveloperMessage,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    PositiveInt,
    Probability,
    ReasoningEffort,
    Request,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    SystemMessage,
    Temperature,
    TextPart,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from lllms_core.server import CompletionStream, validation_error

api = Blueprint("responses", __name__)

# --- requests ------------------------------------------------------------------------


class FunctionTool(Struct, kw_only=True):
    type: str
    name: str | UnsetType = UNSET
    description: str | None | UnsetType = UNSET
    parameters: dict[str, Any] | None | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET


class NamedFunctionChoice(Struct, kw_only=True):
    type: str
    name: str | UnsetType = UNSET


class TextFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET


class TextParam(Struct, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)


class ReasoningParam(Struct, kw_only=True):
    effort: ReasoningEffort | None = None


class CreateResponse(Request, kw_only=True, omit_defaults=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    reasoning: ReasoningParam | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


# input items: messages, function calls and their outputs (``type`` may be left out of a message)


class InputText(Struct, tag_field="type", tag="input_text", kw_only=True):
    text: str


class OutputText(Struct, tag_field="type", tag="output_text", kw_only=True):
    text: str


class InputImage(Struct, tag_field="type", tag="input_image", kw_only=True):
    image_url: str | None = None


class InputFile(Struct, tag_field="type", tag="input_file", kw_only=True):
    filename: str | None = None


class MessageItem(Struct, kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Union[InputText, OutputText, InputImage, InputFile]]
    type: Literal["message"] = "message"
    id: str | UnsetType = UNSET


class FunctionCallItem(Struct, kw_only=True):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | UnsetType = UNSET


class FunctionCallOutputItem(Struct, kw_only=True):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Union[InputText, OutputText]]
    id: str | UnsetType = UNSET


class ReasoningInputItem(Struct, kw_only=True):
    type: Literal["reasoning"]
    id: str | UnsetType = UNSET


ITEM_KINDS = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningInputItem,
}


def input_items(value: str | list[dict[str, Any]]) -> list[Any]:
    if isinstance(value, str):
        return [MessageItem(role="user", content=value)]
    items = []
    for number, raw in enumerate(value):
        kind = ITEM_KINDS.get(raw.get("type", "message"))
        if kind is None:
            raise InvalidRequestError(f"input items of type {raw.get('type')!r} are not supported", param=f"input[{number}]")
        try:
            items.append(msgspec.convert(raw, kind))
        except msgspec.ValidationError as error:
            detail = validation_error(error)
            raise InvalidRequestError(detail.message, param=f"input[{number}]" + (f".{detail.param}" if detail.param else "")) from None
    return items


def _content_text(content: str | list, where: str) -> str:
    if isinstance(content, str):
        return content
    for number, part in enumerate(content):
        if isinstance(part, InputFile):
            raise InvalidRequestError("files are not supported yet: no engine of this server reads them", param=f"{where}[{number}]")
        if isinstance(part, InputImage):
            raise InvalidRequestError("images are read in user messages only", param=f"{where}[{number}]")
    return "".join(part.text for part in content)


def _user_content(content: str | list, where: str) -> str | list:
    """A user message's content, its ``input_image`` parts as the core's image parts (the
    core fetches and decodes them)."""
    if isinstance(content, str) or not any(isinstance(part, InputImage) for part in content):
        return _content_text(content, where)
    parts: list[Any] = []
    for number, part in enumerate(content):
        if isinstance(part, InputImage):
            if not part.image_url:
                raise InvalidRequestError("an input_image needs an image_url (a URL or a data URL); file ids are not kept here", param=f"{where}[{number}]")
            parts.append(image_part(part.image_url, param=f"{where}[{number}]"))
        else:
            parts.append(TextPart(text=_content_text([part], where)))
    return parts


def chat_messages(items: list[Any]) -> list[ChatMessage]:
    """Input items as the core's chat messages: consecutive function calls become one
    assistant message's tool calls; reasoning items are left out."""
    messages: list[ChatMessage] = []
    kinds = {"user": UserMessage, "system": SystemMessage, "developer": DeveloperMessage}
    for number, item in enumerate(items):
        if isinstance(item, MessageItem):
            where = f"input[{number}].content"
            if item.role == "user":
                messages.append(UserMessage(content=_user_content(item.content, where)))
                continue
            text = _content_text(item.content, where)
            messages.append(AssistantMessage(content=text) if item.role == "assistant" else kinds[item.role](content=text))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if isinstance(last, AssistantMessage) and last.tool_calls is not UNSET:
                last.tool_calls.append(call)
            elif isinstance(last, AssistantMessage) and last.tool_calls is UNSET:
                last.tool_calls = [call]
            else:
                messages.append(AssistantMessage(content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(ToolMessage(content=_content_text(item.output, f"input[{number}].output"), tool_call_id=item.call_id))
    return messages


def chat_request(body: CreateResponse, history: list[ChatMessage], items: list[Any]) -> ChatCompletionRequest:
    messages: list[ChatMessage] = [DeveloperMessage(content=body.instructions)] if body.instructions else []
    messages += history + chat_messages(items)
    if not any(not isinstance(m, (SystemMessage, DeveloperMessage)) for m in messages):
        raise InvalidRequestError("`input` must hold at least one message", param="input")
    tools = None
    for number, tool in enumerate(body.tools or ()):
        if tool.type != "function" or tool.name is UNSET:
            raise InvalidRequestError(f"tools of type {tool.type!r} are not supported; give function tools", param=f"tools[{number}]")
        tools = tools or []
        tools.append(Tool(function=FunctionDefinition(
            name=tool.name, description=tool.description or UNSET, parameters=tool.parameters or UNSET, strict=tool.strict,
        )))  # fmt: skip
    tool_choice: Any = body.tool_choice
    if isinstance(tool_choice, NamedFunctionChoice):
        if tool_choice.type != "function" or tool_choice.name is UNSET:
            raise InvalidRequestError("tool_choice must be none, auto, required or a function", param="tool_choice")
        tool_choice = NamedToolChoice(function=NamedFunction(name=tool_choice.name))
    response_format: Any = None
    text_format = body.text.format if body.text is not None else TextFormat()
    if text_format.type == "json_object":
        response_format = ResponseFormatJsonObject()
    elif text_format.type == "json_schema":
        if text_format.name is UNSET:
            raise InvalidRequestError("text.format.name is required for json_schema", param="text.format.name")
        response_format = ResponseFormatJsonSchema(json_schema=JsonSchemaFormat(
            name=text_format.name, schema=text_format.schema, description=text_format.description, strict=text_format.strict,
        ))  # fmt: skip
    return ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format,
        reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
        user=body.user,
    )


# --- the store ---------------------------------------------------------------------


class StoredResponse(Struct, kw_only=True):
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    """This request's input items, with ids, for ``input_items``."""
    messages: list[ChatMessage]
    """The whole conversation the response ended, reply included, for ``previous_response_id``."""


class ResponseStore:
    """Stored responses, one JSON file each under ``<cache>/responses``; the oldest go once
    the files pass ``max_bytes`` or ``max_age`` seconds. File work runs in threads."""

    def __init__(self, directory: Path, max_bytes: int, max_age: float):
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._decoder = msgspec.json.Decoder(StoredResponse)

    def _path(self, response_id: str) -> Path:
        if not response_id.startswith("resp_") or not response_id[5:].isalnum():
            raise NotFoundError(f"No response with id {response_id!r}", param="response_id")
        return self.directory / f"{response_id}.json"

    async def get(self, response_id: str) -> StoredResponse:
        path = self._path(response_id)
        try:
            data = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError(f"No response with id {response_id!r}", param="response_id") from None
        return self._decoder.decode(data)

    async def put(self, stored: StoredResponse) -> None:
        await trio.to_thread.run_sync(self._write, self._path(stored.response["id"]), msgspec.json.encode(stored))

    async def delete(self, response_id: str) -> None:
        path = self._path(response_id)
        try:
            await trio.to_thread.run_sync(path.unlink)
        except FileNotFoundError:
            raise NotFoundError(f"No response with id {response_id!r}", param="response_id") from None

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        self._prune()

    def _prune(self) -> None:
        files = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".json"):
                stat = entry.stat()
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        files.sort()
        total = sum(size for _, size, _ in files)
        now = time.time()
        for modified, size, path in files:
            if total <= self.max_bytes and now - modified <= self.max_age:
                break
            path.unlink(missing_ok=True)
            total -= size


def response_store() -> ResponseStore:
    app_state = state()
    store = getattr(app_state, "responses", None)
    if store is None:
        server = app_state.server.config.server
        store = app_state.responses = ResponseStore(
            cache_dir(app_state.server.config) / "responses",
            server.responses_store_mb * 1024 * 1024,
            server.responses_store_days * 86400,
        )
    return store


# --- the core's answer → a response ----------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponseBuilder:
    """A response object, built from the request and then from the stream's chunks."""

    def __init__(self, body: CreateResponse, stream: CompletionStream):
        self.body = body
        self.stream = stream
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []

    def object(self, status: str, error: LllmsError | None = None) -> dict[str, Any]:
        body = self.body
        usage = None
        incomplete = None
        if status in ("completed", "incomplete"):
            used = self.stream.usage
            reasoning_tokens = 0
            usage = {
                "input_tokens": used.prompt_tokens,
                "input_tokens_details": {"cached_tokens": used.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": used.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": used.total_tokens,
            }
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
        text_format = msgspec.to_builtins(body.text.format) if body.text is not None else {"type": "text"}
        tool_choice = msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": {"code": "server_error", "message": error.message} if error is not None else None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": self.output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": text_format},
            "tool_choice": tool_choice,
            "tools": [
                {"type": tool.type, "name": tool.name, "description": tool.description or None,
                 "parameters": tool.parameters or None, "strict": tool.strict if tool.strict is not UNSET else None}
                for tool in body.tools or ()
            ],  # fmt: skip
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "truncation": "disabled",
            "metadata": body.metadata or {},
        } | ({"user": body.user} if body.user is not None else {}) | ({"usage": usage} if usage is not None else {})

    @property
    def status(self) -> str:
        return "incomplete" if self.stream.choices[0].finish_reason == "length" else "completed"

    def build_output(self) -> None:
        """The output items of a finished stream (non-streamed answers)."""
        choice = self.stream.choices[0]
        if choice.reasoning:
            self.output.append(reasoning_item(new_id("rs"), choice.reasoning))
        if choice.text:
            self.output.append(message_item(new_id("msg"), choice.text, "completed"))
        for call in choice.tool_calls:
            self.output.append(function_call_item(new_id("fc"), call.id, call.function.name, call.function.arguments, "completed"))


def reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [output_text(text)] if text is not None else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def event(body: dict[str, Any]) -> bytes:
    return b"event: " + body["type"].encode() + b"\n" + sse(body)


class ResponseEvents(ChunkEvents):
    """The Responses stream: ``response.created`` and ``response.in_progress``; per output item
    ``output_item.added``, its parts and deltas, ``output_item.done``; ``response.completed``
    (or ``error`` then ``response.failed``). Each event carries a ``sequence_number``."""

    keepalive = None

    def __init__(self, streams: list[CompletionStream], chat: ChatCompletionRequest, builder: ResponseBuilder, keep):
        super().__init__(streams, chat)
        self.builder = builder
        self.keep = keep
        self.sequence = 0
        self.item: dict[str, Any] | None = None
        self.calls: set[int] = set()

    def emit(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event(body)

    def begin(self) -> list[bytes]:
        response = self.builder.object("in_progress")
        return [self.emit("response.created", response=response), self.emit("response.in_progress", response=response)]

    def _open(self, item: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self.item = item
        self.builder.output.append(item)
        index = len(self.builder.output) - 1
        events.append(self.emit("response.output_item.added", output_index=index, item=item))
        if item["type"] == "message":
            events.append(self.emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=output_text("")))
            item["content"].append(output_text(""))
        elif item["type"] == "reasoning":
            item["content"].append({"type": "reasoning_text", "text": ""})
        return events

    def _close(self) -> list[bytes]:
        item, self.item = self.item, None
        if item is None:
            return []
        index = len(self.builder.output) - 1
        item["status"] = "completed"
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=part["text"], logprobs=[]))
            events.append(self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part))
        elif item["type"] == "reasoning":
            item.pop("status")
            events.append(self.emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=item["content"][0]["text"]))
        else:
            events.append(self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index, name=item["name"], arguments=item["arguments"]))
        events.append(self.emit("response.output_item.done", output_index=index, item=item))
        return events

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        events: list[bytes] = []
        index = lambda: len(self.builder.output) - 1  # noqa: E731
        if chunk.reasoning:
            if self.item is None or self.item["type"] != "reasoning":
                item = reasoning_item(new_id("rs"), "")
                item["content"] = []
                item["status"] = "in_progress"
                events += self._open(item)
            self.item["content"][0]["text"] += chunk.reasoning
            events.append(self.emit("response.reasoning_text.delta", item_id=self.item["id"], output_index=index(), content_index=0, delta=chunk.reasoning))
        if chunk.text:
            if self.item is None or self.item["type"] != "message":
                events += self._open(message_item(new_id("msg"), None, "in_progress"))
            self.item["content"][0]["text"] += chunk.text
            events.append(self.emit("response.output_text.delta", item_id=self.item["id"], output_index=index(), content_index=0, delta=chunk.text, logprobs=[]))
        for delta in chunk.tool_calls or ():
            call = stream.choices[0].tool_calls[delta.index]
            if delta.index not in self.calls:
                self.calls.add(delta.index)
                events += self._open(function_call_item(new_id("fc"), call.id, call.function.name, "", "in_progress"))
            if delta.arguments:
                self.item["arguments"] += delta.arguments
                events.append(self.emit("response.function_call_arguments.delta", item_id=self.item["id"], output_index=index(), delta=delta.arguments))
        return events

    async def complete(self) -> None:
        self.closing = self._close()  # the items are whole before the response is stored
        await self.keep(self.builder, self.builder.status)

    def finish(self) -> list[bytes]:
        events = self.closing
        status = self.builder.status
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return events + [self.emit(kind, response=self.builder.object(status))]

    def error(self, error: LllmsError) -> list[bytes]:
        self.item = None
        return [
            self.emit("error", code=error.code, message=error.message, param=error.param),
            self.emit("response.failed", response=self.builder.object("failed", error)),
        ]

    def done(self) -> list[bytes]:
        return []


# --- routes --------------------------------------------------------------------------


def input_item_records(items: list[Any]) -> list[dict[str, Any]]:
    """This request's input items as ``input_items`` lists them (each with an id)."""
    records = []
    for item in items:
        record = msgspec.to_builtins(item)
        if isinstance(item, MessageItem):
            content = item.content if isinstance(item.content, list) else [InputText(text=item.content)]
            record["content"] = msgspec.to_builtins(content)
            record["status"] = "completed"
        record.setdefault("id", new_id({"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}[record["type"]]))
        records.append(record)
    return records


def reply_message(stream: CompletionStream) -> AssistantMessage:
    choice = stream.choices[0]
    return AssistantMessage(content=choice.text or None, tool_calls=choice.tool_calls or UNSET)


@api.post("/v1/responses")
async def create_response() -> Response:
    body = await read_request(CreateResponse)
    store = response_store()
    history: list[ChatMessage] = []
    if body.previous_response_id is not None:
        try:
            previous = await store.get(body.previous_response_id)
        except NotFoundError:
            raise InvalidRequestError(
                f"Previous response with id {body.previous_response_id!r} not found", param="previous_response_id"
            ) from None
        history = previous.messages
    items = input_items(body.input)
    chat = chat_request(body, history, items)
    server = state().server

    async def keep(builder: ResponseBuilder, status: str) -> None:
        if body.store:
            conversation = [m for m in chat.messages if not (body.instructions and m is chat.messages[0])]
            stored = StoredResponse(
                response=builder.object(status), input_items=input_item_records(items),
                messages=conversation + [reply_message(builder.stream)],
            )  # fmt: skip
            await store.put(stored)

    if body.stream:

        def events_of(streams: list[CompletionStream]) -> ResponseEvents:
            return ResponseEvents(streams, chat, ResponseBuilder(body, streams[0]), keep)

        return await stream_events(lambda: open_chat_stream(server, chat), events_of)
    [stream] = await complete(lambda: open_chat_stream(server, chat))
    builder = ResponseBuilder(body, stream)
    builder.build_output()
    await keep(builder, builder.status)
    return json_response(builder.object(builder.status))


@api.get("/v1/responses/<response_id>")
async def get_response(response_id: str) -> Response:
    stored = await response_store().get(response_id)
    return json_response(stored.response)


@api.delete("/v1/responses/<response_id>")
async def delete_response(response_id: str) -> Response:
    await response_store().delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


class InputItemsQuery(Struct, kw_only=True):
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


@api.get("/v1/responses/<response_id>/input_items")
async def list_input_items(response_id: str) -> Response:
    try:
        query = msgspec.convert(dict(request.args), InputItemsQuery, strict=False)
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
    stored = await response_store().get(response_id)
    items = stored.input_items if query.order == "asc" else stored.input_items[::-1]
    if query.after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(query.after) + 1 :] if query.after in ids else []
    page = items[: query.limit]
    return json_response({
        "object": "list", "data": page, "has_more": len(items) > len(page),
        "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
    })  # fmt: skip

