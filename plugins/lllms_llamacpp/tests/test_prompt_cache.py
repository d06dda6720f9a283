"""Saved states with the real SmolLM2: a conversation's KV cells saved from one sequence and
restored into another (in RAM, and from disk after its instance is gone or the server
restarted), as the prompt cache does when conversations outnumber slots."""

from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
import trio

from lllms_core.engine import ChunkSink, TaskContext
from lllms_core.http import serve_async
from lllms_core.prompt_cache import PromptCache
from lllms_core.schemas import ChatCompletionRequest

STORY = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a storm at sea, with many details."}]
OTHER = [{"role": "user", "content": "What is the capital of France? Explain its long history."}]


def four_sequences(loaded, model_config):
    """4 empty sequences of 1024 tokens in one unified KV cache."""
    return loaded(model_config(context_size=1024, parallel=4, kv_unified=True))


@pytest.fixture
def smol4(loaded, model_config):
    instance = four_sequences(loaded, model_config)
    yield instance
    instance.instance.close()


async def chat(smol, slot: int, messages: list[dict], cache: PromptCache | None, *, max_tokens=16):
    """A greedy chat on ``slot`` (reset by the pool) with ``cache`` as the model's prompt cache: (text, usage)."""
    chunks = []
    request = msgspec.convert({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": max_tokens},
                              ChatCompletionRequest)
    context = TaskContext(instance=smol.instance, slot=slot, model=smol.config, fresh=True, prompt_cache=cache)
    result = await smol.engine.chat_completion(context, request, ChunkSink(chunks.append))
    return "".join(chunk.text for chunk in chunks), result.usage


class Story:
    """Turn 1 of STORY, saved in a prompt cache (RAM, and disk in ``directory``) by an
    instance that then gave its slot to another conversation; turn 2's messages and the
    answer to them evaluated from the start (the reference)."""

    def __init__(self, smol, directory: Path):
        self.directory = directory
        self.cache = PromptCache("smollm2", ram_bytes=256 << 20, disk_bytes=1 << 30, directory=directory)
        trio.run(self._make, smol)

    async def _make(self, smol) -> None:
        self.signature = await smol.engine.state_signature(smol.config, smol.instance)
        await trio.to_thread.run_sync(self.cache.attach, self.signature)
        answer, _ = await chat(smol, 0, STORY, None, max_tokens=32)
        self.turn2 = STORY + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What happened next?"}]
        await chat(smol, 0, OTHER, self.cache)  # slot 0 now holds another conversation: STORY's state is saved
        self.reference, usage = await chat(smol, 1, self.turn2, None)
        assert usage.cached_tokens < 40, "only the template's head may be shared: the reference evaluates the story"
        assert await trio.to_thread.run_sync(self.cache.persist) == 1


@pytest.fixture(scope="module")
def story(loaded, model_config, tmp_path_factory):
    smol = four_sequences(loaded, model_config)
    yield Story(smol, tmp_path_factory.mktemp("states") / "prompt-cache" / "smollm2")
    smol.instance.close()


async def test_a_restored_state_continues_exactly_as_evaluating_again_would(story, smol4):
    restored, usage = await chat(smol4, 1, story.turn2, story.cache)
    assert restored == story.reference
    assert usage.cached_tokens > usage.prompt_tokens - 20, "the first turn came back from the cache"
    ram = story.cache.status()["ram"]
    assert ram["restores"] >= 1 and ram["tokens_saved"] >= usage.cached_tokens


async def test_a_state_on_disk_is_restored_after_a_restart(story, smol4, tmp_path):
    directory = tmp_path / "smollm2"
    shutil.copytree(story.directory, directory)
    after = PromptCache("smollm2", ram_bytes=256 << 20, disk_bytes=1 << 30, directory=directory)
    await trio.to_thread.run_sync(after.attach, story.signature)
    answer, usage = await chat(smol4, 2, story.turn2, after)
    assert answer == story.reference
    assert usage.cached_tokens > usage.prompt_tokens - 20
    assert after.status()["disk"]["restores"] == 1


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "stale"])
async def test_a_damaged_or_stale_state_file_is_dropped_and_the_prompt_evaluated(story, smol4, tmp_path, damage):
    directory = tmp_path / "smollm2"
    shutil.copytree(story.directory, directory)
    [saved] = directory.glob("*/*.state")
    data = bytearray(saved.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        saved.write_bytes(bytes(data))
    elif damage == "truncated":
        saved.write_bytes(bytes(data[: len(data) - 1000]))
    after = PromptCache("smollm2", ram_bytes=256 << 20, disk_bytes=1 << 30, directory=directory)  # a restart
    signature = dict(story.signature)
    if damage == "stale":
        signature["llama_cpp"] += "-another-build"
    await trio.to_thread.run_sync(after.attach, signature)
    answer, usage = await chat(smol4, 2, story.turn2, after)
    assert answer == story.reference
    assert usage.cached_tokens < 40, "nothing came from the damaged or stale file"
    assert not saved.exists(), "the file is dropped"
    assert after.status()["disk"]["restores"] == 0


def served(cache_dir: Path, model_file: Path, ttl: float) -> dict:
    return {
        "server": {"cache_dir": str(cache_dir)},
        "models": {
            "smol": {"engine": "llamacpp", "location": str(model_file), "context_size": 1024, "parallel": 2,
                     "ttl": ttl, "device": {"gpu": False, "cpu_threads": 1}},
        },
    }


async def test_a_conversation_continues_after_ttl_disposal_and_after_a_restart(smollm2_file, tmp_path):
    messages = list(STORY)

    def turn(port: int, wait_for_disposal: bool = False) -> tuple[int, int]:
        """One turn through the openai client; returns its cached and prompt tokens."""
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while wait_for_disposal and httpx.get(base + "/").json()["instances"]:
            assert time.monotonic() < deadline, "the instance outlived its TTL"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)
        answer = client.chat.completions.create(model="smol", messages=messages, max_tokens=32, temperature=0)
        messages.extend([{"role": "assistant", "content": answer.choices[0].message.content},
                         {"role": "user", "content": "And then?"}])
        return answer.usage.prompt_tokens_details.cached_tokens, answer.usage.prompt_tokens

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_async, served(tmp_path, smollm2_file, ttl=0.5), host="127.0.0.1", port=0))
        await trio.to_thread.run_sync(turn, port)
        cached, prompt = await trio.to_thread.run_sync(turn, port, True)  # after the instance's TTL disposal
        assert cached > prompt - 20, (cached, prompt)
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:  # a restart: nothing in RAM, the states on disk
        port = await nursery.start(partial(serve_async, served(tmp_path, smollm2_file, ttl=300), host="127.0.0.1", port=0))
        cached, prompt = await trio.to_thread.run_sync(turn, port)
        status = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{port}/").json())
        nursery.cancel_scope.cancel()
    assert cached > prompt - 20, (cached, prompt)
    disk = status["models"]["smol"]["prompt_cache"]["disk"]
    assert disk["restores"] == 1 and disk["tokens_saved"] == cached
