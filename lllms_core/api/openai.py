"""The OpenAI-compatible routes, mounted under ``/v1`` and ``/openai/v1``.

Requests are decoded into the core's request Structs and answered by the
:class:`~lllms_core.server.ModelServer`; this module only translates between
OpenAI's wire format and the facade. A streamed answer is produced by a task
of the request's own nursery (see :mod:`lllms_core.app`) that writes server-sent
events into a memory channel the response body reads, so a client that goes
away cancels generation and frees its slot at once.
"""

from __future__ import annotations

import base64
import logging
import math
import struct
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Callable

import msgspec
import trio
from quart import Blueprint, Response, current_app, request

from lllms_core.api.common import (
    SSE_DONE,
    SSE_KEEPALIVE,
    AppState,
    InternalError,
    json_response,
    read_request,
    sse,
    state,
)
from lllms_core.errors import InvalidRequestError, LllmsError, ModelNotFoundError
from lllms_core.schemas import (
    ChatCompletionRequest,
    CompletionChunk,
    EmbeddingRequest,
    TextCompletionRequest,
    TokenLogprob,
    Usage,
)
from lllms_core.server import CompletionStream

log = logging.getLogger("lllms.http")

PREFIXES = ("/v1", "/openai/v1")

api = Blueprint("openai", __name__)


# --- shapes ---------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def total_usage(streams: list[CompletionStream]) -> Usage:
    return sum((stream.usage for stream in streams[1:]), streams[0].usage)


def chat_logprobs(tokens: list[TokenLogprob] | None, top: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{content: [{token, logprob, bytes, top_logprobs}], refusal}``."""
    content = []
    for token in tokens or ():
        entry = msgspec.to_builtins(token)
        entry["top_logprobs"] = entry["top_logprobs"][:top]
        content.append(entry)
    return {"content": content, "refusal": None}


def text_logprobs(tokens: list[TokenLogprob] | None, top: int, offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs``; ``offset``: the text position of the first token."""
    tokens = tokens or []
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return {
        "tokens": [token.token for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [{top_token.token: top_token.logprob for top_token in token.top_logprobs[:top]} for token in tokens],
        "text_offset": offsets,
    }


def head(stream: CompletionStream, kind: str) -> dict[str, Any]:
    return {
        "id": stream.id,
        "object": kind,
        "created": stream.created,
        "model": stream.model,
        "system_fingerprint": stream.system_fingerprint,
    }


def chat_completion_body(stream: CompletionStream, chat: ChatCompletionRequest) -> dict[str, Any]:
    choices = []
    for choice in stream.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": choice.text if choice.text or not choice.tool_calls else None,
            "refusal": None,
        }
        if choice.reasoning:
            message["reasoning_content"] = message["reasoning"] = choice.reasoning
        if choice.tool_calls:
            message["tool_calls"] = msgspec.to_builtins(choice.tool_calls)
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": chat_logprobs(choice.logprobs, chat.top_logprobs or 0) if chat.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
        )
    return {**head(stream, "chat.completion"), "choices": choices, "usage": usage_body(stream.usage)}


def text_completion_body(streams: list[CompletionStream], completion: TextCompletionRequest) -> dict[str, Any]:
    choices = []
    for number, stream in enumerate(streams):
        offset = number * completion.choices  # each prompt's n choices follow the previous prompt's
        for choice in stream.choices:
            logprobs = None
            if completion.logprobs is not None:
                logprobs = text_logprobs(choice.logprobs, completion.logprobs, choice.logprobs_offset)
            choices.append(
                {
                    "index": offset + choice.index,
                    "text": choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
    return {
        **head(streams[0], "text_completion"),
        "choices": choices,
        "usage": usage_body(total_usage(streams)),
    }


class ChunkEvents:
    """Turns the chunks of one or more completion streams into OpenAI's stream events.

    Choice indexes of the second stream start after the first's, and so on (one
    stream per prompt of a completions request).
    """

    media_type = "text/event-stream"
    keepalive: bytes | None = SSE_KEEPALIVE
    """Sent while waiting for the first chunk (None: nothing)."""
    kind = ""
    usage_in_every_chunk = False
    """Chat chunks carry ``usage: null`` until the last when usage is asked for (OpenAI's
    chat stream does); legacy completion chunks leave it out, as their schema wants."""

    def __init__(self, streams: list[CompletionStream], request: Any):
        self.streams = streams
        self.request = request
        self.head = head(streams[0], self.kind)
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.offsets = {id(stream): index * request.choices for index, stream in enumerate(streams)}

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body = {**self.head, "choices": choices}
        if usage is not None or (self.include_usage and self.usage_in_every_chunk):
            body["usage"] = usage
        return sse(body)

    def begin(self) -> list[bytes]:
        """The events sent as soon as the request has its place in the queue."""
        return []

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        raise NotImplementedError

    async def complete(self) -> None:
        """Called once generation has ended well, before :meth:`finish` (to store what was made)."""

    def error(self, error: LllmsError) -> list[bytes]:
        """The events that end a stream after an error."""
        return [sse(error.to_dict())]

    def done(self) -> list[bytes]:
        """The events that end a complete stream, after :meth:`finish`'s."""
        return [SSE_DONE]

    def finish_choice(self, index: int, finish_reason: str) -> list[bytes]:
        raise NotImplementedError

    def finish(self) -> list[bytes]:
        """The events after the last chunk: each choice's finish reason, then the usage if asked."""
        events = []
        for stream in self.streams:
            for choice in stream.choices:
                events += self.finish_choice(self.offsets[id(stream)] + choice.index, choice.finish_reason)
        if self.include_usage:
            events.append(self.event([], usage_body(total_usage(self.streams))))
        return events


class ChatEvents(ChunkEvents):
    kind = "chat.completion.chunk"
    usage_in_every_chunk = True

    def __init__(self, streams: list[CompletionStream], request: ChatCompletionRequest):
        super().__init__(streams, request)
        self.opened: set[int] = set()
        self.calls: set[tuple[int, int]] = set()

    def _choice(self, index: int, delta: dict[str, Any], logprobs=None, finish_reason=None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _open(self, index: int) -> list[bytes]:
        """The first delta of a choice, which names the role."""
        if index in self.opened:
            return []
        self.opened.add(index)
        return [self.event([self._choice(index, {"role": "assistant", "content": "", "refusal": None})])]

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        index = self.offsets[id(stream)] + chunk.index
        events = self._open(index)
        if chunk.reasoning:
            delta = {"reasoning_content": chunk.reasoning, "reasoning": chunk.reasoning}
            events.append(self.event([self._choice(index, delta)]))
        if chunk.text or chunk.logprobs:
            logprobs = chat_logprobs(chunk.logprobs, self.request.top_logprobs or 0) if self.request.logprobs else None
            events.append(self.event([self._choice(index, {"content": chunk.text}, logprobs)]))
        for delta in chunk.tool_calls or ():
            # the core has already recorded the call, with the id it gave it if the engine gave none
            call = stream.choices[chunk.index].tool_calls[delta.index]
            if (index, delta.index) not in self.calls:
                self.calls.add((index, delta.index))
                start = {
                    "index": delta.index,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": ""},
                }
                events.append(self.event([self._choice(index, {"tool_calls": [start]})]))
            if delta.arguments:
                piece = {"index": delta.index, "function": {"arguments": delta.arguments}}
                events.append(self.event([self._choice(index, {"tool_calls": [piece]})]))
        return events

    def finish_choice(self, index: int, finish_reason: str) -> list[bytes]:
        return self._open(index) + [self.event([self._choice(index, {}, None, finish_reason)])]


class TextEvents(ChunkEvents):
    kind = "text_completion"

    def __init__(self, streams: list[CompletionStream], request: TextCompletionRequest):
        super().__init__(streams, request)
        self.positions: dict[int, int] = {}
        """Text offset of the next logprob token, per choice."""

    def chunk(self, stream: CompletionStream, chunk: CompletionChunk) -> list[bytes]:
        index = self.offsets[id(stream)] + chunk.index
        logprobs = None
        if self.request.logprobs is not None:
            # the stream recorded where the choice's first token with logprobs starts
            position = self.positions.get(index, stream.choices[chunk.index].logprobs_offset)
            logprobs = text_logprobs(chunk.logprobs, self.request.logprobs, position)
            if chunk.logprobs:
                self.positions[index] = position + sum(len(token.token) for token in chunk.logprobs)
        if not chunk.text and not chunk.logprobs:
            return []
        return [self.event([{"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": None}])]

    def finish_choice(self, index: int, finish_reason: str) -> list[bytes]:
        return [self.event([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}])]


# --- running completions ----------------------------------------------------------


@asynccontextmanager
async def open_text_streams(server, completion: TextCompletionRequest) -> AsyncIterator[list[CompletionStream]]:
    """One facade stream per prompt (the facade serves one prompt per call), all
    queued at once so that they run concurrently, each in its own slot."""
    async with AsyncExitStack() as stack:
        streams = []
        for prompt in completion.prompts:
            single = msgspec.structs.replace(completion, prompt=prompt)
            streams.append(await stack.enter_async_context(server.stream_text_completion(single)))
        yield streams


@asynccontextmanager
async def open_chat_stream(server, chat: ChatCompletionRequest) -> AsyncIterator[list[CompletionStream]]:
    async with server.stream_chat_completion(chat) as stream:
        yield [stream]


def account(app_state: AppState, streams: list[CompletionStream]) -> None:
    for stream in streams:
        if stream.first_token_at is not None:
            app_state.metrics.first_token(stream.model, stream.first_token_at - stream.started_at)
        app_state.metrics.tokens_generated(stream.model, stream.usage.completion_tokens)


async def complete(open_streams: Callable[[], Any]) -> list[CompletionStream]:
    """Run completions to their end (generation runs concurrently in the facade)."""
    async with open_streams() as streams:
        for stream in streams:
            async for _ in stream:
                pass
    account(state(), streams)
    return streams


async def stream_events(
    open_streams: Callable[[], Any],
    events_of: Callable[[list[CompletionStream]], ChunkEvents],
    media_type: str = ChunkEvents.media_type,
) -> Response:
    """A streamed response (``text/event-stream``, or the events' own ``media_type``). Errors
    found before anything is generated (unknown model, refused parameter, queue full) are
    raised here, as an HTTP error."""
    send, receive = trio.open_memory_channel(math.inf)
    nursery: trio.Nursery = request.scope["lllms.nursery"]
    await nursery.start(produce_events, open_streams, events_of, send, state(), request.scope["lllms.request_id"])
    return current_app.response_class(
        events_body(receive),
        mimetype=media_type,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def events_body(receive: trio.MemoryReceiveChannel) -> AsyncIterator[bytes]:
    """The response body: what :func:`produce_events` writes (quart-trio wants an async generator)."""
    async with receive:
        async for event in receive:
            yield event


async def produce_events(
    open_streams: Callable[[], Any],
    events_of: Callable[[list[CompletionStream]], ChunkEvents],
    send: trio.MemorySendChannel,
    app_state: AppState,
    request_id: str,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Write a completion's events into ``send``: the events' beginning, keep-alives while
    waiting for an instance, the chunks, the finish events, the end (``[DONE]``). An error
    during generation is sent as the events' error event, which ends the stream. A client
    that goes away closes the response body, which ends this quietly."""
    keepalive = app_state.server.config.http.keepalive_interval
    try:
        async with send:
            async with open_streams() as streams:
                task_status.started()
                events = events_of(streams)
                try:
                    for event in events.begin():
                        await send.send(event)
                    for stream in streams:
                        async for chunk in with_keepalive(stream, send, keepalive, events.keepalive):
                            for event in events.chunk(stream, chunk):
                                await send.send(event)
                    await events.complete()
                except LllmsError as error:
                    for event in events.error(app_state.public_error(error)):
                        await send.send(event)
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise  # the client went away
                except Exception:
                    log.exception("streaming failed", extra={"request_id": request_id})
                    error = InternalError(f"Internal server error (request id {request_id})")
                    for event in events.error(app_state.public_error(error)):
                        await send.send(event)
                    return
                for event in events.finish():
                    await send.send(event)
            account(app_state, streams)
            for event in events.done():
                await send.send(event)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("the client went away while streaming", extra={"request_id": request_id})


async def with_keepalive(stream: CompletionStream, send: trio.MemorySendChannel, interval: float, keepalive: bytes | None):
    """The stream's chunks; until the first one arrives, ``keepalive`` goes out every
    ``interval`` seconds (receiving from the stream is safe to cancel)."""
    waiting = stream.first_token_at is None and keepalive is not None
    while True:
        if waiting:
            with trio.move_on_after(interval) as timer:
                chunk = await anext(stream, None)
            if timer.cancelled_caught:
                await send.send(keepalive)
                continue
            waiting = False
        else:
            chunk = await anext(stream, None)
        if chunk is None:
            return
        yield chunk


# --- routes ---------------------------------------------------------------------


@api.post("/chat/completions")
async def chat_completions() -> Response:
    chat = await read_request(ChatCompletionRequest)
    server = state().server
    if chat.stream:
        return await stream_events(lambda: open_chat_stream(server, chat), lambda streams: ChatEvents(streams, chat))
    [stream] = await complete(lambda: open_chat_stream(server, chat))
    return json_response(chat_completion_body(stream, chat))


@api.post("/completions")
async def completions() -> Response:
    completion = await read_request(TextCompletionRequest)
    server = state().server
    if not completion.prompts:
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    if completion.stream:
        return await stream_events(
            lambda: open_text_streams(server, completion), lambda streams: TextEvents(streams, completion)
        )
    streams = await complete(lambda: open_text_streams(server, completion))
    return json_response(text_completion_body(streams, completion))


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@api.post("/embeddings")
async def embeddings() -> Response:
    embedding = await read_request(EmbeddingRequest)
    if not embedding.inputs:
        raise InvalidRequestError("`input` must not be empty", param="input")
    result = await state().server.embedding(embedding)
    data = [
        {"object": "embedding", "index": index, "embedding": encode_embedding(vector, embedding.encoding_format)}
        for index, vector in enumerate(result.embeddings)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json_response({"object": "list", "data": data, "model": embedding.model, "usage": usage})


def model_body(app_state: AppState, model_id: str) -> dict[str, Any]:
    model = app_state.server.config.models[model_id]
    return {"id": model.id, "object": "model", "created": app_state.created, "owned_by": model.engine}


@api.get("/models")
async def models() -> Response:
    app_state = state()
    return json_response({"object": "list", "data": [model_body(app_state, m) for m in app_state.server.config.models]})


@api.get("/models/<path:model_id>")
async def model(model_id: str) -> Response:
    app_state = state()
    if model_id not in app_state.server.config.models:
        raise ModelNotFoundError(f"The model {model_id!r} does not exist", param="model")
    return json_response(model_body(app_state, model_id))
