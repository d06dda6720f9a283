"""The ``forward`` engine: serves the models of another OpenAI-compatible server.

Each request goes to the other server as a streamed request; its events become this
engine's chunks, its finish reasons and usage this engine's result. Cancelling a request
closes the connection, so the other server stops too. Uses only ``lllms_core.plugin_api``.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

import httpx
import msgspec
import trio

from lllms_core.plugin_api import (
    ChatCompletionRequest,
    CompletionChunk,
    CompletionResult,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineInstance,
    LllmsError,
    RequestTimeoutError,
    TaskContext,
    TextCompletionRequest,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
    hookimpl,
    normalize_embedding,
)


class ForwardOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of a ``forward`` model (keys of its model table)."""

    base_url: str
    """The other server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
    upstream_model: str | None = None
    """The model's name there; default: this model's id."""
    api_key: str | None = None
    slots: int = 4
    """Requests forwarded at once."""
    timeout: float = 600


class UpstreamError(LllmsError):
    """The other server refused or failed a request: its own 4xx (status, param and code
    kept), or 502 for what it could not answer."""

    type = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status


class ForwardInstance(EngineInstance):
    client: httpx.AsyncClient
    upstream_model: str

    def info(self) -> dict[str, Any]:
        return {"base_url": str(self.client.base_url), "upstream_model": self.upstream_model}


class ForwardEngine(Engine):
    name = "forward"
    tasks = frozenset({"chat-completion", "text-completion", "embedding"})
    default_task = "chat-completion"
    options = ForwardOptions
    capabilities = frozenset(
        {"temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "logit_bias",
         "n", "logprobs", "json_object", "json_schema", "tools", "echo"}
    )  # fmt: skip
    needs_model_file = False

    async def create_instance(self, model, prepared, device) -> ForwardInstance:
        options: ForwardOptions = model.options
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        client = httpx.AsyncClient(base_url=options.base_url.rstrip("/"), headers=headers, timeout=options.timeout)
        return ForwardInstance(
            slots=options.slots,
            limiter=trio.CapacityLimiter(options.slots),
            client=client,
            upstream_model=options.upstream_model or model.id,
        )

    async def dispose_instance(self, instance: ForwardInstance) -> None:
        await instance.client.aclose()

    # --- tasks ----------------------------------------------------------------------

    async def chat_completion(self, context: TaskContext, request: ChatCompletionRequest, sink) -> CompletionResult:
        finished = Finished(request.choices)

        async def on_event(event: dict[str, Any]) -> None:
            finished.note(event)
            for choice in event.get("choices", ()):
                delta = choice.get("delta") or {}
                calls = [
                    ToolCallDelta(
                        index=call["index"],
                        id=call.get("id"),
                        name=(call.get("function") or {}).get("name"),
                        arguments=(call.get("function") or {}).get("arguments") or "",
                    )
                    for call in delta.get("tool_calls") or ()
                ]
                logprobs = msgspec.convert((choice.get("logprobs") or {}).get("content") or [], list[TokenLogprob])
                if delta.get("content") or calls or logprobs:
                    await sink.send(CompletionChunk(index=choice["index"], text=delta.get("content") or "",
                                                    tool_calls=calls or None, logprobs=logprobs or None))  # fmt: skip

        await self._stream(context, "/chat/completions", request, on_event)
        return finished.result()

    async def text_completion(self, context: TaskContext, request: TextCompletionRequest, sink) -> CompletionResult:
        finished = Finished(request.choices)

        async def on_event(event: dict[str, Any]) -> None:
            finished.note(event)
            for choice in event.get("choices", ()):
                logprobs = legacy_logprobs(choice.get("logprobs"))
                if choice.get("text") or logprobs:
                    await sink.send(CompletionChunk(index=choice["index"], text=choice.get("text") or "", logprobs=logprobs or None))

        await self._stream(context, "/completions", request, on_event)
        return finished.result()

    async def embedding(self, context: TaskContext, request: EmbeddingRequest) -> EmbeddingResult:
        body = {**self._body(context, request), "encoding_format": "float"}
        response = await self._post(context.instance, "/embeddings", body)
        answer = response.json()
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
        return EmbeddingResult(
            embeddings=[normalize_embedding(vector) for vector in vectors],
            prompt_tokens=answer.get("usage", {}).get("prompt_tokens", 0),
        )

    # --- talking to the other server ----------------------------------------------------

    @staticmethod
    def _body(context: TaskContext, request: Any) -> dict[str, Any]:
        body = msgspec.to_builtins(request)
        plugin_parameters = body.pop("plugin_parameters", None) or {}
        return {**body, **plugin_parameters, "model": context.instance.upstream_model}

    async def _stream(
        self, context: TaskContext, path: str, request: Any, on_event: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        """Send ``request`` to the other server as a streamed request; ``on_event`` gets each JSON event."""
        body = {**self._body(context, request), "stream": True, "stream_options": {"include_usage": True}}
        instance: ForwardInstance = context.instance
        try:
            async with instance.client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise refusal(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:  # the other server failed after its answer began
                        raise UpstreamError(f"the upstream server failed: {event['error'].get('message')}")
                    await on_event(event)
        except httpx.TimeoutException:
            raise RequestTimeoutError(f"the upstream server took longer than {instance.client.timeout.read} s") from None
        except httpx.HTTPError as error:
            raise UpstreamError(f"the upstream server cannot be reached: {type(error).__name__}") from None

    async def _post(self, instance: ForwardInstance, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            response = await instance.client.post(path, json=body)
        except httpx.TimeoutException:
            raise RequestTimeoutError(f"the upstream server took longer than {instance.client.timeout.read} s") from None
        except httpx.HTTPError as error:
            raise UpstreamError(f"the upstream server cannot be reached: {type(error).__name__}") from None
        if response.status_code >= 400:
            raise refusal(response)
        return response


class Finished:
    """The finish reason of each choice and the usage, as the events tell them."""

    def __init__(self, choices: int):
        self.reasons: list[str] = ["stop"] * choices
        self.usage = Usage()

    def note(self, event: dict[str, Any]) -> None:
        for choice in event.get("choices", ()):
            if choice.get("finish_reason"):
                self.reasons[choice["index"]] = choice["finish_reason"]
        if event.get("usage"):
            usage = event["usage"]
            self.usage = Usage(
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            )

    def result(self) -> CompletionResult:
        return CompletionResult(finish_reasons=self.reasons, usage=self.usage)


def refusal(response: httpx.Response) -> UpstreamError:
    """The other server's error response as an error of this engine: a 4xx keeps its status,
    ``param`` and ``code``; anything else is a 502."""
    try:
        error = response.json()["error"]
        message, param, code = error["message"], error.get("param"), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, param, code = response.text[:200], None, None
    status = response.status_code if 400 <= response.status_code < 500 else 502
    return UpstreamError(f"upstream server: {message}", status=status, param=param, code=code)


def legacy_logprobs(logprobs: dict[str, Any] | None) -> list[TokenLogprob]:
    """The legacy completions ``logprobs`` (parallel lists) as one TokenLogprob per token."""
    if not logprobs:
        return []
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    return [
        TokenLogprob(
            token=token,
            logprob=logprob,
            bytes=list(token.encode()),
            top_logprobs=[TopLogprob(token=other, logprob=value, bytes=list(other.encode())) for other, value in (top or {}).items()],
        )
        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)
    ]


@hookimpl
def register_engines(register):
    register(ForwardEngine)
