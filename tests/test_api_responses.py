"""OpenAI's Responses API over real HTTP with the ``openai`` SDK, on fake models; every body
and streamed event is validated against OpenAI's API description."""

from __future__ import annotations

import json

import httpx
import pytest
from helpers.openai_schema import openai_client, validate

pytestmark = pytest.mark.timeout(30)

TOOLS = [{"type": "function", "name": "lookup", "description": "Look a word up", "parameters": {"type": "object", "properties": {"echo": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def client(apis_server):
    return openai_client(apis_server.url("/v1"), "unused")


def test_create_with_a_string_input(client):
    response = client.responses.create(model="chat", input="hello there", instructions="Be brief.", temperature=0)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "You said: hello there"
    assert response.usage.input_tokens == 4 and response.usage.output_tokens == 4
    assert response.instructions == "Be brief."


def test_stored_responses_can_be_read_listed_and_deleted(client):
    response = client.responses.create(model="chat", input=[{"role": "user", "content": [{"type": "input_text", "text": "keep me"}]}])
    assert client.responses.retrieve(response.id).output_text == "You said: keep me"
    items = client.responses.input_items.list(response.id)
    assert [item.content[0].text for item in items.data] == ["keep me"]
    client.responses.delete(response.id)
    with pytest.raises(Exception) as raised:
        client.responses.retrieve(response.id)
    assert getattr(raised.value, "status_code", None) == 404


def test_store_false_keeps_nothing(client):
    response = client.responses.create(model="chat", input="forget me", store=False)
    with pytest.raises(Exception) as raised:
        client.responses.retrieve(response.id)
    assert getattr(raised.value, "status_code", None) == 404


def test_a_chain_continues_with_its_context(client):
    first = client.responses.create(model="chat", input="first turn words")
    second = client.responses.create(model="chat", input="second", previous_response_id=first.id)
    assert second.output_text == "You said: second"
    # the conversation before it was in the slot already
    assert second.usage.input_tokens_details.cached_tokens >= 3
    assert second.previous_response_id == first.id


def test_max_output_tokens_makes_the_response_incomplete(client):
    response = client.responses.create(model="chat", input="hello there", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "You said:"


def test_the_sdk_stream_has_the_semantic_events(client):
    with client.responses.stream(model="chat", input="hello there") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert final.output_text == "You said: hello there"


def test_a_function_call_round_trip_with_previous_response_id(client):
    first = client.responses.create(model="chat", input="find it", tools=TOOLS, tool_choice="required")
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "lookup" and json.loads(call.arguments) == {"echo": "find it"}
    second = client.responses.create(
        model="chat", previous_response_id=first.id, tools=TOOLS, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "found"}],
    )  # fmt: skip
    assert second.output_text == "You said: found"


def test_streamed_function_call_arguments(client):
    with client.responses.stream(model="chat", input="find it", tools=TOOLS) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"echo": "find it"}


def test_reasoning_comes_as_a_reasoning_item(client):
    response = client.responses.create(model="thinker", input="hi")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "the user greets me so I greet back"
    assert response.output_text == "Hello there"


def test_an_error_during_the_stream_ends_it_with_response_failed(server_for_test):
    server = server_for_test({"models": {"broken": {"engine": "fake", "fail_loads": 100}}})
    with httpx.stream("POST", server.url("/v1/responses"), json={"model": "broken", "input": "hi", "stream": True}, timeout=20) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    bodies = [validate("ResponseStreamEvent", json.loads(line[6:])) for line in lines]
    assert [body["type"] for body in bodies] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert bodies[-1]["response"]["status"] == "failed" and bodies[-1]["response"]["error"]["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "chat"}, "input"),
        ({"model": "chat", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "chat", "input": [{"type": "input_audio"}]}, "input[0]"),
        ({"model": "chat", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"model": "chat", "input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
        ({"model": "chat", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input[0].content[0]"),
    ],
    ids=["no-input", "temperature", "unknown-item", "builtin-tool", "unknown-previous", "image"],
)
def test_bad_input_gets_openais_error_shape(apis_server, body, param):
    response = httpx.post(apis_server.url("/v1/responses"), json=body, timeout=20)
    assert response.status_code == 400
    error = validate("ErrorResponse", response.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_unknown_response_ids_are_404(apis_server):
    for method, path in (("GET", "/v1/responses/resp_nothing"), ("DELETE", "/v1/responses/resp_nothing"),
                         ("GET", "/v1/responses/resp_nothing/input_items"), ("GET", "/v1/responses/../etc")):
        response = httpx.request(method, apis_server.url(path), timeout=20)
        assert response.status_code == 404
        validate("ErrorResponse", response.json())
