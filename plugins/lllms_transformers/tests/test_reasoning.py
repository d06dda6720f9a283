"""A thinking budget with transformers: SmolLM2 as ``smol-thinker``, whose chat template's
generation prompt opens ``<think>`` (so all it writes is thinking until the block is closed).
With a budget the engine forces ``</think>`` once the budget is spent and the answer follows;
through the OpenAI client (``reasoning_budget``) and Anthropic's ``thinking.budget_tokens``."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
BUDGET = 8


def token_count(base_url: str, text: str) -> int:
    body = {"model": "smol-thinker", "content": text, "add_special": False}
    return httpx.post(base_url + "/tokenize", json=body, timeout=120).json()["count"]


def test_a_reasoning_budget_closes_the_thinking_and_an_answer_follows(client, base_url):
    unbounded = client.chat.completions.create(model="smol-thinker", messages=POEM, max_tokens=48, temperature=0).choices[0]
    # without a budget SmolLM2 never closes the block: all 48 tokens are thinking
    assert unbounded.finish_reason == "length" and not unbounded.message.content
    assert token_count(base_url, unbounded.message.reasoning_content) > 4 * BUDGET

    bounded = client.chat.completions.create(
        model="smol-thinker", messages=POEM, max_tokens=48, temperature=0, extra_body={"reasoning_budget": BUDGET}
    ).choices[0]
    thought = bounded.message.reasoning_content
    assert thought and token_count(base_url, thought) <= BUDGET + 1  # the text, tokenized again, may split a little otherwise
    assert unbounded.message.reasoning_content.startswith(thought)
    assert bounded.message.content and "</think>" not in bounded.message.content


def test_anthropic_thinking_budget_tokens(base_url):
    import anthropic

    client = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=180)
    message = client.messages.create(model="smol-thinker", max_tokens=48, messages=POEM, extra_body={"temperature": 0},
                                     thinking={"type": "enabled", "budget_tokens": BUDGET})  # fmt: skip
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert 0 < token_count(base_url, message.content[0].thinking) <= BUDGET + 1
    assert message.content[1].text.strip()
