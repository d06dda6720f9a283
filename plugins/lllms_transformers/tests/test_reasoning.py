"""A thinking budget with transformers: SmolLM2 as ``smol-thinker``, whose chat template's
generation prompt opens ``<think>`` (so all it writes is thinking until the block is closed).
With a budget the engine forces ``</think>`` once the budget is spent and the answer follows;
through the OpenAI client (``reasoning_budget``) and Anthropic's ``thinking.budget_tokens``."""

from __future__ import annotations

import pytest

from lllms_core.testing.reasoning import check_thinking_budget

pytestmark = pytest.mark.timeout(300)


def test_a_reasoning_budget_closes_the_thinking_and_an_answer_follows(base_url):
    check_thinking_budget(base_url, "smol-thinker", budget=8, max_tokens=48)
