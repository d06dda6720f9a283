"""The context-overflow policy: which turns a prompt too long for the context keeps."""

from __future__ import annotations

import pytest

from lllms_core.chat import ContextBudget, fewest_tokens, fit_messages, fit_tokens
from lllms_core.errors import ContextLengthExceededError
from lllms_core.schemas import AssistantMessage, FunctionCall, SystemMessage, ToolCall, ToolMessage, UserMessage


class Counter:
    """An engine's side: one token per word, and how many conversations it counted."""

    def __init__(self, budget: ContextBudget):
        self.budget = budget
        self.attempts = 0

    def __call__(self, messages, limit):
        self.attempts += 1
        tokens = sum(len(str(message.content or "").split()) + 2 for message in messages)
        self.budget.check(tokens, limit)
        return messages


def conversation(turns: int) -> list:
    messages = [SystemMessage(content="You are Bartholomew.")]
    for turn in range(turns):
        messages += [UserMessage(content=f"question {turn} " + "word " * 10), AssistantMessage(content="answer " * 10)]
    return messages + [UserMessage(content="What is your name?")]


def test_the_oldest_turns_go_keeping_the_system_messages_and_the_last_message():
    budget = ContextBudget(200, 20, "drop_oldest")
    counter = Counter(budget)
    messages = conversation(100) + [SystemMessage(content="Answer briefly.")]  # a system message at the end too
    messages.insert(50, SystemMessage(content="A system message among old turns."))
    kept = fit_messages(messages, counter, budget)
    assert kept[0] == messages[0] and kept[1].content == "A system message among old turns."
    assert isinstance(kept[2], UserMessage) and kept[-1] == messages[-1]
    assert sum(len(str(m.content).split()) + 2 for m in kept) <= budget.limit == 180
    assert sum(len(str(m.content).split()) + 2 for m in kept) > 180 - 30  # as much history as fits
    assert counter.attempts <= 10  # bisection, not one attempt per turn


def test_a_call_and_its_results_are_dropped_together():
    budget = ContextBudget(60, 10, "drop_oldest")
    call = ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"))
    messages = [UserMessage(content="first " * 20), AssistantMessage(content=None, tool_calls=[call]),
                ToolMessage(tool_call_id="c1", content="result " * 30), UserMessage(content="second")]
    kept = fit_messages(messages, Counter(budget), budget)
    assert kept == [messages[-1]]


def test_when_only_the_last_message_is_left_it_may_use_all_but_one_token():
    budget = ContextBudget(100, 50, "drop_oldest")
    messages = [SystemMessage(content="s"), UserMessage(content="old"), UserMessage(content="word " * 80)]
    assert fit_messages(messages, Counter(budget), budget) == [messages[0], messages[2]]
    messages[-1] = UserMessage(content="word " * 200)
    with pytest.raises(ContextLengthExceededError, match="after dropping old turns") as refused:
        fit_messages(messages, Counter(budget), budget)
    assert refused.value.status == 400 and refused.value.param == "messages"


def test_the_error_policy_refuses_what_does_not_fit_with_max_tokens():
    budget = ContextBudget(100, 30, "error")
    assert budget.limit == 70
    counter = Counter(budget)
    with pytest.raises(ContextLengthExceededError, match="needs 80 for the prompt and 30 for the completion"):
        fit_messages([UserMessage(content="word " * 78)], counter, budget)
    assert counter.attempts == 1
    assert fit_messages([UserMessage(content="word " * 60)], Counter(budget), budget)


def test_a_conversation_is_not_counted_again_when_its_count_already_tells():
    budget = ContextBudget(100, None, "drop_oldest")
    counter = Counter(budget)
    with pytest.raises(ContextLengthExceededError):
        fit_messages([UserMessage(content="word " * 500)], counter, budget)
    assert counter.attempts == 1


def test_text_prompts_keep_their_first_and_last_tokens():
    tokens = list(range(1000))
    assert fit_tokens(tokens, ContextBudget(100, 10, "drop_oldest"), keep_first=True) == [0, *range(911, 1000)]
    assert fit_tokens(tokens[:50], ContextBudget(100, 10, "drop_oldest"), keep_first=True) == tokens[:50]
    with pytest.raises(ContextLengthExceededError) as refused:
        fit_tokens(tokens, ContextBudget(100, 10, "error"), keep_first=True)
    assert refused.value.param == "prompt"


def test_the_fewest_tokens_a_text_can_have():
    assert fewest_tokens("é" * 100, 10) == 20
