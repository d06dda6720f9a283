"""Shared test fixtures: a real lllms HTTP server (hypercorn, trio worker) on
127.0.0.1, running in a background thread with its own trio loop."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable, Iterator

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


def start_servers() -> tuple[Callable[[Any], RunningServer], Callable[[], None]]:
    """A function that starts servers, and one that stops all it started."""
    servers: list[RunningServer] = []

    def start(config: Any) -> RunningServer:
        server = RunningServer(config).start()
        servers.append(server)
        return server

    def stop_all() -> None:
        for server in servers:
            server.stop()

    return start, stop_all


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[[Any], RunningServer]]:
    """``server_factory(config)``: a running server that lives until the end of the
    session. ``config``: a config dict, TOML path, Config or ModelServer."""
    start, stop_all = start_servers()
    yield start
    stop_all()


@pytest.fixture
def server_for_test() -> Iterator[Callable[[Any], RunningServer]]:
    """``server_for_test(config)``: a running server that stops when the test ends."""
    start, stop_all = start_servers()
    yield start
    stop_all()


@pytest.fixture(scope="session")
def api_server(server_factory) -> RunningServer:
    """One server with a fake model for each task: ``chat`` (4 slots), ``slow`` (a
    200-word answer at 20 tokens/s, one slot), ``lazy`` (takes 0.5 s to load, disposed
    when idle), ``embed`` and ``whisper``. Keep-alive comments every 0.1 s."""
    return server_factory(
        {
            "server": {"concurrency": 8},
            "http": {"keepalive_interval": 0.1},
            "models": {
                "chat": {"engine": "fake", "slots": 4},
                "slow": {"engine": "fake", "token_delay": 0.05, "reply": " ".join(["word"] * 200)},
                "lazy": {"engine": "fake", "load_delay": 0.5, "ttl": 0},
                "embed": {"engine": "fake", "task": "embedding"},
                "whisper": {"engine": "fake", "task": "speech-to-text"},
            },
        }
    )
