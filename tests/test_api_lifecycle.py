"""The server's life: readiness, clients that go away, graceful shutdown on SIGTERM,
and starting it with hypercorn's command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from functools import partial

import httpx
import pytest
import trio
from helpers.openai_schema import parse_sse, validate

from lllms_core.http import serve_async
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(60)


def slot_busy(http: httpx.Client, model: str) -> bool:
    instances = [i for i in http.get("/").json()["instances"] if i["model"] == model]
    return any(slot["busy"] for instance in instances for slot in instance["slots"])


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=20) as http_client:
        yield http_client


def test_health_is_503_until_the_startup_models_are_loaded(server_for_test):
    server = server_for_test({"models": {"big": {"engine": "fake", "load_delay": 1.0, "min_instances": 1}}})
    with httpx.Client(base_url=server.base_url, timeout=10) as http_client:
        loading = http_client.get("/health")
        assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
        assert http_client.get("/").json()["ready"] is False
        wait_until(lambda: http_client.get("/health").status_code == 200)
        assert http_client.get("/health").json() == {"status": "ok"}


def test_a_startup_model_that_cannot_load_keeps_the_server_not_ready_and_says_why(server_for_test):
    server = server_for_test(
        {"models": {"chat": {"engine": "fake"}, "broken": {"engine": "fake", "fail_loads": 1_000_000, "min_instances": 1}}}
    )
    with httpx.Client(base_url=server.base_url, timeout=10) as http_client:
        wait_until(lambda: http_client.get("/health").json()["status"] != "loading")
        health = http_client.get("/health")
        assert (health.status_code, health.json()) == (
            503, {"status": "failed", "errors": {"broken": "fake model 'broken' refuses to load"}}
        )  # fmt: skip
        status = http_client.get("/").json()
        assert status["ready"] is False
        assert status["models"]["broken"]["start_error"] == "fake model 'broken' refuses to load"
        assert status["models"]["chat"]["start_error"] is None
        assert "lllms_ready 0.0" in http_client.get("/metrics").text


def test_the_api_shows_file_names_not_where_the_server_keeps_them(server_for_test, tmp_path):
    models = {"missing": {"engine": "fake", "location": str(tmp_path / "models" / "gone.gguf")}}
    for expose, shown in ((False, "gone.gguf"), (True, str(tmp_path / "models" / "gone.gguf"))):
        server = server_for_test({"http": {"expose_paths": expose}, "models": models})
        with httpx.Client(base_url=server.base_url, timeout=10) as http_client:
            assert http_client.get("/").json()["models"]["missing"]["location"] == shown
            body = {"model": "missing", "messages": [{"role": "user", "content": "hi"}]}
            error = http_client.post("/v1/chat/completions", json=body).json()["error"]
            assert error["message"] == f"model 'missing': {shown} does not exist"
            with http_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                event = [line for line in response.iter_lines() if line][-1]
            assert f"model 'missing': {shown} does not exist" in event
            assert str(tmp_path) not in event or expose


def test_a_client_going_away_mid_stream_is_a_normal_disconnect_not_an_error(server_for_test, caplog):
    server = server_for_test({"models": {"fast": {"engine": "fake", "slots": 4, "reply": " ".join(["word"] * 5000)}}})
    caplog.set_level("DEBUG")
    body = {"model": "fast", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=10) as http_client:
        for _ in range(20):
            with http_client.stream("POST", "/v1/chat/completions", json=body) as response:
                next(response.iter_lines())
        wait_until(lambda: not slot_busy(http_client, "fast"))
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_an_abandoned_stream_frees_the_instance_at_once(http, api_server):
    words = len(api_server.config["models"]["slow"]["reply"].split())
    body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert slot_busy(http, "slow")
    # leaving the block closed the connection with nearly all the words still to go
    wait_until(lambda: not slot_busy(http, "slow"), timeout=2.0)
    started = time.monotonic()
    reply = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
    assert reply.json()["choices"][0]["message"]["content"] == "word word word"
    # the abandoned answer would have needed words × 50 ms (10 s) more
    assert time.monotonic() - started < words * 0.05 / 2


def test_an_abandoned_request_frees_the_instance_at_once(http):
    body = {"model": "slow", "messages": [{"role": "user", "content": "go"}]}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=body, timeout=0.5)  # the client gives up, disconnecting
    wait_until(lambda: not slot_busy(http, "slow"), timeout=2.0)
    reply = http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert reply.json()["choices"][0]["message"]["content"] == "word word"


async def test_a_model_server_the_caller_entered_outlives_the_http_server():
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with ModelServer({"models": {"chat": {"engine": "fake"}}}) as server:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_async, server, host="127.0.0.1", port=0))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http_client:
                response = await http_client.post("/v1/chat/completions", json=chat)
                assert response.json()["choices"][0]["message"]["content"] == "You said: hi"
            nursery.cancel_scope.cancel()
        completion = await server.chat_completion(chat)  # still open: its owner exits it
        assert completion.choices[0].text == "You said: hi"


# --- a server in its own process ------------------------------------------------------

SERVE = """
import json, sys
from functools import partial
import trio
from lllms_core.http import serve_async
from lllms_core.logs import setup_logging

setup_logging("info")

async def main():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_async, json.loads(sys.argv[1]), host="127.0.0.1", port=0))
        print(port, flush=True)

trio.run(main)
"""


class ServerProcess:
    def __init__(self, config: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.process.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 20) -> tuple[int, str]:
        """Wait for the process to end; its exit code and log."""
        _, log = self.process.communicate(timeout=timeout)
        return self.process.returncode, log


def refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.ConnectError:
        return True
    return False


def slow_config(words: int, grace: float) -> dict:
    return {
        "http": {"shutdown_grace": grace},
        "models": {"slow": {"engine": "fake", "token_delay": 0.05, "reply": " ".join(["word"] * words), "min_instances": 1}},
    }


def test_sigterm_lets_requests_in_flight_finish_then_exits_cleanly():
    server = ServerProcess(slow_config(words=20, grace=10))
    try:
        with httpx.Client(base_url=server.base_url, timeout=20) as http_client:
            wait_until(lambda: http_client.get("/health").status_code == 200, timeout=20)
            body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
            with http_client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                first = next(lines)
                server.process.send_signal(signal.SIGTERM)
                wait_until(lambda: refused(server.base_url + "/health"))  # no new connections
                rest = list(lines)
        chunks, _ = parse_sse([first, *rest])  # complete, up to [DONE]
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).count("word") == 20
        returncode, log = server.stop()
        assert returncode == 0, log
        assert "disposed slow:" in log
    finally:
        server.process.kill()


def test_requests_still_running_after_the_grace_period_are_cancelled():
    server = ServerProcess(slow_config(words=400, grace=0.5))
    try:
        with httpx.Client(base_url=server.base_url, timeout=20) as http_client:
            wait_until(lambda: http_client.get("/health").status_code == 200, timeout=20)
            body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
            started = time.monotonic()
            with http_client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)
                server.process.send_signal(signal.SIGTERM)
                with pytest.raises((httpx.RemoteProtocolError, AssertionError)):
                    parse_sse(list(lines))  # cut short: no [DONE]
        returncode, log = server.stop()
        assert returncode == 0, log
        assert "disposed slow:" in log
        assert time.monotonic() - started < 400 * 0.05 / 2
    finally:
        server.process.kill()


# --- hypercorn's command line -------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "lllms.toml"
    path.write_text('[models.chat]\nengine = "fake"\n')
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hypercorn_trio_worker_serves_the_configured_app(config_file):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "-k", "trio", "-b", f"127.0.0.1:{port}", "lllms_core.app:app"],
        env={**os.environ, "LLLMS_CONFIG": str(config_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                return False

        wait_until(healthy, timeout=30)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert [model["id"] for model in models["data"]] == ["chat"]
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_hypercorn_asyncio_worker_stops_with_one_clear_line(config_file):
    result = subprocess.run(
        [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:0", "lllms_core.app:app"],
        env={**os.environ, "LLLMS_CONFIG": str(config_file)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = (result.stdout + result.stderr).strip()
    assert output == "lllms: needs hypercorn's trio worker: start it with `hypercorn -k trio lllms_core.app:app`"
