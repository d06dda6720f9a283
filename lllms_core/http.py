"""Serve the HTTP API from Python: ``serve(config)`` blocks, ``await serve_async(config)``
runs inside a trio program.

Both run hypercorn's trio worker in-process. On SIGTERM or SIGINT (when running in
the main thread) the server stops accepting connections, lets requests in flight
finish for up to ``http.shutdown_grace`` seconds, cancels what is left, disposes
every model instance and returns; a second signal cancels at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from lllms_core.app import create_app
from lllms_core.config import Config
from lllms_core.server import ModelServer

log = logging.getLogger("lllms.http")


def hypercorn_config(config: Config, host: str, port: int) -> hypercorn.config.Config:
    hyper = hypercorn.config.Config()
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.graceful_timeout = config.http.shutdown_grace
    # a ModelServer that waits for its start-up models is entered during hypercorn's start-up,
    # which then takes as long as loading (and downloading) them
    hyper.startup_timeout = math.inf
    hyper.accesslog = None  # lllms.http logs each request, with its id
    hyper.errorlog = logging.getLogger("lllms.hypercorn")
    return hyper


async def serve_async(
    config: ModelServer | Config | dict | str | os.PathLike | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or stopped by a signal. ``host``/``port`` override the
    configuration's ``http`` table; port 0 picks a free port. ``task_status.started``
    receives the bound port once the server accepts connections."""
    server = config if isinstance(config, ModelServer) else ModelServer(config, wait_ready=False)
    app = create_app(server)
    http = server.config.http
    hyper = hypercorn_config(server.config, host or http.host, http.port if port is None else port)
    shutdown = trio.Event()

    async def run_hypercorn(task_status=trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn.trio.serve(app, hyper, shutdown_trigger=shutdown.wait, task_status=task_status)
        nursery.cancel_scope.cancel()  # served and shut down: stop watching signals

    async with trio.open_nursery() as nursery:
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(stop_on_signals, shutdown, nursery.cancel_scope)
        binds = await nursery.start(run_hypercorn)
        bound_port = int(binds[0].rsplit(":", 1)[1])
        log.info("serving on %s", binds[0], extra={"port": bound_port})
        task_status.started(bound_port)
    log.info("stopped")


async def stop_on_signals(shutdown: trio.Event, cancel_scope: trio.CancelScope) -> None:
    """The first SIGTERM/SIGINT starts a graceful shutdown; a second one cancels at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second signal: stopping now")
                cancel_scope.cancel()
                return
            log.warning("%s: finishing requests in flight, then stopping", signal.Signals(signum).name)
            shutdown.set()


def serve(
    config: ModelServer | Config | dict | str | os.PathLike | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> None:
    """Serve the HTTP API until SIGTERM or SIGINT (blocking)."""
    trio.run(partial(serve_async, config, host=host, port=port))
