"""A plugin sampler's logits processor steers SmolLM2's generation, through the HTTP API
of a server whose plugin manager has the sampler registered."""

from __future__ import annotations

import openai
import pytest

from lllms_core.hookspecs import hookimpl
from lllms_core.plugins import get_plugin_manager
from lllms_core.samplers import Sampler
from lllms_core.server import ModelServer
from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(240)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


class BanTokens:
    """``banned_token_ids``: token ids the model may never choose. Records the sequences
    its processor was called with."""

    def __init__(self):
        self.sequences: list[list[int]] = []

    @hookimpl
    def register_samplers(self, register):
        register(Sampler(name="ban_tokens", parameters=("banned_token_ids",), logits_processor=self.processor))

    def processor(self, value, request):
        banned = list(value)

        def ban(token_ids, logits):
            assert isinstance(token_ids, list) and all(isinstance(token, int) for token in token_ids)
            assert logits.dim() == 1 and logits.is_floating_point()
            self.sequences.append(token_ids)
            logits[banned] = -float("inf")
            return logits

        return ban


@pytest.fixture(scope="module")
def ban_tokens():
    return BanTokens()


@pytest.fixture(scope="module")
def plugin_client(config, ban_tokens):
    manager = get_plugin_manager()
    manager.register(ban_tokens)
    models = {"smol": config["models"]["smol"], "echo": {"engine": "fake", "reply": "hello"}}
    running = BackgroundServer(ModelServer({"server": config["server"], "models": models}, plugins=manager)).start()
    yield openai.OpenAI(base_url=running.base_url + "/v1", api_key="unused", timeout=180, max_retries=0)
    running.stop()


def answer(client, banned: list[int]) -> str:
    response = client.chat.completions.create(
        model="smol", messages=CAPITAL, max_tokens=6, temperature=0, extra_body={"banned_token_ids": banned}
    )
    return response.choices[0].message.content


def test_a_plugin_sampler_bans_the_greedy_answers_first_token(plugin_client, ban_tokens):
    first_answer = answer(plugin_client, [])
    prompt, first_token = ban_tokens.sequences[0], ban_tokens.sequences[1][-1]
    assert ban_tokens.sequences[1] == prompt + [first_token], "token_ids: the prompt, then the generated tokens"

    ban_tokens.sequences.clear()
    second_answer = answer(plugin_client, [first_token])
    generated = ban_tokens.sequences[-1][len(prompt) :]
    assert second_answer != first_answer
    assert not second_answer.startswith(first_answer.split()[0])
    # the processor saw every generated token but the last, whose logits it banned too
    assert generated and first_token not in generated


def test_an_engine_without_logits_processors_refuses_a_plugin_sampler(plugin_client):
    with pytest.raises(openai.BadRequestError) as refused:
        plugin_client.chat.completions.create(model="echo", messages=CAPITAL, extra_body={"banned_token_ids": [1]})
    error = refused.value.body
    assert error["param"] == "banned_token_ids" and error["code"] == "unsupported_parameter"
