"""Anthropic's Messages API over real HTTP with the official ``anthropic`` SDK, on fake
models (the adapter's own logic; tests/…/test_sdks_smollm2.py runs it on a real model)."""

from __future__ import annotations

import anthropic
import httpx
import pytest

pytestmark = pytest.mark.timeout(30)

USER = [{"role": "user", "content": "hello there"}]
TOOLS = [{"name": "lookup", "description": "Look a word up", "input_schema": {"type": "object", "properties": {"echo": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def client(apis_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=apis_server.base_url, api_key="unused", max_retries=0)


def events_of(apis_server, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", apis_server.url("/v1/messages"), json=body, timeout=20) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    import json

    return [(lines[i].removeprefix("event: "), json.loads(lines[i + 1].removeprefix("data: "))) for i in range(0, len(lines), 2)]


def test_create_answers_with_a_text_block_and_usage(client):
    message = client.messages.create(model="chat", max_tokens=64, system="Be brief.", messages=USER, metadata={"user_id": "u1"}, extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant" and message.model == "chat"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "You said: hello there"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == 4
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == 4  # "Be brief. hello there"


def test_a_follow_up_reads_its_context_from_the_cache(client):
    first = client.messages.create(model="chat", max_tokens=64, messages=[{"role": "user", "content": "remember the cache"}])
    follow_up = client.messages.create(
        model="chat", max_tokens=64,
        messages=[{"role": "user", "content": "remember the cache"}, {"role": "assistant", "content": first.content[0].text},
                  {"role": "user", "content": "again"}],
    )  # fmt: skip
    assert follow_up.usage.cache_read_input_tokens > 0


def test_max_tokens_and_stop_sequences_say_why_the_answer_ended(client):
    short = client.messages.create(model="chat", max_tokens=2, messages=USER)
    assert short.stop_reason == "max_tokens" and short.content[0].text == "You said:"
    stopped = client.messages.create(model="chat", max_tokens=64, messages=USER, stop_sequences=["there"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "there"
    assert stopped.content[0].text == "You said: hello "


def test_stream_events_come_in_anthropics_order(apis_server):
    events = events_of(apis_server, {"model": "chat", "max_tokens": 64, "messages": USER, "stream": True})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(body["type"] == name for name, body in events)
    text = "".join(body["delta"]["text"] for name, body in events if name == "content_block_delta")
    assert text == "You said: hello there"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == 4


def test_the_sdk_streams_text_and_the_final_message(client):
    with client.messages.stream(model="chat", max_tokens=64, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "You said: hello there" == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4


def test_a_tool_use_round_trip(client):
    message = client.messages.create(model="chat", max_tokens=64, messages=[{"role": "user", "content": "find it"}],
                                     tools=TOOLS, tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use"
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "lookup" and call.input == {"echo": "find it"}
    answer = client.messages.create(
        model="chat", max_tokens=64, tools=TOOLS,
        messages=[{"role": "user", "content": "find it"}, {"role": "assistant", "content": message.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "found"}]}],
        tool_choice={"type": "none"},
    )  # fmt: skip
    assert answer.content[0].text == "You said: found"


def test_a_streamed_tool_call_arrives_as_input_json_deltas(apis_server):
    body = {"model": "chat", "max_tokens": 64, "messages": USER, "tools": TOOLS, "stream": True}
    events = events_of(apis_server, body)
    [start] = [b for name, b in events if name == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "lookup"
    pieces = [b["delta"]["partial_json"] for name, b in events if name == "content_block_delta"]
    assert "".join(pieces) == '{"echo": "hello there"}'
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_thinking_comes_as_a_thinking_block(client):
    message = client.messages.create(model="thinker", max_tokens=64, messages=USER)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "the user greets me so I greet back"
    bounded = client.messages.create(model="thinker", max_tokens=64, messages=USER, thinking={"type": "enabled", "budget_tokens": 2})
    assert bounded.content[0].thinking == "the user"
    with client.messages.stream(model="thinker", max_tokens=64, messages=USER) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == "the user greets me so I greet back" and final.content[1].text == "Hello there"


def test_count_tokens(client):
    counted = client.messages.count_tokens(model="chat", messages=USER, system="Be brief.")
    assert counted.input_tokens == 4


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"model": "chat", "messages": USER}, 400, "invalid_request_error"),  # max_tokens is required
        ({"model": "nope", "max_tokens": 5, "messages": USER}, 404, "not_found_error"),
        ({"model": "chat", "max_tokens": 5, "messages": USER, "temperature": 1.5}, 400, "invalid_request_error"),
        ({"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, 400, "invalid_request_error"),
        ({"model": "chat", "max_tokens": 5, "messages": USER, "top_k": 3}, 400, "invalid_request_error"),
        ({"model": "chat", "max_tokens": 5, "messages": USER, "tools": [{"type": "bash_20250124", "name": "bash", "input_schema": {}}]}, 400, "invalid_request_error"),
    ],
    ids=["no-max-tokens", "unknown-model", "temperature", "image", "unsupported-top-k", "server-tool"],
)
def test_errors_have_anthropics_shape(apis_server, body, status, kind):
    response = httpx.post(apis_server.url("/v1/messages"), json=body, headers={"anthropic-version": "2023-06-01"}, timeout=20)
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and error["error"]["message"]


def test_the_sdk_raises_its_own_errors(client):
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="nope", max_tokens=5, messages=USER)
    assert raised.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="not an image"):
        client.messages.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])


def test_the_api_key_may_come_as_x_api_key(server_for_test):
    server = server_for_test({"http": {"api_keys": ["sesame"]}, "models": {"chat": {"engine": "fake"}}})
    good = anthropic.Anthropic(base_url=server.base_url, api_key="sesame", max_retries=0)
    assert good.messages.create(model="chat", max_tokens=8, messages=USER).content[0].text == "You said: hello there"
    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(model="chat", max_tokens=8, messages=USER)
    assert raised.value.body["error"]["type"] == "authentication_error"
