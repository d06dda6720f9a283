"""Checks of a thinking budget against a real server, for engines that declare
``reasoning_budget``: serve a chat model with :data:`THINKING_CHATML` (or any template whose
generation prompt opens ``<think>``), then call :func:`check_thinking_budget`.

A small chat model under that template writes nothing but thinking until the block is
closed, so without a budget all its tokens are thinking, and with one the engine's closing
tag is what ends the thinking and lets an answer follow.
"""

from __future__ import annotations

from typing import Any

THINKING_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
"""ChatML whose generation prompt opens a thinking block."""

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def token_count(base_url: str, model: str, text: str) -> int:
    import httpx

    body = {"model": model, "content": text, "add_special": False}
    return httpx.post(base_url + "/tokenize", json=body, timeout=120).json()["count"]


def check_thinking_budget(base_url: str, model: str, *, budget: int = 8, max_tokens: int = 48) -> Any:
    """Through the OpenAI client (``reasoning_budget``) and Anthropic's (``thinking.budget_tokens``),
    greedy: unbounded, the thinking fills ``max_tokens``; bounded, it has at most about
    ``budget`` tokens and an answer follows. Returns the bounded OpenAI choice."""
    import anthropic
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=180)
    unbounded = client.chat.completions.create(model=model, messages=POEM, max_tokens=max_tokens, temperature=0).choices[0]
    assert unbounded.finish_reason == "length" and not unbounded.message.content, "unbounded, it only thinks"
    assert token_count(base_url, model, unbounded.message.reasoning_content) > 4 * budget

    bounded = client.chat.completions.create(
        model=model, messages=POEM, max_tokens=max_tokens, temperature=0, extra_body={"reasoning_budget": budget}
    ).choices[0]
    thought = bounded.message.reasoning_content
    # the thinking's text, tokenized again, may split a little otherwise than it was generated
    assert thought and token_count(base_url, model, thought) <= budget + 1
    assert unbounded.message.reasoning_content.startswith(thought)
    assert bounded.message.content and "</think>" not in bounded.message.content

    messages = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=180).messages
    message = messages.create(model=model, max_tokens=max_tokens, messages=POEM, extra_body={"temperature": 0},
                              thinking={"type": "enabled", "budget_tokens": budget})  # fmt: skip
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert 0 < token_count(base_url, model, message.content[0].thinking) <= budget + 1
    assert message.content[1].text.strip()
    return bounded
