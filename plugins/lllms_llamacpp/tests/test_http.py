"""The OpenAI Python client against lllms' HTTP API serving the llamacpp engine."""

from __future__ import annotations

import json
from functools import partial

import openai
import pytest
import trio

from lllms_core.http import serve_async
from lllms_core.testing import BackgroundServer, health_during


def config(model_file, cache_dir) -> dict:
    return {
        "server": {"cache_dir": str(cache_dir), "concurrency": 2},
        "models": {
            "smol": {
                "engine": "llamacpp",
                "location": str(model_file),
                "context_size": 512,
                "parallel": 2,
                "device": {"gpu": False, "cpu_threads": 1},
            }
        },
    }


async def test_openai_client_chat_stream_tools_and_completions(smollm2_file, tmp_path):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_async, config(smollm2_file, tmp_path), host="127.0.0.1", port=0))

        def use_the_client() -> None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
            answer = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "What is a dog?"}], max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=2,
            )
            assert "dog" in answer.choices[0].message.content.lower()
            assert len(answer.choices[0].logprobs.content) == 8

            stream = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Weather in Oslo?"}], stream=True, max_tokens=40,
                tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
                tool_choice="required", parallel_tool_calls=False, temperature=0,
            )
            arguments, names, finish = "", [], None
            for chunk in stream:
                choice = chunk.choices[0]
                for call in choice.delta.tool_calls or []:
                    if call.function.name:
                        names.append(call.function.name)
                    arguments += call.function.arguments or ""
                finish = choice.finish_reason or finish
            assert names == ["get_weather"] and finish == "tool_calls", (names, finish, arguments)
            assert isinstance(json.loads(arguments)["city"], str)

            completion = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=3, temperature=0)
            assert "Paris" in completion.choices[0].text

            # with echo, the offsets of the generated tokens count the echoed prompt
            prompt = "The capital of France is"
            echoed = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
            logprobs = echoed.choices[0].logprobs
            assert echoed.choices[0].text == prompt + "".join(logprobs.tokens)
            expected = [len(prompt) + len("".join(logprobs.tokens[:i])) for i in range(3)]
            assert logprobs.text_offset == expected and expected[0] == 24
            streamed = client.completions.create(
                model="smol", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True
            )
            assert [o for chunk in streamed for o in (chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs else [])] == expected

            try:
                client.chat.completions.create(
                    model="smol", messages=[{"role": "user", "content": "hi"}], extra_body={"grammar": "root ::= ("}
                )
            except openai.BadRequestError as error:
                assert error.body["param"] == "grammar"
            else:
                raise AssertionError("an invalid grammar must be a 400")

        await trio.to_thread.run_sync(use_the_client)
        nursery.cancel_scope.cancel()


def test_a_grammar_that_does_not_parse_is_a_400_before_a_stream_starts(smollm2_file, tmp_path):
    server = BackgroundServer(config(smollm2_file, tmp_path)).start()
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=60, max_retries=0)

        def stream(**fields):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], stream=True,
                                               **fields)
            return refused.value.body

        refused = stream(extra_body={"grammar": "root ::= ("})
        assert refused["param"] == "grammar" and "not valid GBNF" in refused["message"]
        impossible = {"name": "n", "schema": {"type": "integer", "minimum": 20, "maximum": 10}}
        refused = stream(response_format={"type": "json_schema", "json_schema": impossible})
        assert refused["param"] == "response_format" and "at least 20 and at most 10" in refused["message"]
    finally:
        server.stop()


def test_a_huge_message_and_many_logit_bias_keys_leave_the_server_answering(smollm2_file, tmp_path):
    """Rendering, tokenizing and logit_bias keys run in a worker thread: /health answers at
    once meanwhile (on the event loop they stalled it for 32 s and 5 s)."""
    settings = config(smollm2_file, tmp_path) | {"http": {"max_body_size": 64 * 1024 * 1024}}
    server = BackgroundServer(settings).start()
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=300, max_retries=0)
        huge = [{"role": "user", "content": "word " * 10_000_000}]  # 50 MB

        def send_huge():
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="smol", messages=huge, max_tokens=2)
            return refused.value

        refusal, latencies = health_during(server.base_url, send_huge)
        assert refusal.body["code"] == "context_length_exceeded"
        assert len(latencies) >= 2 and max(latencies) < 3, latencies
        print("huge message: /health answered in", max(latencies), "s at most, polled", len(latencies), "times")
        biases = {f"word{number}": -1 for number in range(100_000)}
        answer, latencies = health_during(server.base_url, lambda: client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Say hello."}], logit_bias=biases, max_tokens=2))
        assert answer.choices[0].message.content
        assert len(latencies) >= 2 and max(latencies) < 3, latencies
        print("logit_bias keys: /health answered in", max(latencies), "s at most, polled", len(latencies), "times")
    finally:
        server.stop()
