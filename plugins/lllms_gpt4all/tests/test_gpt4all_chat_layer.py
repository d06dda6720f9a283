"""The core chat layer in the gpt4all engine (no Jinja, no grammars): tool calls in auto
mode, past calls and tool results, special-token text, the overflow policy, and a server
that keeps answering while gpt4all reads a huge message."""

from __future__ import annotations

import json

import openai
import pytest

from lllms_core.testing import health_during, streamed_tool_calls
from lllms_core.testing.conformance import WEATHER_TOOL

pytestmark = pytest.mark.timeout(180)

# the wording SmolLM2 answers these prompts well with (at temperature 0, its answers follow the words)
WEATHER = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "description": "The weather in a city"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(client, messages, model="smol", **fields):
    return client.chat.completions.create(model=model, messages=messages, **({"temperature": 0, "max_tokens": 40} | fields))


def test_the_model_writes_a_call_on_its_own_after_an_example_and_it_streams(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": CALL},
        {"role": "user", "content": "And in Rome?"},
    ]
    # gpt4all's default repeat penalty (1.18) keeps the model from writing what the example shows
    call_id, name, arguments, reason = streamed_tool_calls(chat(client, messages, tools=[WEATHER], stream=True, extra_body={"repeat_penalty": 1.0}))
    assert call_id and name == "get_weather"
    assert arguments == {"city": "Rome"}
    assert reason == "tool_calls"


def test_a_tool_result_reaches_the_answer(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny and 31 degrees."},
        # asked whether it is warm, the 135M model answers from what it knows of Paris
        {"role": "user", "content": "What did the tool say?"},
    ]  # fmt: skip
    choice = chat(client, messages, tools=[WEATHER]).choices[0]
    assert not choice.message.tool_calls
    assert "31" in choice.message.content or "sunny" in choice.message.content.lower()


def test_special_token_text_in_a_tool_description_is_plain_text(client):
    def prompt_tokens(description: str) -> int:
        tool = json.loads(json.dumps(WEATHER))
        tool["function"]["description"] = description
        return chat(client, [{"role": "user", "content": "Hi"}], tools=[tool], max_tokens=1).usage.prompt_tokens

    assert prompt_tokens("The weather: <|im_start|>") - prompt_tokens("The weather: ") > 1


def test_a_conversation_too_long_for_the_context_drops_its_oldest_turns(client):
    messages = [{"role": "system", "content": "Your name is Bartholomew."}]
    for turn in range(4):
        messages += [{"role": "user", "content": f"Tell me fact number {turn} about rivers."},
                     {"role": "assistant", "content": "Rivers flow to the sea. " * 3}]
    messages.append({"role": "user", "content": "What is your name?"})
    dropped = chat(client, messages, model="smol-small", max_tokens=8)
    assert 40 < dropped.usage.prompt_tokens <= 96 - 8
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, messages, model="smol-strict", max_tokens=8)
    assert refused.value.body["code"] == "context_length_exceeded"


def test_a_huge_message_leaves_the_server_answering(client, served):
    def send_huge():
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, [{"role": "user", "content": "word " * 400_000}], max_tokens=2)  # 2 MB
        return refused.value

    refusal, latencies = health_during(served.base_url, send_huge)
    assert refusal.body["code"] == "context_length_exceeded"
    assert len(latencies) >= 2 and max(latencies) < 3, latencies
