"""The ingress: lllms' own HTTP app (every route, SSE, errors, keys, limits) in front of
the models' deployments.

:class:`ClusterServer` is the :class:`~lllms_core.server.ModelServer` the app talks to:
it validates a request as one machine would (unknown model, refused parameters), then
sends it to the model's deployment instead of a local pool, and relays what the replica
answers into the same :class:`~lllms_core.server.CompletionStream` the routes read.
:class:`Ingress` is the deployment that runs it under hypercorn, in trio's guest mode
on the replica's asyncio loop.

A replica that fails (its actor dies) before a request has streamed anything costs the
request nothing: it is sent again, to another replica. A stream the client already
received tokens of ends with an error event instead.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import trio
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lllms_core.config import Config
from lllms_core.context import ContextKey, chat_key, text_key
from lllms_core.errors import LllmsError, QueueFullError, RequestTimeoutError, ServiceUnavailableError
from lllms_core.http import serve_async
from lllms_core.schemas import ChatCompletionRequest, CompletionChunk, CompletionResult, TextCompletionRequest
from lllms_core.server import CompletionStream, ModelServer

from lllms_ray.portal import TrioPortal
from lllms_ray.replica import ACCEPTED, Failure
from lllms_ray.status import ClusterPool

log = logging.getLogger("lllms.ray")

ATTEMPTS = 3
"""Replicas a request is sent to before a failure of its replica is the request's."""
REPLICA_WAIT = 60.0
"""Seconds a request for a model none of whose replicas runs waits for one (a replica
being replaced) before it is answered 503, instead of waiting for ever."""
REPLICA_FAILURES = (RayActorError, ActorUnavailableError)


class ReplicaFailedError(ServiceUnavailableError):
    code = "replica_failed"


class Resend(Exception):
    """The replica failed before the request's answer was given out: send it again."""


def routing_key(request: Any) -> ContextKey:
    """The context the request's prompt spells (all its messages): a replica holding a
    prefix of it continues from there."""
    if isinstance(request, ChatCompletionRequest):
        return chat_key(request.messages)
    if isinstance(request, TextCompletionRequest):
        prompt = request.prompts[0]
        return text_key(prompt) if isinstance(prompt, str) and len(request.prompts) == 1 else ()
    return ()


class ClusterServer(ModelServer):
    """A ModelServer whose models run in the deployments behind ``handles`` (model id →
    its deployment's handle)."""

    def __init__(self, config: Config, handles: dict[str, DeploymentHandle], portal: TrioPortal):
        super().__init__(config, wait_ready=False)
        self.handles = handles
        self.portal = portal

    async def __aenter__(self) -> "ClusterServer":
        self._stack = AsyncExitStack()
        self._generations = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(self._generations.cancel_scope.cancel)
        self.pool = ClusterPool(self.config, self.handles, self.portal)
        return self

    def status(self) -> dict[str, Any]:
        assert self.pool is not None
        return self.pool.status()

    async def report(self) -> dict[str, Any]:
        assert self.pool is not None
        return await self.pool.report()

    # --- completions --------------------------------------------------------------

    @asynccontextmanager
    async def _stream(
        self, task_name: str, request: Any, key_of, callers: tuple[str, ...] = ()
    ) -> AsyncIterator[CompletionStream]:
        # ``callers``: none from the ingress (composed engines call their models on their replica)
        model, engine, task, request = self._resolve(task_name, request, callers)
        stream = CompletionStream(model.id, request.choices, self.fingerprints[model.id])
        scope = trio.CancelScope()
        # returns once a replica has queued the request: its refusal is raised here, before
        # anything streams, as on one machine
        await self._generations.start(self._generate_remotely, model.id, task_name, request, stream, scope)
        try:
            yield stream
        finally:
            scope.cancel()  # the consumer is gone: the replica stops generating

    async def _generate_remotely(self, model_id, task_name, request, stream: CompletionStream, scope, task_status) -> None:
        relay = Relay(stream, task_status, live=bool(request.stream))
        with scope:
            try:
                with self._deadline():
                    for _ in range(ATTEMPTS):
                        await self._wait_for_a_replica(model_id)
                        try:
                            result = await self._attempt(model_id, task_name, request, relay)
                        except Resend:
                            log.warning("a replica of %r failed; sending the request again", model_id)
                            continue
                        stream._finish(result)
                        return
                    raise ReplicaFailedError(f"the replicas of model {model_id!r} failed {ATTEMPTS} times in a row")
            except trio.TooSlowError:
                error: LllmsError = RequestTimeoutError(
                    f"the request took longer than {self.config.server.request_timeout} s"
                )
            except LllmsError as failure:
                error = failure
            if not relay.accepted:
                raise error  # from nursery.start: the route answers it with its status
            stream._fail(error)

    async def _wait_for_a_replica(self, model_id: str) -> None:
        """Return once the model's deployment has a running replica; a deployment that may
        scale to zero starts one for a request, so it is not waited for."""
        if self.config.models[model_id].replicas.min == 0:
            return
        with trio.move_on_after(REPLICA_WAIT):
            while not self.pool.running(model_id):
                await trio.sleep(0.25)
            return
        raise ReplicaFailedError(f"no replica of model {model_id!r} has run for {REPLICA_WAIT:g} s; try again later")

    async def _attempt(self, model_id, task_name, request, relay: "Relay") -> CompletionResult:
        """Send the request to a replica and relay its answer."""
        handle = self.handles[model_id].options(stream=True)
        relay.held = []
        try:
            async with self.portal.relay(remote_stream, handle, task_name, request, routing_key(request)) as batches:
                async for batch in batches:
                    for message in batch:
                        if message == ACCEPTED:
                            relay.accept()
                        elif isinstance(message, CompletionChunk):
                            relay.chunk(message)
                        elif isinstance(message, CompletionResult):
                            relay.flush()
                            return message
                        elif isinstance(message, Failure):
                            raise message.error
        except BackPressureError:
            raise QueueFullError(f"too many requests are waiting for model {model_id!r}; try again later") from None
        except REPLICA_FAILURES as failure:
            if relay.pushed:
                raise ReplicaFailedError(
                    f"the replica generating this answer failed ({type(failure).__name__}); the answer is incomplete"
                ) from None
            raise Resend() from None
        raise Resend()  # the replica's stream ended without an answer

    # --- other tasks -----------------------------------------------------------------

    async def _run(self, task_name: str, request: Any, callers: tuple[str, ...] = (), method: str | None = None):
        # ``method`` (the core's own way of doing a task) runs on the replica: it is asked
        # for the task, as a ModelServer is, and does it as one does
        model, engine, task, request = self._resolve(task_name, request, callers)
        handle = self.handles[model.id]
        try:
            with self._deadline():
                for _ in range(ATTEMPTS):
                    await self._wait_for_a_replica(model.id)
                    try:
                        answer = await self.portal.run_asyncio(remote_call, handle, task_name, request)
                    except BackPressureError:
                        raise QueueFullError(f"too many requests are waiting for model {model.id!r}; try again later") from None
                    except REPLICA_FAILURES:
                        log.warning("a replica of %r failed; sending the request again", model.id)
                        continue
                    if isinstance(answer, Failure):
                        raise answer.error
                    return answer
        except trio.TooSlowError:
            raise RequestTimeoutError(f"the request took longer than {self.config.server.request_timeout} s") from None
        raise ReplicaFailedError(f"the replicas of model {model.id!r} failed {ATTEMPTS} times in a row")


class Relay:
    """Where a replica's answer goes: the stream the route reads. A streamed request gets
    chunks as they come; another gets them all at the end, so that a replica failing on
    the way costs nothing but the time (the request is sent again)."""

    def __init__(self, stream: CompletionStream, task_status, live: bool):
        self.stream = stream
        self.task_status = task_status
        self.live = live
        self.accepted = False
        self.pushed = False
        self.held: list[CompletionChunk] = []

    def accept(self) -> None:
        if not self.accepted:
            self.accepted = True
            self.task_status.started()

    def chunk(self, chunk: CompletionChunk) -> None:
        if self.live:
            self.stream._push(chunk)
            self.pushed = True
        else:
            self.held.append(chunk)

    def flush(self) -> None:
        for chunk in self.held:
            self.stream._push(chunk)
        self.held = []


async def remote_stream(handle: DeploymentHandle, task_name: str, request: Any, key: ContextKey):
    """The batches a replica answers a completion with; cancelled, the replica's generation is."""
    response = handle.generate.remote(task_name, request, routing_key=key)
    try:
        async for batch in response:
            yield batch
    except asyncio.CancelledError:
        response.cancel()
        raise


async def remote_call(handle: DeploymentHandle, task_name: str, request: Any) -> Any:
    response = handle.run.remote(task_name, request)
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class Ingress:
    """The deployment serving the HTTP API on ``http.host``/``http.port`` of its node."""

    async def __init__(self, config: Config, handles: dict[str, DeploymentHandle]):
        self.portal = await TrioPortal.start()
        self.server = ClusterServer(config, handles, self.portal)
        self.port = await self.portal.start_soon(serve_async, self.server)
        log.info("serving on %s:%s", config.http.host, self.port)

    async def url(self) -> str:
        """The HTTP API's base URL (with the port bound, if ``http.port`` was 0)."""
        host = self.server.config.http.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def check_health(self) -> None:
        if not self.portal.alive:
            raise RuntimeError(f"the HTTP server stopped: {self.portal.failure()}")

    async def __del__(self) -> None:
        await self.portal.stop()
