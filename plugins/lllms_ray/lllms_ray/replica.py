"""A replica of a model's deployment: a ModelServer with the model (or its group), in trio
beside the replica's asyncio loop (see :mod:`lllms_ray.portal`).

What a completion sends back to the ingress, in batches: :data:`ACCEPTED` once the
replica's pool has queued the request, the :class:`~lllms_core.schemas.CompletionChunk`\\ s,
then a :class:`~lllms_core.schemas.CompletionResult`, or a :class:`Failure` carrying the
:class:`~lllms_core.errors.LllmsError` the single-node server would have raised.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import msgspec
import trio

from lllms_core.config import Config
from lllms_core.errors import LllmsError, ModelLoadError
from lllms_core.schemas import CompletionResult
from lllms_core.server import ModelServer

from lllms_ray.portal import TrioPortal

ACCEPTED = "accepted"


class Failure:
    """An error the replica answered a request with (not a fault of the replica)."""

    def __init__(self, error: LllmsError):
        self.error = error


def replica_config(config: Config, model_ids: list[str]) -> Config:
    """The configuration one replica serves: its models, each prepared (downloaded and
    verified) before the replica takes requests."""
    models = {}
    for model_id in model_ids:
        model = config.models[model_id]
        if model.prepare != "blocking":
            model = msgspec.structs.replace(model, prepare="blocking")
        models[model_id] = model
    return msgspec.structs.replace(config, models=models)


class LoadFailures(logging.Handler):
    """The errors the pool and the store log while the replica starts."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def serve_models(server: ModelServer, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run ``server`` until cancelled; ready once every model is prepared and its
    ``min_instances`` loaded. A model that fails to, fails the replica: Ray Serve then
    starts another, and reports the deployment failed after a few attempts."""
    failures = LoadFailures()
    loggers = [logging.getLogger(name) for name in ("lllms.pool", "lllms.store")]
    for logger in loggers:
        logger.addHandler(failures)
    try:
        async with server:
            missing = unready_models(server)
            if not missing:
                for logger in loggers:
                    logger.removeHandler(failures)
                task_status.started()
                await trio.sleep_forever()
    finally:
        for logger in loggers:
            logger.removeHandler(failures)
    reason = failures.messages[-1] if failures.messages else "see the replica's log"
    raise ModelLoadError(f"model {missing[0]!r} did not load on this replica: {reason}")


def unready_models(server: ModelServer) -> list[str]:
    """Models not prepared, or with fewer loaded instances than ``min_instances``."""
    status = server.status()
    missing = []
    for model in server.config.models.values():
        loaded = sum(1 for i in status["instances"] if i["model"] == model.id and i["state"] in ("idle", "busy"))
        if status["models"][model.id]["state"] != "ready" or loaded < model.min_instances:
            missing.append(model.id)
    return missing


class ModelReplica:
    """The class of every model deployment (Ray Serve makes each replica an actor of it)."""

    async def __init__(self, config: Config, model_ids: list[str]):
        self.portal = await TrioPortal.start()
        self.server = ModelServer(replica_config(config, model_ids))
        await self.portal.start_soon(serve_models, self.server)

    async def generate(self, task_name: str, request: Any, routing_key: tuple[str, ...] = ()):
        """A chat or text completion: batches of messages (see the module's docstring).
        ``routing_key`` is for the router."""
        async for batch in self.portal.stream(self._complete, task_name, request):
            yield batch

    async def _complete(self, push: Callable[[Any], None], task_name: str, request: Any) -> None:
        open_stream = (
            self.server.stream_chat_completion if task_name == "chat-completion" else self.server.stream_text_completion
        )
        try:
            async with open_stream(request) as stream:
                push(ACCEPTED)
                async for chunk in stream:
                    push(chunk)
        except LllmsError as error:
            push(Failure(error))
            return
        push(
            CompletionResult(
                finish_reasons=[choice.finish_reason for choice in stream.choices],
                usage=stream.usage,
                stop_sequences=[choice.stop_sequence for choice in stream.choices],
            )
        )

    async def run(self, task_name: str, request: Any) -> Any:
        """A task answered at once (embedding, rerank, tokenize, transcription...): the
        ModelServer method of that name's result, or a Failure."""
        method = getattr(self.server, task_name.replace("-", "_"))
        try:
            return await self.portal.run(method, request)
        except LllmsError as error:
            return Failure(error)

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the router and the ingress's status report need: the contexts held and the
        replica's status report."""
        return await self.portal.run(self._report)

    async def _report(self) -> dict[str, Any]:
        return {"contexts": self.server.pool.context_keys(), "status": self.server.status()}

    async def check_health(self) -> None:
        if not self.portal.alive:
            raise RuntimeError(f"the replica's model server stopped: {self.portal.failure()}")

    async def __del__(self) -> None:
        await self.portal.stop()
