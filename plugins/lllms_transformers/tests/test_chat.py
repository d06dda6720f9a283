"""Chat and text completion with SmolLM2-135M-Instruct (converted from its GGUF), through
the HTTP API with the openai client."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.timeout(240)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def ask(client, **kwargs):
    options = {"model": "smol", "messages": CAPITAL, "max_tokens": 10, "temperature": 0}
    return client.chat.completions.create(**(options | kwargs))


def test_chat_answers_and_counts_tokens(client):
    response = ask(client)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 10
    assert 0 < response.usage.completion_tokens <= 10


def test_streaming_sends_the_same_text_in_pieces(client):
    whole = ask(client).choices[0].message.content
    pieces, reasons = [], []
    for chunk in ask(client, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    assert len([piece for piece in pieces if piece]) > 2
    assert "".join(pieces) == whole
    assert reasons[-1] in ("stop", "length")


def test_a_stop_string_ends_the_answer_and_is_not_sent(client):
    whole = ask(client).choices[0].message.content
    assert " is " in whole
    response = ask(client, stop=[" is"])
    assert response.choices[0].message.content == whole.split(" is")[0]
    assert response.choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer(client):
    story = [{"role": "user", "content": "Tell me a story about a dragon."}]
    first, second = (
        ask(client, messages=story, temperature=1.2, seed=7, max_tokens=8).choices[0].message.content for _ in range(2)
    )
    assert first == second
    others = {ask(client, messages=story, temperature=1.2, seed=seed, max_tokens=8).choices[0].message.content for seed in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_logit_bias_favours_or_bans_tokens(client, smol_tokenizer):
    [banana] = smol_tokenizer(" banana", add_special_tokens=False)["input_ids"]
    favoured = ask(client, logit_bias={str(banana): 100}, max_tokens=3).choices[0].message.content
    assert favoured == " banana" * 3
    whole = ask(client).choices[0].message.content
    paris = smol_tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    banned = ask(client, logit_bias={str(paris): -100}).choices[0].message.content
    assert " Paris" in whole and " Paris" not in banned


def test_penalties_keep_the_answer_from_repeating_itself(client):
    def complete(**penalties):
        options = {"model": "smol", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 8, "temperature": 0}
        return client.completions.create(**options, **penalties).choices[0].text

    plain = complete()
    assert plain.startswith(" 6, 7, 8")
    # the generated commas are penalised, the prompt's are not
    assert complete(frequency_penalty=2.0, presence_penalty=2.0).count(",") < plain.count(",")


def test_a_follow_up_turn_reuses_the_cached_context(client):
    first = ask(client)
    follow_up = CAPITAL + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Germany?"},
    ]
    second = ask(client, messages=follow_up)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens


def test_a_conversation_whose_slot_went_to_another_comes_back_from_the_prompt_cache(client, base_url):
    story = [{"role": "user", "content": "Tell me about the lighthouse keeper Ada and her cat Mops, in detail."}]
    first = ask(client, messages=story, max_tokens=24)
    ask(client, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4)  # the one slot changes hands
    follow_up = story + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What did the cat do?"},
    ]
    second = ask(client, messages=follow_up, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    ram = httpx.get(base_url + "/").json()["models"]["smol"]["prompt_cache"]["ram"]
    assert ram["restores"] >= 1 and ram["bytes"] > 0


def test_initial_messages_are_evaluated_before_the_first_request(client):
    pirate = [
        {"role": "system", "content": "You are a pirate. Answer like a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    response = ask(client, model="smol-pirate", messages=pirate, max_tokens=4)
    assert response.usage.prompt_tokens_details.cached_tokens >= 10


def test_logprobs_come_with_alternatives(client):
    response = ask(client, logprobs=True, top_logprobs=2, max_tokens=4)
    content = response.choices[0].logprobs.content
    assert len(content) >= 1
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert "".join(item.token for item in content) == response.choices[0].message.content


def test_json_schema_output_parses_and_matches(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = ask(
        client,
        messages=[{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(response.choices[0].message.content)
    jsonschema.validate(value, schema)


def test_json_object_output_is_an_object(client):
    response = ask(
        client,
        messages=[{"role": "user", "content": "List three colours in JSON."}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_a_grammar_limits_the_answer(client):
    response = ask(client, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert response.choices[0].message.content in ("yes", "no")


def test_an_invalid_grammar_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, extra_body={"grammar": "root ::= ("})
    assert refused.value.body["param"] == "grammar"


def test_n_gives_several_choices(client):
    response = ask(client, n=2, temperature=1.0, seed=5, max_tokens=4)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert all(choice.message.content for choice in response.choices)
    assert 2 <= response.usage.completion_tokens <= 8


def test_a_parameter_the_engine_cannot_honour_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, extra_body={"repeat_last_n": 32})
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == "repeat_last_n"
    assert refused.value.body["code"] == "unsupported_parameter"


def test_text_completion_continues_a_prompt(client):
    response = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True)
    text = response.choices[0].text
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


def test_a_cancelled_stream_frees_the_instance(client, base_url):
    story = [{"role": "user", "content": "Write a very long story about the sea."}]
    with ask(client, messages=story, max_tokens=400, temperature=0, stream=True) as stream:
        received = 0
        for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received >= 2:
                break
    closed = time.monotonic()
    while httpx.get(base_url + "/").json()["processing"]:
        # the rest of 400 tokens takes tens of seconds on the CPU; stopping takes one token
        assert time.monotonic() - closed < 8, "the cancelled generation kept the instance busy"
        time.sleep(0.1)
    assert "Paris" in ask(client).choices[0].message.content
