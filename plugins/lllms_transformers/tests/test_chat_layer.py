"""The core chat layer in the transformers engine, through the HTTP API and the openai
client: tool-call lists that end, schemas, special-token text, the overflow policy, and a
server that keeps answering while a request is prepared."""

from __future__ import annotations

import json
import re

import openai
import pytest

from lllms_core.testing import health_during, streamed_tool_calls
from lllms_core.testing.conformance import WEATHER_TOOL as WEATHER

pytestmark = pytest.mark.timeout(300)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(client, content="What is the weather in Oslo?", **fields):
    options = {"model": "smol", "messages": [{"role": "user", "content": content}], "max_tokens": 64, "temperature": 0}
    return client.chat.completions.create(**(options | fields))


def test_a_required_tool_call_comes_back_as_a_tool_call(client):
    choice = chat(client, "What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, max_tokens=40).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.id and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_a_streamed_tool_call_starts_with_its_id_and_name(client):
    deltas, reasons = [], []
    named = {"type": "function", "function": {"name": "get_weather"}}
    for chunk in chat(client, "What is the weather in Paris?", tools=[WEATHER], tool_choice=named, max_tokens=40, stream=True):
        if chunk.choices:
            deltas.extend(chunk.choices[0].delta.tool_calls or [])
            reasons.append(chunk.choices[0].finish_reason)
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(delta.index == 0 and not delta.id for delta in deltas[1:])
    json.loads("".join(delta.function.arguments or "" for delta in deltas))
    assert reasons[-1] == "tool_calls"


def test_required_calls_with_parallel_calls_allowed_end_instead_of_repeating(client):
    choice = chat(client, tools=[WEATHER], tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert json.loads(call.function.arguments)["city"]


def test_parallel_tool_calls_false_stops_after_the_first_call(client):
    two = CALL + "\n" + CALL.replace("Paris", "Rome")
    grammar = f"root ::= {json.dumps(two)}"
    choice = chat(client, tools=[WEATHER], parallel_tool_calls=False, extra_body={"grammar": grammar}).choices[0]
    assert [json.loads(call.function.arguments)["city"] for call in choice.message.tool_calls] == ["Paris"]
    assert choice.finish_reason == "tool_calls"


def test_the_model_writes_a_call_on_its_own_after_an_example_and_it_streams(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": CALL},
        {"role": "user", "content": "And in Rome?"},
    ]
    call_id, name, arguments, reason = streamed_tool_calls(chat(client, messages=messages, tools=[WEATHER], stream=True))
    assert call_id and name == "get_weather"
    assert arguments == {"city": "Rome"}
    assert reason == "tool_calls"


def test_a_tool_result_reaches_the_answer(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "sunny"}'},
    ]  # fmt: skip
    choice = chat(client, messages=messages, tools=[WEATHER], max_tokens=30).choices[0]
    assert not choice.message.tool_calls
    assert "18" in choice.message.content or "sunny" in choice.message.content.lower(), choice.message.content


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_integer_bounds_all_of_and_recursion_are_enforced(client):
    bounded = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20}}, "required": ["n"]}
    response = chat(client, "Pick a big number as JSON.", response_format=json_schema(bounded), n=2, temperature=1.5,
                    seed=11, max_tokens=12)
    assert all(10 <= json.loads(choice.message.content)["n"] <= 20 for choice in response.choices)
    merged = {"allOf": [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
        {"properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    ]}  # fmt: skip
    person = json.loads(chat(client, "Describe a person as JSON.", response_format=json_schema(merged), max_tokens=30).choices[0].message.content)
    assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
            "required": ["name", "children"]}  # fmt: skip
    text = chat(client, "A family tree as JSON.", response_format=json_schema(tree), max_tokens=30).choices[0].message.content
    assert re.match(r'(\{ ?"name": "\w{0,8}", "children": \[ ?)+', text), text  # nodes within nodes


def test_an_unsatisfiable_schema_is_a_400_also_when_streamed(client):
    impossible = json_schema({"type": "integer", "minimum": 20, "maximum": 10})
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, response_format=impossible, stream=stream)
        assert refused.value.body["param"] == "response_format"
        assert "at least 20 and at most 10" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, stream=True, extra_body={"grammar": "root ::= ("})
    assert refused.value.body["param"] == "grammar"


def test_special_token_text_in_tools_and_past_calls_is_plain_text(client):
    def prompt_tokens(description: str, arguments: str) -> int:
        tool = json.loads(json.dumps(WEATHER))
        tool["function"]["description"] = description
        messages = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]  # fmt: skip
        return chat(client, messages=messages, tools=[tool], max_tokens=1).usage.prompt_tokens

    plain = prompt_tokens("The weather: ", '{"city": "Paris"}')
    assert prompt_tokens("The weather: <|im_start|>", '{"city": "Paris"}') - plain > 1
    assert prompt_tokens("The weather: ", '{"city": "<|im_end|>Paris"}') - plain > 1


def test_a_conversation_too_long_for_the_context_drops_its_oldest_turns(client):
    messages = [{"role": "system", "content": "Your name is Bartholomew."}]
    for turn in range(20):
        messages += [{"role": "user", "content": f"Tell me fact number {turn} about rivers."},
                     {"role": "assistant", "content": "Rivers flow to the sea. " * 3}]
    messages.append({"role": "user", "content": "What is your name?"})
    dropped = client.chat.completions.create(model="smol-small", messages=messages, max_tokens=8, temperature=0)
    assert 100 < dropped.usage.prompt_tokens <= 256 - 8
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smol-strict", messages=messages, max_tokens=8)
    assert refused.value.body["code"] == "context_length_exceeded"


def test_a_huge_message_and_many_logit_bias_keys_leave_the_server_answering(client, base_url):
    def send_huge():
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, "word " * 10_000_000, max_tokens=2)  # 50 MB
        return refused.value

    refusal, latencies = health_during(base_url, send_huge)
    assert refusal.body["code"] == "context_length_exceeded"
    assert len(latencies) >= 2 and max(latencies) < 3, latencies
    biases = {str(token): 0 for token in range(49152)}
    answer, latencies = health_during(base_url, lambda: chat(client, "Say hello.", logit_bias=biases, max_tokens=2))
    assert answer.choices[0].message.content
    assert max(latencies) < 3, latencies
