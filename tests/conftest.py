"""Shared test fixtures: a real lllms HTTP server (hypercorn, trio worker) on
127.0.0.1, running in a background thread with its own trio loop."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import pytest
import trio

from lllms_core.http import serve_async


class RunningServer:
    """An lllms HTTP server serving ``config`` on a free port of 127.0.0.1, in a thread.

    ``base_url`` is ``http://127.0.0.1:<port>``; ``stop()`` cancels it (instances are
    disposed) and waits for the thread.
    """

    def __init__(self, config: Any):
        self.config = config
        self.port: int | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="lllms-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.port = await nursery.start(partial(serve_async, self.config, host="127.0.0.1", port=0))
                    self._started.set()

        try:
            trio.run(main)
        except BaseException as error:  # reported by start()
            self.error = error
        finally:
            self._started.set()

    def start(self, timeout: float = 30) -> "RunningServer":
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the test server did not start in time")
        if self.port is None:
            raise RuntimeError("the test server failed to start") from self.error
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._token is not None and self._cancel_scope is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._cancel_scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)


@contextmanager
def running_server(config: Any) -> Iterator[RunningServer]:
    """``with running_server(config) as server:`` an lllms HTTP server for the block."""
    server = RunningServer(config).start()
    try:
        yield server
    finally:
        server.stop()


def fake_models(**models: dict) -> dict[str, dict]:
    """Model tables for the fake engine: ``fake_models(chat={}, slow={"token_delay": 0.05})``."""
    return {name: {"engine": "fake", **spec} for name, spec in models.items()}


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Any]:
    """Start servers that live until the end of the session: ``server_factory(config)``."""
    servers: list[RunningServer] = []

    def start(config: Any) -> RunningServer:
        server = RunningServer(config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


SLOW_WORDS = 200
"""Words the ``slow`` model of ``api_server`` answers, one per 50 ms: 10 s in all."""


@pytest.fixture(scope="session")
def api_server(server_factory) -> RunningServer:
    """One server with a fake model for each task: ``chat`` (4 slots), ``slow`` (a
    ``SLOW_WORDS``-word answer at 20 tokens/s, one slot), ``lazy`` (takes 0.5 s to load,
    disposed when idle), ``embed`` and ``whisper``. Keep-alive comments every 0.1 s."""
    return server_factory(
        {
            "server": {"concurrency": 8},
            "http": {"keepalive_interval": 0.1},
            "models": fake_models(
                chat={"slots": 4},
                slow={"token_delay": 0.05, "reply": " ".join(["word"] * SLOW_WORDS)},
                lazy={"load_delay": 0.5, "ttl": 0},
                embed={"task": "embedding"},
                whisper={"task": "speech-to-text"},
            ),
        }
    )
