"""What the forward engine adds beyond the conformance suite: the other server's refusals
and absence reach the client with the right status, through lllms' HTTP API."""

from __future__ import annotations

import openai
import pytest

from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(60)


def test_a_refusal_of_the_other_server_keeps_its_status_and_param(upstream):
    config = {"models": {"m": {"engine": "forward", "base_url": upstream.url("/v1"), "upstream_model": "chat"}}}
    with BackgroundServer(config) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content == "You said: hello"
        with pytest.raises(openai.BadRequestError) as refused:  # the fake engine has no top_k... nor json_schema
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}],
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            )  # fmt: skip
        assert refused.value.body["param"] == "response_format" and refused.value.body["code"] == "unsupported_parameter"


def test_an_other_server_that_cannot_be_reached_is_a_502():
    config = {"models": {"m": {"engine": "forward", "base_url": "http://127.0.0.1:9/v1"}}}
    with BackgroundServer(config) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 502 and "cannot be reached" in failed.value.body["message"]
