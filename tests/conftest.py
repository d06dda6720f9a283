"""Shared test fixtures: a real lllms HTTP server (hypercorn, trio worker) on
127.0.0.1, running in a background thread with its own trio loop."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from helpers.api_models import API_SERVER_CONFIG, APIS_SERVER_CONFIG

from lllms_core.testing import BackgroundServer


def start_servers() -> tuple[Callable[[Any], BackgroundServer], Callable[[], None]]:
    """A function that starts servers, and one that stops all it started."""
    servers: list[BackgroundServer] = []

    def start(config: Any) -> BackgroundServer:
        server = BackgroundServer(config).start()
        servers.append(server)
        return server

    def stop_all() -> None:
        for server in servers:
            server.stop()

    return start, stop_all


@pytest.fixture(scope="session")
def server_factory() -> Iterator[Callable[[Any], BackgroundServer]]:
    """``server_factory(config)``: a running server that lives until the end of the
    session. ``config``: a config dict, TOML path, Config or ModelServer."""
    start, stop_all = start_servers()
    yield start
    stop_all()


@pytest.fixture
def server_for_test() -> Iterator[Callable[[Any], BackgroundServer]]:
    """``server_for_test(config)``: a running server that stops when the test ends."""
    start, stop_all = start_servers()
    yield start
    stop_all()


@pytest.fixture(scope="session")
def api_server(server_factory) -> BackgroundServer:
    """One server with a fake model for each task: ``chat`` (4 slots), ``slow`` (a
    200-word answer at 20 tokens/s, one slot), ``lazy`` (takes 0.5 s to load, disposed
    when idle), ``embed`` and ``whisper``. Keep-alive comments every 0.1 s."""
    return server_factory(API_SERVER_CONFIG)


@pytest.fixture(scope="session")
def apis_server(server_factory) -> BackgroundServer:
    """Fake models for the other APIs: ``chat``; ``thinker``, whose template lets answers open a
    ``<think>`` block and whose answer does; ``opener``, whose template opens the block itself;
    ``ranker`` (a rerank model) and ``embed``."""
    return server_factory(APIS_SERVER_CONFIG)
