"""Bad input, refused parameters, limits, auth and CORS: every error has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` and the right status."""

from __future__ import annotations

import time

import httpx
import httpx2
import msgspec
import openai
import pytest
from helpers.openai_schema import openai_client, parse_sse, validate

from lllms_core.hookspecs import hookimpl
from lllms_core.plugins import get_plugin_manager
from lllms_core.samplers import Sampler
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(30)

KEY = "sk-right-key"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=20) as http_client:
        yield http_client


@pytest.fixture(scope="module")
def guarded(server_factory):
    """API keys, CORS for one origin, a 4 KiB body limit, and a model that cannot load."""
    return server_factory(
        {
            "http": {"api_keys": [KEY], "cors_origins": [ORIGIN], "max_body_size": 4096},
            "models": {"chat": {"engine": "fake"}, "broken": {"engine": "fake", "fail_loads": 1_000_000}},
        }
    )


@pytest.fixture(scope="module")
def guarded_http(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=20, headers={"Authorization": f"Bearer {KEY}"}) as http_client:
        yield http_client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return validate("ErrorResponse", response.json())["error"]


def chat(**params) -> dict:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **params}


# --- validation -------------------------------------------------------------------------


def test_malformed_json(http):
    error = error_of(http.post("/v1/chat/completions", content=b'{"model": "chat",'), 400)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"
    error = error_of(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    assert "object" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "chat", "messages": "hi"}, "messages"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=-0.1), "top_p"),
        (chat(n=0), "n"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(top_logprobs=50), "top_logprobs"),
        ({"model": "chat", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
        ({"model": "chat", "messages": []}, "messages"),
        ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ],
)
def test_invalid_values_name_the_field(http, body, param):
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"model": "chat", "prompt": [[]]}, "prompt[0]"),
        ("/v1/completions", {"model": "chat", "prompt": ["hi", []], "stream": True}, "prompt[1]"),
        ("/v1/embeddings", {"model": "embed", "input": ["a", []]}, "input[1]"),
    ],
)
def test_an_empty_token_list_is_a_400_naming_it(http, path, body, param):
    error = error_of(http.post(path, json=body), 400)
    assert error["param"] == param and "empty" in error["message"]


@pytest.mark.parametrize("levels", [1000, 100_000])
def test_json_nested_too_deeply_is_a_400(http, levels):
    nested = "[" * levels + "]" * levels
    unknown_field = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "x": %s}' % nested.encode()
    for body in (unknown_field, schema_request(levels)):
        error = error_of(http.post("/v1/chat/completions", content=body), 400)
        assert error["code"] == "too_deeply_nested" and "100 levels" in error["message"]
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200


def test_a_schema_deeper_than_engines_should_recurse_into_is_a_400(http):
    # 150 levels decode without trouble, but what reaches an engine must not make it recurse that deep
    error = error_of(http.post("/v1/chat/completions", content=schema_request(75)), 400)
    assert error["code"] == "too_deeply_nested"


def schema_request(levels: int) -> bytes:
    """A chat request whose json_schema nests ``levels`` objects (two JSON levels each)."""
    schema = '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels
    response_format = {"type": "json_schema", "json_schema": {"name": "deep", "schema": "SCHEMA"}}
    return msgspec.json.encode(chat(response_format=response_format)).replace(b'"SCHEMA"', schema.encode())


def test_a_missing_field_is_named(http):
    error = error_of(http.post("/v1/chat/completions", json={"model": "chat"}), 400)
    assert "messages" in error["message"]
    error = error_of(http.post("/v1/embeddings", json={"model": "embed"}), 400)
    assert "input" in error["message"]


def test_zero_is_a_value_and_unknown_fields_are_accepted(http):
    response = http.post("/v1/chat/completions", json=chat(temperature=0, seed=0, top_p=0, store=False, metadata={"a": "b"}))
    assert response.status_code == 200
    validate("CreateChatCompletionResponse", response.json())


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_k": 40}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
        ({"repeat_penalty": 1.1}, "repeat_penalty"),
        ({"repeat_last_n": 64}, "repeat_last_n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"grammar": "root ::= \"a\""}, "grammar"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_parameters_the_engine_cannot_do_are_refused(http, extra, param):
    for stream in (False, True):
        error = error_of(http.post("/v1/chat/completions", json=chat(stream=stream, **extra)), 400)
        assert error["param"] == param and error["code"] == "unsupported_parameter"
        assert param in error["message"]


def test_completion_features_the_engine_cannot_do_are_refused(http):
    error = error_of(http.post("/v1/completions", json={"model": "chat", "prompt": "a", "suffix": "z"}), 400)
    assert error["param"] == "suffix"
    error = error_of(http.post("/v1/completions", json={"model": "chat", "prompt": [1, 2, 3]}), 400)
    assert error["param"] == "prompt"
    error = error_of(http.post("/v1/completions", json={"model": "chat", "prompt": "a", "best_of": 3}), 400)
    assert error["param"] == "best_of"


class BananaSampler:
    """A plugin sampler; the fake engine applies no logits processors, so it refuses it."""

    @hookimpl
    def register_samplers(self, register):
        register(
            Sampler(name="banana", parameters=("banana_strength",), logits_processor=lambda value, request: None)
        )


def test_plugin_sampler_parameters_are_read_from_the_body(server_for_test):
    plugins = get_plugin_manager()
    plugins.register(BananaSampler(), name="banana")
    server = ModelServer({"models": {"chat": {"engine": "fake"}}}, plugins=plugins, wait_ready=False)
    running = server_for_test(server)
    with httpx.Client(base_url=running.base_url, timeout=20) as http_client:
        error = error_of(http_client.post("/v1/chat/completions", json=chat(banana_strength=2)), 400)
        assert error["param"] == "banana_strength"
        assert http_client.post("/v1/chat/completions", json=chat(banana_strength=None)).status_code == 200


def test_the_openai_client_sees_the_param(api_server):
    client = openai_client(api_server.url("/v1"), "unused")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], extra_body={"top_k": 3})
    assert raised.value.param == "top_k" and raised.value.code == "unsupported_parameter"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", chat(model="nope")),
        ("/v1/chat/completions", chat(model="nope", stream=True)),
        ("/v1/completions", {"model": "nope", "prompt": "a"}),
        ("/v1/embeddings", {"model": "nope", "input": "a"}),
        ("/v1/models/nope", None),
    ],
)
def test_unknown_model(http, path, body):
    response = http.post(path, json=body) if body is not None else http.get(path)
    error = error_of(response, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_a_model_of_another_task_is_refused(http):
    error = error_of(http.post("/v1/embeddings", json={"model": "whisper", "input": "a"}), 400)
    assert error["param"] == "model"


def test_unknown_routes_and_methods(http):
    error = error_of(http.get("/v1/nothing/here"), 404)
    assert error["code"] == "not_found"
    response = http.get("/v1/chat/completions")
    error = error_of(response, 405)
    assert "POST" in response.headers["allow"]


def test_the_connection_of_an_answer_sent_before_the_body_was_read_is_closed(http, server_for_test):
    """A 401, 404 or 405 goes out before the body is read; the rest of a large body would stall
    the connection, and the next request on it would never be answered."""
    big = chat(messages=[{"role": "user", "content": "x" * 2_000_000}])
    guarded_server = server_for_test({"http": {"api_keys": [KEY]}, "models": {"chat": {"engine": "fake"}}})
    with httpx.Client(base_url=guarded_server.base_url, timeout=10) as pooled:
        for method, path, status, headers in [
            ("POST", "/v1/chat/completions", 401, {}),
            ("POST", "/v1/nothing/here", 404, {"Authorization": f"Bearer {KEY}"}),
            ("PUT", "/v1/chat/completions", 405, {"Authorization": f"Bearer {KEY}"}),
        ]:
            response = pooled.request(method, path, json=big, headers=headers)
            assert response.status_code == status and response.headers["connection"] == "close"
            assert pooled.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        answered = pooled.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {KEY}"})
        assert "connection" not in answered.headers, "a request whose body was read keeps its connection"
    # the openai client shares its pooled connections between calls
    shared = httpx2.Client(timeout=10)
    wrong = openai.OpenAI(base_url=guarded_server.url("/v1"), api_key="sk-wrong", max_retries=0, http_client=shared)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="chat", messages=big["messages"])
    right = openai.OpenAI(base_url=guarded_server.url("/v1"), api_key=KEY, max_retries=0, http_client=shared)
    assert right.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}]).choices


# --- limits -----------------------------------------------------------------------------


def test_oversize_body(guarded_http):
    big = chat(messages=[{"role": "user", "content": "x" * 10_000}])
    error = error_of(guarded_http.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is checked while reading
        for _ in range(20):
            yield b" " * 1000
        yield b'{"model": "chat"}'

    error = error_of(guarded_http.post("/v1/chat/completions", content=chunks()), 413)
    assert error["code"] == "request_too_large"


def test_queue_full_is_429_with_retry_after(server_factory):
    busy = server_factory(
        {
            "server": {"concurrency": 1, "max_queue": 0},
            "models": {"slow": {"engine": "fake", "token_delay": 0.05, "reply": " ".join(["w"] * 100), "min_instances": 1}},
        }
    )
    with httpx.Client(base_url=busy.base_url, timeout=20) as http_client:
        while http_client.get("/health").status_code != 200:
            pass
        body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
        with http_client.stream("POST", "/v1/chat/completions", json=body) as first:
            lines = first.iter_lines()  # kept: closing the iterator would disconnect
            next(lines)  # the slot is taken
            response = http_client.post("/v1/chat/completions", json={**body, "stream": False})
            error = error_of(response, 429)
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert int(response.headers["retry-after"]) >= 1
            client = openai_client(busy.url("/v1"), "unused")
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}])


def test_an_error_after_the_stream_started_is_an_error_event(guarded_http, guarded):
    # the model fails to load while the request waits for it: headers are out already
    body = {"model": "broken", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with guarded_http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1].startswith("data: {")
    with pytest.raises(AssertionError, match="DONE"):
        parse_sse(lines)  # no [DONE] after an error
    error = validate("ErrorResponse", httpx.Response(200, content=lines[-1][len("data: "):]).json())["error"]
    assert error["code"] == "model_load_failed"
    client = openai_client(guarded.url("/v1"), KEY)
    with pytest.raises(openai.APIError, match="refuses to load"):
        for _ in client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}], stream=True):
            pass
    error_of(guarded_http.post("/v1/chat/completions", json={**body, "stream": False}), 503)


# --- auth and CORS ---------------------------------------------------------------------------


def test_api_keys(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=20) as anonymous:
        error = error_of(anonymous.get("/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        error_of(anonymous.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
        error_of(anonymous.get("/", headers={"Authorization": f"Basic {KEY}"}), 401)
        error_of(anonymous.get("/metrics"), 401)
        assert anonymous.get("/health").status_code in (200, 503)  # open, for load balancers
        assert anonymous.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai_client(guarded.url("/v1"), "sk-wrong").models.list()
    assert openai_client(guarded.url("/v1"), KEY).models.list().data


def test_api_key_from_the_environment(monkeypatch, server_for_test):
    monkeypatch.setenv("LLLMS_API_KEY", "sk-from-env")
    server = server_for_test({"models": {"chat": {"engine": "fake"}}})
    with httpx.Client(base_url=server.base_url, timeout=20) as http_client:
            error_of(http_client.get("/v1/models"), 401)
            ok = http_client.get("/v1/models", headers={"Authorization": "Bearer sk-from-env"})
            assert ok.status_code == 200


def test_cors(guarded, http):
    with httpx.Client(base_url=guarded.base_url, timeout=20) as browser:
        preflight = browser.options(
            "/v1/chat/completions",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
        response = browser.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        stranger = browser.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in stranger.headers
    # CORS is off unless configured
    assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": ORIGIN}).headers


# --- faults --------------------------------------------------------------------------------


def test_an_internal_fault_is_a_500_without_internals_logged_with_the_request_id(http, monkeypatch, caplog):
    import lllms_core.api.openai as openai_api

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(openai_api, "chat_completion_body", broken)
    caplog.set_level("INFO", logger="lllms.http")
    response = http.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "fault-1"})
    error = error_of(response, 500)
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "fault-1" in error["message"] and "secret" not in error["message"]

    def records():
        return [record for record in caplog.records if getattr(record, "request_id", None) == "fault-1"]

    assert any(record.exc_info and "secret internals" in str(record.exc_info[1]) for record in records())
    # the request's own line is written once the response is out, in the server's thread
    deadline = time.monotonic() + 5
    while not any(getattr(record, "status", None) == 500 for record in records()):
        assert time.monotonic() < deadline, "no log line for the request"
        time.sleep(0.01)


def test_an_internal_fault_while_streaming_is_an_error_event(http, monkeypatch):
    import lllms_core.api.openai as openai_api

    def broken(self, stream, chunk):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(openai_api.ChatEvents, "chunk", broken)
    with http.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        lines = [line for line in response.iter_lines() if line]
    error = validate("ErrorResponse", httpx.Response(200, content=lines[-1][len("data: "):]).json())["error"]
    assert error["code"] == "internal_error" and "secret" not in error["message"]
