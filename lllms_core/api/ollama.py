"""Ollama's API: ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``, ``/api/pull``.

An adapter over the core's requests, like the other APIs: answers stream as NDJSON by
default (``"stream": false`` for one JSON body); ``options`` map to the core's sampling
parameters; ``keep_alive`` sets how long the serving instance stays loaded once idle.
Errors have Ollama's shape ``{"error": "..."}``. Model names may carry Ollama's default
tag: ``smollm2:latest`` is the model ``smollm2``.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Any, Literal, Union

import msgspec
import trio
from msgspec import UNSET, Struct, UnsetType
from quart import Blueprint, Response, request

from lllms_core.api.common import error_shape, json_response, read_request, state
from lllms_core.api.openai import ChunkEvents, complete, open_chat_stream, open_text_streams, stream_events
from lllms_core.errors import InvalidRequestError, LllmsError, ModelNotFoundError
from lllms_core.images import image_part
from lllms_core.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    CompletionChunk,
    EmbeddingRequest,
    FunctionCall,
    JsonSchemaFormat,
    ReasoningEffort,
    Request,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    SystemMessage,
    TextCompletionRequest,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    ToolMessage,
    UserMessage,
)
from lllms_core.server import CompletionStream

api = Blueprint("ollama", __name__)

NDJSON = "application/x-ndjson"


@error_shape("/api")
def ollama_error(error: LllmsError) -> dict[str, Any]:
    return {"error": error.message}


# --- requests ------------------------------------------------------------------------

Duration = Union[float, str]
"""Seconds, or a Go duration such as ``"5m"``, ``"1h30m"``, ``"-1"``."""


class Options(Struct, kw_only=True):
    """Ollama's ``options``: those lllms maps; the others (threads, GPU layers, mirostat...)
    are accepted and ignored, as Ollama does with options that do not apply."""

    num_ctx: int | None = None
    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty")


class OllamaFunction(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(Struct, kw_only=True):
    function: OllamaFunction
    id: str | UnsetType = UNSET


class OllamaMessage(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    thinking: str | None = None


class Generation(Request, kw_only=True, omit_defaults=True):
    model: str
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: Duration | None = None
    think: bool | ReasoningEffort | None = None


class ChatBody(Generation, kw_only=True, omit_defaults=True):
    messages: list[OllamaMessage] = []
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    """Non-spec (Ollama has none): OpenAI's ``tool_choice``, e.g. ``"required"``."""
    parallel_tool_calls: bool | None = None
    """Non-spec, as in OpenAI's chat."""


class GenerateBody(Generation, kw_only=True, omit_defaults=True):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedBody(Request, kw_only=True, omit_defaults=True):
    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: Duration | None = None


class ModelBody(Request, kw_only=True, omit_defaults=True):
    model: str = ""
    name: str = ""
    """The older spelling of ``model``."""
    stream: bool = True


DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(value: Duration | None) -> float | None:
    """``keep_alive`` in seconds; negative: forever."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = DURATION_PART.findall(body)
    if not parts or "".join(number + unit for number, unit in parts) != body:
        raise InvalidRequestError(f"keep_alive {value!r} is not a duration (like 5m, 1h, 30s or -1)", param="keep_alive")
    return sign * sum(float(number) * UNITS[unit] for number, unit in parts)


def model_id(name: str) -> str:
    """The configured model an Ollama name means (``name:latest`` is ``name``)."""
    models = state().server.config.models
    if name in models or not name.endswith(":latest"):
        return name
    return name.removesuffix(":latest")


def sampling(body: Generation) -> dict[str, Any]:
    values: dict[str, Any] = {"model": model_id(body.model), "keep_alive": seconds(body.keep_alive)}
    options = body.options or Options()
    for name in SAMPLING:
        value = getattr(options, name)
        if value is not None:
            values[name] = value
    if options.num_predict is not None and options.num_predict > 0:
        values["max_tokens"] = options.num_predict
    return values


def response_format(value: str | dict[str, Any] | None) -> Any:
    if value in (None, ""):
        return None
    if value == "json":
        return ResponseFormatJsonObject()
    if isinstance(value, dict):
        return ResponseFormatJsonSchema(json_schema=JsonSchemaFormat(name="format", schema=value))
    raise InvalidRequestError(f"format must be \"json\" or a JSON schema, not {value!r}", param="format")


def refuse_images(images: list[str] | None, where: str) -> None:
    if images:
        raise InvalidRequestError("images are read in user messages only", param=where)


def user_content(text: str, images: list[str] | None, where: str) -> str | list:
    """A user message's text and its images (base64, any image type: the core decodes them)."""
    if not images:
        return text
    parts: list[Any] = [TextPart(text=text)] if text else []
    return parts + [image_part(data=image, media_type="image/*", param=f"{where}[{n}]") for n, image in enumerate(images)]


def chat_messages(messages: list[OllamaMessage]) -> list[ChatMessage]:
    """Ollama's messages in the core's terms. Ollama's tool calls carry no ids: each gets one
    from its position, and tool results answer the calls before them in order."""
    converted: list[ChatMessage] = []
    unanswered: list[str] = []
    for number, message in enumerate(messages):
        if message.role != "user":
            refuse_images(message.images, f"messages[{number}].images")
        if message.role == "assistant":
            calls = []
            for position, call in enumerate(message.tool_calls or ()):
                arguments = call.function.arguments
                call_id = call.id if call.id is not UNSET else f"call_{number}_{position}"
                calls.append(ToolCall(id=call_id, function=FunctionCall(
                    name=call.function.name, arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
                )))  # fmt: skip
            unanswered = [call.id for call in calls]
            converted.append(AssistantMessage(content=message.content or None, tool_calls=calls or UNSET))
        elif message.role == "tool":
            call_id = message.tool_call_id or (unanswered.pop(0) if unanswered else message.tool_name or "call")
            converted.append(ToolMessage(content=message.content, tool_call_id=call_id))
        elif message.role == "system":
            converted.append(SystemMessage(content=message.content))
        else:
            converted.append(UserMessage(content=user_content(message.content, message.images, f"messages[{number}].images")))
    return converted


def reasoning(body: Generation) -> dict[str, Any]:
    return {"reasoning_effort": body.think} if isinstance(body.think, str) else {}


# --- answers -----------------------------------------------------------------------


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def done_reason(stream: CompletionStream) -> str:
    return {"length": "length", "tool_calls": "stop"}.get(stream.choices[0].finish_reason, "stop")


def counts(stream: CompletionStream) -> dict[str, Any]:
    """The final line's statistics, in nanoseconds as Ollama gives them."""
    now = time.perf_counter()
    first = stream.first_token_at or now
    return {
        "done_reason": done_reason(stream),
        "total_duration": int((now - stream.started_at) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": stream.usage.prompt_tokens,
        "prompt_eval_duration": int((first - stream.started_at) * 1e9),
        "eval_count": stream.usage.completion_tokens,
        "eval_duration": int((now - first) * 1e9),
    }


def ollama_calls(stream: CompletionStream) -> list[dict[str, Any]]:
    calls = []
    for call in stream.choices[0].tool_calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = {}
        calls.append({"id": call.id, "function": {"name": call.function.name, "arguments": arguments}})
    return calls


def line(body: dict[str, Any]) -> bytes:
    return msgspec.json.encode(body) + b"\n"


class OllamaEvents(ChunkEvents):
    """NDJSON lines: one per chunk (``done: false``), then a last line with ``done: true`` and
    the statistics. Tool calls go out whole, in a line of their own before the last."""

    media_type = NDJSON
    keepalive = None
    field = "message"

    def __init__(self, streams: list[CompletionStream], model: str):
        self.stream = streams[0]
        self.model = model

    def body(self, text: str, reasoning: str = "", **extra: Any) -> dict[str, Any]:
        if self.field == "message":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reasoning:
                message["thinking"] = reasoning
            return {"model": self.model, "created_at": created_at(), "message": message, **extra}
        body = {"model": self.model, "created_at": created_at(), "response": text, **extra}
        if reasoning:
            body["thinking"] = reasoning
        return body

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        if not chunk.text and not chunk.reasoning:
            return []
        return [line({**self.body(chunk.text, chunk.reasoning), "done": False})]

    def finish(self) -> list[bytes]:
        lines = []
        if self.stream.choices[0].tool_calls:
            body = self.body("")
            body["message"]["tool_calls"] = ollama_calls(self.stream)
            lines.append(line({**body, "done": False}))
        return lines + [line({**self.body(""), "done": True, **counts(self.stream)})]

    def error(self, error: LllmsError) -> list[bytes]:
        return [line(ollama_error(error))]

    def done(self) -> list[bytes]:
        return []


class GenerateEvents(OllamaEvents):
    field = "response"

    def finish(self) -> list[bytes]:
        return [line({**self.body(""), "done": True, "context": [], **counts(self.stream)})]


async def answer(open_streams, events_of, body: Generation, whole) -> Response:
    if body.stream:
        return await stream_events(open_streams, events_of, media_type=NDJSON)
    [stream] = await complete(open_streams)
    return json_response(whole(stream))


@api.post("/api/chat")
async def chat() -> Response:
    body = await read_request(ChatBody)
    if not body.messages:
        return await load_or_unload(body, "message")
    chat_request = ChatCompletionRequest(
        messages=chat_messages(body.messages), tools=body.tools, tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls, response_format=response_format(body.format),
        **sampling(body), **reasoning(body),
    )  # fmt: skip
    server = state().server

    def whole(stream: CompletionStream) -> dict[str, Any]:
        choice = stream.choices[0]
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.reasoning:
            message["thinking"] = choice.reasoning
        if choice.tool_calls:
            message["tool_calls"] = ollama_calls(stream)
        return {"model": body.model, "created_at": created_at(), "message": message, "done": True, **counts(stream)}

    return await answer(
        lambda: open_chat_stream(server, chat_request), lambda streams: OllamaEvents(streams, body.model), body, whole
    )


@api.post("/api/generate")
async def generate() -> Response:
    body = await read_request(GenerateBody)
    if not body.prompt and body.suffix is None:
        return await load_or_unload(body, "response")
    server = state().server
    if body.raw or body.suffix is not None:
        refuse_images(body.images, "images")  # a raw prompt has no place for them
        text = TextCompletionRequest(prompt=body.prompt, suffix=body.suffix, **sampling(body))
        if body.format:
            raise InvalidRequestError("format needs a chat prompt: it cannot be combined with raw or suffix", param="format")

        def open_streams():
            return open_text_streams(server, text)
    else:
        messages: list[ChatMessage] = [SystemMessage(content=body.system)] if body.system else []
        chat_request = ChatCompletionRequest(
            messages=[*messages, UserMessage(content=user_content(body.prompt, body.images, "images"))], response_format=response_format(body.format),
            **sampling(body), **reasoning(body),
        )  # fmt: skip

        def open_streams():
            return open_chat_stream(server, chat_request)

    def whole(stream: CompletionStream) -> dict[str, Any]:
        choice = stream.choices[0]
        result = {"model": body.model, "created_at": created_at(), "response": choice.text, "done": True, "context": [], **counts(stream)}
        if choice.reasoning:
            result["thinking"] = choice.reasoning
        return result

    return await answer(open_streams, lambda streams: GenerateEvents(streams, body.model), body, whole)


async def load_or_unload(body: Generation, field: str) -> Response:
    """An empty prompt loads the model (``keep_alive: 0`` unloads it), as Ollama's does."""
    server = state().server
    model = server.config.models.get(model_id(body.model))
    if model is None:
        raise ModelNotFoundError(f"model {body.model!r} not found", param="model")
    keep = seconds(body.keep_alive)
    unloading = keep == 0
    if unloading:
        for instance in list(server.pool.instances.values()):
            if instance.model is model:
                instance.keep_alive = 0.0
                instance.poke()
    else:
        async with server.pool.acquire(model.id) as slot:
            if keep is not None:
                slot.instance.keep_alive = math.inf if keep < 0 else keep
    empty = {"role": "assistant", "content": ""} if field == "message" else ""
    return json_response({
        "model": body.model, "created_at": created_at(), field: empty, "done": True,
        "done_reason": "unload" if unloading else "load",
    })  # fmt: skip


@api.post("/api/embed")
async def embed() -> Response:
    body = await read_request(EmbedBody)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    started = time.perf_counter()
    result = await state().server.embedding(
        EmbeddingRequest(model=model_id(body.model), input=inputs, dimensions=body.dimensions, keep_alive=seconds(body.keep_alive))
    )
    return json_response({
        "model": body.model, "embeddings": result.embeddings, "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": 0, "prompt_eval_count": result.prompt_tokens,
    })  # fmt: skip


# --- models ------------------------------------------------------------------------


def details(model) -> dict[str, Any]:
    return {
        "parent_model": "", "format": "gguf" if model.engine in ("llamacpp", "gpt4all") else model.engine,
        "family": model.engine, "families": [model.engine], "parameter_size": "", "quantization_level": "",
    }  # fmt: skip


def capabilities(model) -> list[str]:
    return {
        "chat-completion": ["completion", "tools"], "text-completion": ["completion"],
        "embedding": ["embedding"], "rerank": ["rerank"],
    }.get(model.task, [model.task])  # fmt: skip


def file_facts(model) -> tuple[int, str, str]:
    """Size, modification time (ISO) and a digest-like id of a model's file, where known."""
    store = state().server.store
    try:
        location = store.location(model)
    except LllmsError:
        location = None
    size, modified = 0, datetime.fromtimestamp(state().created, timezone.utc)
    if location is not None and location.is_file():
        stat = location.stat()
        size, modified = stat.st_size, datetime.fromtimestamp(stat.st_mtime, timezone.utc)
    digest = model.sha256 or msgspec.json.encode(model.id).hex().ljust(64, "0")[:64]
    return size, modified.isoformat().replace("+00:00", "Z"), digest


def listed(model) -> dict[str, Any]:
    size, modified, digest = file_facts(model)
    return {"name": model.id, "model": model.id, "modified_at": modified, "size": size, "digest": digest, "details": details(model)}


@api.get("/api/tags")
async def tags() -> Response:
    models = state().server.config.models.values()
    return json_response({"models": [await trio.to_thread.run_sync(listed, model) for model in models]})


def configured(body: ModelBody):
    name = body.model or body.name
    model = state().server.config.models.get(model_id(name))
    if model is None:
        raise ModelNotFoundError(f"model {name!r} not found", param="model")
    return model


@api.post("/api/show")
async def show() -> Response:
    model = configured(await read_request(ModelBody))
    size, modified, _ = await trio.to_thread.run_sync(file_facts, model)
    options = msgspec.to_builtins(model.options) if model.options is not None else {}
    parameters = "\n".join(f"{name} {value}" for name, value in {**model.completion_defaults, **options}.items())
    return json_response({
        "modelfile": f"# lllms model {model.id!r} (engine {model.engine})", "parameters": parameters, "template": "",
        "details": details(model), "model_info": {"general.architecture": model.engine, "lllms.task": model.task, "lllms.size": size},
        "capabilities": capabilities(model), "modified_at": modified,
    })  # fmt: skip


@api.get("/api/ps")
async def running() -> Response:
    server = state().server
    entries = []
    now = trio.current_time()
    for instance in list(server.pool.instances.values()):
        model = instance.model
        ttl = model.ttl if instance.keep_alive is None else instance.keep_alive
        remaining = 0.0 if instance.idle is False else max(0.0, instance.last_used + ttl - now)
        expires = "2318-01-01T00:00:00Z" if math.isinf(ttl) else datetime.fromtimestamp(time.time() + remaining, timezone.utc).isoformat().replace("+00:00", "Z")
        size, _, digest = await trio.to_thread.run_sync(file_facts, model)
        entries.append({
            "name": model.id, "model": model.id, "size": size, "digest": digest, "details": details(model),
            "expires_at": expires, "size_vram": size if instance.device.gpu else 0,
        })  # fmt: skip
    return json_response({"models": entries})


@api.get("/api/version")
async def server_version() -> Response:
    return json_response({"version": version("lllms")})


@api.post("/api/pull")
async def pull() -> Response:
    """Download and verify a configured model, with progress from the model store."""
    body = await read_request(ModelBody)
    model = configured(body)
    server = state().server

    async def prepare() -> str | None:
        try:
            await server.store.prepare(model)
        except LllmsError as error:
            return error.message
        return None

    if not body.stream:
        failure = await prepare()
        if failure is not None:
            raise InvalidRequestError(failure)
        return json_response({"status": "success"})

    send, receive = trio.open_memory_channel(math.inf)
    nursery: trio.Nursery = request.scope["lllms.nursery"]

    async def report() -> None:
        async with send:
            await send.send(line({"status": "pulling manifest"}))
            outcome: list[str | None] = []

            async def run() -> None:
                outcome.append(await prepare())

            async with trio.open_nursery() as inner:
                inner.start_soon(run)
                while not outcome:
                    for download in server.store.status().get(model.id, {}).get("downloads", []):
                        await send.send(line({
                            "status": f"pulling {download['file']}", "digest": download["url"],
                            "total": download["total"] or 0, "completed": download["downloaded"],
                        }))  # fmt: skip
                    with trio.move_on_after(0.25):
                        while not outcome:
                            await trio.sleep(0.02)
            if outcome[0] is not None:
                await send.send(line({"error": outcome[0]}))
                return
            await send.send(line({"status": "verifying sha256 digest"}))
            await send.send(line({"status": "success"}))

    nursery.start_soon(report)

    async def body_lines():
        async with receive:
            async for data in receive:
                yield data

    return Response(body_lines(), mimetype=NDJSON)

