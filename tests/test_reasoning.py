"""Thinking separated from the answer: the core's splitter on the chunk stream, the budget
helper engines use, and what the OpenAI chat API shows (fake engine emitting think tags)."""

from __future__ import annotations

import httpx
import pytest
from helpers.openai_schema import openai_client, parse_sse

from lllms_core.reasoning import ReasoningSplitter, ThinkingBudget, think_syntax

pytestmark = pytest.mark.timeout(30)

QWEN3_TAIL = (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
    "enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
DEEPSEEK_R1_TAIL = "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def test_the_syntax_is_read_from_the_template():
    assert think_syntax("{{ messages }}") is None
    assert think_syntax(None) is None
    assert think_syntax("{% if '</think>' in content %}{% endif %}" + QWEN3_TAIL).opened_by_prompt is False
    assert think_syntax(DEEPSEEK_R1_TAIL).opened_by_prompt is True


def split_all(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    reasoning, answer = "", ""
    for piece in pieces:
        r, a = splitter.push(piece)
        reasoning, answer = reasoning + r, answer + a
    r, a = splitter.flush()
    return reasoning + r, answer + a


def test_tags_cut_anywhere_are_still_found():
    text = "<think>2 + 2 is 4</think>\n\nThe answer is 4."
    for size in (1, 2, 3, 5, 7):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert split_all(ReasoningSplitter(think_syntax("<think>")), pieces) == ("2 + 2 is 4", "The answer is 4.")


def test_an_answer_without_thinking_stays_whole():
    assert split_all(ReasoningSplitter(think_syntax("<think>")), ["  The <", "answer"]) == ("", "  The <answer")


def test_a_prompt_that_opens_the_block_makes_the_answer_start_inside_it():
    syntax = think_syntax(DEEPSEEK_R1_TAIL)
    assert split_all(ReasoningSplitter(syntax), ["hmm, ", "let me see</th", "ink>Yes."]) == ("hmm, let me see", "Yes.")
    # a generation cut short while thinking: all of it was thinking
    assert split_all(ReasoningSplitter(syntax), ["still thinking"]) == ("still thinking", "")


def test_the_budget_closes_the_block_after_the_allowed_tokens():
    budget = ThinkingBudget(think_syntax("<think>"), 2)
    budget.advance("<think>")
    assert not budget.exhausted
    budget.advance(" one")
    budget.advance(" two")
    assert budget.exhausted and budget.closing.startswith("</think>")
    budget.closed()
    assert not budget.exhausted
    # an answer that closes the block itself never runs out
    early = ThinkingBudget(think_syntax("<think>"), 2)
    for piece in ("<think>", " a", "</think>", " b", " c"):
        early.advance(piece)
    assert not early.exhausted


@pytest.fixture(scope="module")
def client(apis_server):
    return openai_client(apis_server.url("/v1"), "unused")


def test_chat_shows_reasoning_apart_from_the_answer(client):
    completion = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "hi"}])
    message = completion.choices[0].message
    assert message.content == "Hello there"
    extra = message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "the user greets me so I greet back"


def test_a_template_that_opens_the_block(client):
    completion = client.chat.completions.create(model="opener", messages=[{"role": "user", "content": "hi"}])
    message = completion.choices[0].message
    assert message.content == "Done"
    assert message.model_extra["reasoning_content"] == "pondering this for a while"


def test_streamed_deltas_carry_the_reasoning(apis_server):
    body = {"model": "thinker", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", apis_server.url("/v1/chat/completions"), json=body, timeout=20) as response:
        chunks, _ = parse_sse(list(response.iter_lines()))
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    reasoning = "".join(delta.get("reasoning_content", "") for delta in deltas)
    answer = "".join(delta.get("content") or "" for delta in deltas)
    assert (reasoning.strip(), answer) == ("the user greets me so I greet back", "Hello there")
    assert all(delta.get("reasoning", delta.get("reasoning_content")) == delta.get("reasoning_content") for delta in deltas)


def test_reasoning_effort_bounds_the_thinking(client):
    completion = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "hi"}], extra_body={"reasoning_budget": 3}
    )
    message = completion.choices[0].message
    assert message.model_extra["reasoning_content"] == "the user greets"
    assert message.content == "Hello there"
    none = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "hi"}], reasoning_effort="none")
    assert none.choices[0].message.model_extra.get("reasoning_content") is None
    assert none.choices[0].message.content == "Hello there"
