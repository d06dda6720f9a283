"""A thinking budget with llama.cpp: SmolLM2 served with a chat template whose generation
prompt opens ``<think>``, so that all it writes is thinking until it closes the block. With a
budget the engine writes ``</think>`` once the budget is spent and the answer follows; through
the OpenAI client (``reasoning_budget``, ``reasoning_effort``) and Anthropic's
``thinking.budget_tokens``."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(180)

THINKING_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
BUDGET = 8


@pytest.fixture(scope="module")
def server(smollm2_file, tmp_path_factory):
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "models": {"thinker": {"engine": "llamacpp", "location": str(smollm2_file), "context_size": 512, "parallel": 2,
                               "chat_template": THINKING_CHATML, "device": {"gpu": False, "cpu_threads": 1}}},
    }  # fmt: skip
    running = BackgroundServer(config).start()
    yield running
    running.stop()


def token_count(server, text: str) -> int:
    response = httpx.post(server.url("/tokenize"), json={"model": "thinker", "content": text, "add_special": False}, timeout=60)
    return response.json()["count"]


def test_a_reasoning_budget_closes_the_thinking_and_an_answer_follows(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    unbounded = client.chat.completions.create(model="thinker", messages=POEM, max_tokens=64, temperature=0).choices[0]
    # without a budget SmolLM2 never closes the block: all 64 tokens are thinking
    assert unbounded.finish_reason == "length" and not unbounded.message.content
    assert token_count(server, unbounded.message.reasoning_content) > 4 * BUDGET

    bounded = client.chat.completions.create(
        model="thinker", messages=POEM, max_tokens=64, temperature=0, extra_body={"reasoning_budget": BUDGET}
    ).choices[0]
    thought = bounded.message.reasoning_content
    assert thought and token_count(server, thought) <= BUDGET + 1  # the text, tokenized again, may split a little otherwise
    assert unbounded.message.reasoning_content.startswith(thought)
    assert bounded.message.content and "</think>" not in bounded.message.content

    stream = client.chat.completions.create(model="thinker", messages=POEM, max_tokens=64, temperature=0, stream=True,
                                            extra_body={"reasoning_budget": BUDGET})  # fmt: skip
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == thought
    assert "".join(delta.content or "" for delta in deltas) == bounded.message.content

    # reasoning_effort "none": no thinking at all, only an answer
    direct = client.chat.completions.create(model="thinker", messages=POEM, max_tokens=32, temperature=0,
                                            reasoning_effort="none").choices[0]  # fmt: skip
    assert not getattr(direct.message, "reasoning_content", None) and direct.message.content


def test_anthropic_thinking_budget_tokens(server):
    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    message = client.messages.create(model="thinker", max_tokens=64, messages=POEM, extra_body={"temperature": 0},
                                     thinking={"type": "enabled", "budget_tokens": BUDGET})  # fmt: skip
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert 0 < token_count(server, message.content[0].thinking) <= BUDGET + 1
    assert message.content[1].text.strip()
