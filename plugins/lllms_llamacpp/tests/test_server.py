"""Requests through the lllms facade (pool, slots, context keys) to the llamacpp engine."""

from __future__ import annotations

import json

import trio

from lllms_core.server import ModelServer



def config(model_file, cache_dir) -> dict:
    return {
        "server": {"cache_dir": str(cache_dir), "concurrency": 4},
        "models": {
            "smol": {
                "engine": "llamacpp",
                "location": str(model_file),
                "context_size": 512,
                "parallel": 4,
                "device": {"gpu": False, "cpu_threads": 1},
                "initial_messages": [{"role": "system", "content": "Your name is Bartholomew."}],
                "completion_defaults": {"temperature": 0},
            },
            "smol-embed": {
                "engine": "llamacpp",
                "task": "embedding",
                "location": str(model_file),
                "context_size": 256,
            },
        },
    }


async def test_chat_text_and_embeddings_through_the_server(smollm2_file, tmp_path):
    async with ModelServer(config(smollm2_file, tmp_path)) as server:
        system = {"role": "system", "content": "Your name is Bartholomew."}
        question = {"role": "user", "content": "What is your name?"}
        first = await server.chat_completion({"model": "smol", "messages": [system, question], "max_tokens": 8})
        assert "Bartholomew" in first.choices[0].text
        assert first.usage.cached_tokens > 5  # the preloaded system message
        follow_up = [system, question, {"role": "assistant", "content": first.choices[0].text},
                     {"role": "user", "content": "And what is a dog?"}]
        second = await server.chat_completion({"model": "smol", "messages": follow_up, "max_tokens": 4})
        assert second.usage.cached_tokens >= first.usage.prompt_tokens + first.usage.completion_tokens - 3

        text = await server.text_completion({"model": "smol", "prompt": "The capital of France is", "max_tokens": 3})
        assert "Paris" in text.choices[0].text

        embedded = await server.embedding({"model": "smol-embed", "input": ["a cat", "a kitten", "tax law"]})
        assert len(embedded.embeddings) == 3


async def test_concurrent_streams_and_a_forced_tool_call(smollm2_file, tmp_path):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    async with ModelServer(config(smollm2_file, tmp_path)) as server:
        answers: dict[str, str] = {}

        async def ask(word: str) -> None:
            request = {"model": "smol", "messages": [{"role": "user", "content": f"What is a {word}? Answer in one sentence."}],
                       "max_tokens": 12, "temperature": 0}
            async with server.stream_chat_completion(request) as stream:
                pieces = [chunk.text async for chunk in stream]
            answers[word] = "".join(pieces)

        async with trio.open_nursery() as nursery:
            for word in ("apple", "banana", "dog", "tiger"):
                nursery.start_soon(ask, word)
        assert all(word in answer.lower() for word, answer in answers.items()), answers

        called = await server.chat_completion(
            {"model": "smol", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool],
             "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 40}
        )
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.tool_calls[0].function.name == "get_weather"
        assert "city" in json.loads(choice.tool_calls[0].function.arguments)


async def test_grammar_and_tools_hold_under_concurrency(smollm2_file, tmp_path):
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    seeded = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a fun fact."}],
              "temperature": 1.0, "seed": 1234, "max_tokens": 16}
    shaped = {"model": "smol", "messages": [{"role": "user", "content": "Name a colour as JSON."}], "max_tokens": 30,
              "response_format": {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}}
    called = {"model": "smol", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [tool],
              "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 40}
    plain = {"model": "smol", "messages": [{"role": "user", "content": "Count from one to ten."}], "max_tokens": 20}
    async with ModelServer(config(smollm2_file, tmp_path)) as server:
        results = {}

        async def run(name, request):
            results[name] = await server.chat_completion(request)

        async with trio.open_nursery() as nursery:
            for name, request in {"seeded": seeded, "shaped": shaped, "called": called, "plain": plain}.items():
                nursery.start_soon(run, name, request)
    # a seed repeats a request's text when it runs alone (test_chat); batched with others the
    # logits differ in the last bits (llama.cpp's sums depend on the batch), so the text may too
    assert results["seeded"].choices[0].text
    assert isinstance(json.loads(results["shaped"].choices[0].text)["colour"], str)
    call = results["called"].choices[0]
    assert call.finish_reason == "tool_calls" and call.tool_calls[0].function.name == "get_weather"
    assert "city" in json.loads(call.tool_calls[0].function.arguments)
    assert results["plain"].choices[0].text
