"""A thinking budget with llama.cpp: SmolLM2 served with a chat template whose generation
prompt opens ``<think>``, so that all it writes is thinking until it closes the block. With a
budget the engine writes ``</think>`` once the budget is spent and the answer follows; through
the OpenAI client (``reasoning_budget``, ``reasoning_effort``, streamed) and Anthropic's
``thinking.budget_tokens``."""

from __future__ import annotations

import openai
import pytest

from lllms_core.testing import BackgroundServer
from lllms_core.testing.reasoning import POEM, THINKING_CHATML, check_thinking_budget

pytestmark = pytest.mark.timeout(180)


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


def test_a_reasoning_budget_closes_the_thinking_and_an_answer_follows(server):
    bounded = check_thinking_budget(server.base_url, "thinker", budget=8, max_tokens=64)

    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(model="thinker", messages=POEM, max_tokens=64, temperature=0, stream=True,
                                            extra_body={"reasoning_budget": 8})  # fmt: skip
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == bounded.message.reasoning_content
    assert "".join(delta.content or "" for delta in deltas) == bounded.message.content

    # reasoning_effort "none": no thinking at all, only an answer
    direct = client.chat.completions.create(model="thinker", messages=POEM, max_tokens=32, temperature=0,
                                            reasoning_effort="none").choices[0]  # fmt: skip
    assert not getattr(direct.message, "reasoning_content", None) and direct.message.content
