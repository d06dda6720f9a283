"""Ollama's API over real HTTP with the official ``ollama`` client, on fake models."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest

pytestmark = pytest.mark.timeout(30)

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(apis_server) -> ollama.Client:
    return ollama.Client(host=apis_server.base_url)


def test_chat(client):
    response = client.chat(model="chat", messages=USER, options={"temperature": 0, "seed": 1, "num_predict": 10, "num_ctx": 2048})
    assert response.message.role == "assistant" and response.message.content == "You said: hello there"
    assert response.done and response.done_reason == "stop"
    assert (response.prompt_eval_count, response.eval_count) == (2, 4)


def test_streamed_chat_is_ndjson_ending_with_statistics(client, apis_server):
    parts = list(client.chat(model="chat", messages=USER, stream=True))
    assert "".join(part.message.content for part in parts) == "You said: hello there"
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 4
    with httpx.stream("POST", apis_server.url("/api/chat"), json={"model": "chat", "messages": USER}, timeout=20) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert all(json.loads(line)["model"] == "chat" for line in response.iter_lines() if line)


def test_the_latest_tag_names_the_model(client):
    assert client.chat(model="chat:latest", messages=USER).message.content == "You said: hello there"


def test_num_predict_and_stop(client):
    assert client.chat(model="chat", messages=USER, options={"num_predict": 2}).done_reason == "length"
    assert client.generate(model="chat", prompt="hello there", options={"stop": ["there"]}).response == "You said: hello "


def test_generate(client):
    response = client.generate(model="chat", prompt="hello there", system="Be brief.")
    assert response.response == "You said: hello there" and response.done
    streamed = "".join(part.response for part in client.generate(model="chat", prompt="hello there", stream=True))
    assert streamed == "You said: hello there"
    raw = client.generate(model="chat", prompt="once upon a time", raw=True)
    assert raw.response == "and then the story goes on"


def test_a_tool_call_round_trip(client):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look up", "parameters": {"type": "object"}}}]
    response = client.chat(model="chat", messages=[{"role": "user", "content": "find it"}], tools=tools)
    [call] = response.message.tool_calls
    assert call.function.name == "lookup" and call.function.arguments == {"echo": "find it"}
    answer = client.chat(model="chat", messages=[
        {"role": "user", "content": "find it"}, response.message, {"role": "tool", "content": "found", "tool_name": "lookup"},
    ])  # fmt: skip
    assert answer.message.content == "You said: found"


def test_thinking_is_its_own_field(client):
    response = client.chat(model="thinker", messages=USER, think=True)
    assert response.message.thinking == "the user greets me so I greet back"
    assert response.message.content == "Hello there"


def test_embed(client):
    response = client.embed(model="embed", input=["one", "two"])
    assert len(response.embeddings) == 2 and len(response.embeddings[0]) == 16
    assert response.embeddings[0] != response.embeddings[1]


def test_models_are_listed_and_shown(client):
    names = {model.model for model in client.list().models}
    assert {"chat", "thinker", "ranker", "embed"} <= names
    shown = client.show("chat")
    assert "tools" in shown.capabilities and shown.details.family == "fake"
    assert client.show("embed").capabilities == ["embedding"]


def test_ps_lists_loaded_instances_and_keep_alive_unloads(client):
    client.chat(model="chat", messages=USER, keep_alive="10m")
    assert "chat" in {model.model for model in client.ps().models}
    unloaded = client.generate(model="chat", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    for _ in range(50):
        if "chat" not in {model.model for model in client.ps().models}:
            break
        import time

        time.sleep(0.05)
    assert "chat" not in {model.model for model in client.ps().models}
    assert client.generate(model="chat", prompt="").done_reason == "load"


def test_version_and_pull(client):
    assert client._client.get("/api/version").json()["version"]
    statuses = [part.status for part in client.pull("chat", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/api/chat", {"model": "nope", "messages": USER}, 404),
        ("/api/chat", {"model": "chat", "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]}, 400),
        ("/api/chat", {"model": "chat", "messages": USER, "options": {"top_k": 5}}, 400),
        ("/api/chat", {"model": "chat", "messages": USER, "keep_alive": "soon"}, 400),
        ("/api/generate", {"model": "chat", "prompt": "x", "format": 5}, 400),
        ("/api/embed", {"model": "embed", "input": []}, 400),
        ("/api/show", {"model": "nope"}, 404),
        ("/api/pull", {"model": "nope"}, 404),
        ("/api/chat", "not json", 400),
    ],
    ids=["unknown-model", "image", "unsupported-option", "keep-alive", "format", "empty-input", "show-unknown", "pull-unknown", "not-json"],
)
def test_errors_have_ollamas_shape(apis_server, path, body, status):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(apis_server.url(path), timeout=20, **kwargs)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and response.json()["error"]


def test_the_client_raises_response_errors(client):
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="nope", messages=USER)
    assert raised.value.status_code == 404
