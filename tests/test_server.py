"""The library facade: one method per task, streaming, defaults and refusals."""

from __future__ import annotations

import pytest
from helpers.sound import tone_wav

from lllms_core.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, UnsupportedParameterError
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(30)

CONFIG = {
    "models": {
        "chat": {"engine": "fake", "completion_defaults": {"max_tokens": 3}},
        "embed": {"engine": "fake", "task": "embedding"},
        "ears": {"engine": "fake", "task": "speech-to-text"},
    }
}


@pytest.fixture
async def server():
    async with ModelServer(CONFIG) as server:
        yield server


def user(text):
    return [{"role": "user", "content": text}]


async def test_streamed_chunks_add_up_to_the_completion(server):
    texts = []
    async with server.stream_chat_completion({"model": "chat", "messages": user("a b"), "max_tokens": 10}) as stream:
        async for chunk in stream:
            texts.append(chunk.text)
    completion = stream.completion()
    assert len(texts) > 1
    assert "".join(texts) == completion.choices[0].text == "You said: a b"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_completion_defaults_apply_only_where_the_request_is_silent(server):
    short = await server.chat_completion({"model": "chat", "messages": user("one two three four")})
    assert short.choices[0].text == "You said: one" and short.choices[0].finish_reason == "length"
    full = await server.chat_completion({"model": "chat", "messages": user("one two"), "max_tokens": 50})
    assert full.choices[0].text == "You said: one two"


async def test_n_choices_and_tool_calls_are_accumulated(server):
    several = await server.chat_completion({"model": "chat", "messages": user("hi"), "n": 3, "max_tokens": 9})
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert {choice.text for choice in several.choices} == {"You said: hi"}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    called = await server.chat_completion({"model": "chat", "messages": user("find x"), "tools": [tool]})
    (call,) = called.choices[0].tool_calls
    assert called.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup" and call.function.arguments == '{"echo": "find x"}'


async def test_a_chat_model_also_answers_text_completions(server):
    completion = await server.text_completion({"model": "chat", "prompt": "Once upon a time", "max_tokens": 2})
    assert completion.choices[0].text == "and then"


async def test_embeddings_and_transcriptions(server):
    result = await server.embedding({"model": "embed", "input": ["a cat", "a dog"], "dimensions": 4})
    assert [len(vector) for vector in result.embeddings] == [4, 4]
    assert all(abs(sum(v * v for v in vector) - 1) < 1e-6 for vector in result.embeddings)
    wav = tone_wav(0.5)
    heard = await server.speech_to_text({"model": "ears", "audio": wav})
    assert heard.text == f"fake transcription of {len(wav)} bytes"


async def test_requests_that_cannot_be_served_are_refused_before_anything_runs(server):
    with pytest.raises(ModelNotFoundError) as missing:
        await server.chat_completion({"model": "nope", "messages": user("hi")})
    assert missing.value.status == 404 and missing.value.param == "model"
    with pytest.raises(InvalidRequestError, match="embedding model"):
        await server.chat_completion({"model": "embed", "messages": user("hi")})
    with pytest.raises(UnsupportedParameterError) as unsupported:
        await server.chat_completion({"model": "chat", "messages": user("hi"), "logit_bias": {"1": 5}})
    assert unsupported.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as invalid:
        await server.chat_completion({"model": "chat", "messages": user("hi"), "temperature": 3})
    assert invalid.value.param == "temperature"
    assert server.status()["processing"] == 0 and server.status()["queued"] == 0


async def test_an_error_leaving_the_model_server_block_is_raised_as_it_is_not_in_an_exception_group():
    with pytest.raises(ModelLoadError, match="refuses to load"):
        async with ModelServer({"models": {"broken": {"engine": "fake", "fail_loads": 1_000}}}) as server:
            await server.chat_completion({"model": "broken", "messages": user("hi")})
    with pytest.raises(KeyError, match="the caller's own"):
        async with ModelServer(CONFIG):
            raise KeyError("the caller's own")


async def test_one_prompt_per_call_and_no_empty_token_prompt_reach_the_engine(server):
    for prompt, param in (([], "prompt"), (["a", "b"], "prompt"), ([[]], "prompt[0]")):
        with pytest.raises(InvalidRequestError) as refused:
            await server.text_completion({"model": "chat", "prompt": prompt})
        assert refused.value.param == param
