"""LoRA adapters: a random adapter built here (none is available offline) changes greedy
output at scale 1 and leaves it unchanged at scale 0; bad adapters are load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lllms_core.errors import ModelLoadError
from lllms_core.server import ModelServer

from lllms_llamacpp.engine import LoraAdapter

pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"
RANK = 8
# SmolLM2-135M: hidden size 576, feed-forward size 1536, keys and values 192 wide
TARGETS = {"attn_q": (576, 576), "attn_v": (576, 192), "ffn_up": (576, 1536), "ffn_down": (1536, 576)}
"""Weights the test adapter adapts, in each of the first four layers -> (inputs, outputs)."""


def write_adapter(path: Path, targets: dict[str, tuple[int, int]], architecture: str = "llama") -> Path:
    """A LoRA adapter in llama.cpp's GGUF format with seeded random weights.

    For a weight W of ggml shape [inputs, outputs], ``W.lora_a`` is [inputs, rank] and
    ``W.lora_b`` [rank, outputs] (numpy shapes are the reverse); llama.cpp adds
    ``scale * alpha / rank * B @ A @ x`` to ``W @ x``.
    """
    import gguf

    rng = np.random.default_rng(0)  # weights of std 0.1: enough to change greedy output at scale 1
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(RANK))
    for name, (inputs, outputs) in targets.items():
        writer.add_tensor(f"{name}.lora_a", rng.normal(0, 0.1, (RANK, inputs)).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", rng.normal(0, 0.1, (outputs, RANK)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("lora")
    targets = {f"blk.{layer}.{name}.weight": shape for layer in range(4) for name, shape in TARGETS.items()}
    return {
        "good": str(write_adapter(folder / "random.gguf", targets)),
        "wrong shape": str(write_adapter(folder / "wrong-shape.gguf", {"blk.0.attn_q.weight": (64, 576)})),
        "wrong architecture": str(write_adapter(folder / "qwen2.gguf", targets, architecture="qwen2")),
    }


async def greedy_text(loaded, model_config, lora: list[LoraAdapter]) -> str:
    smol = loaded(model_config(context_size=128, parallel=1, lora=lora))
    try:
        text, _, _ = await smol.complete(prompt=PROMPT, max_tokens=16)
    finally:
        smol.instance.close()
    return text


async def test_the_scale_weighs_the_adapter_and_zero_turns_it_off(loaded, model_config, adapters):
    base = await greedy_text(loaded, model_config, [])
    full, weak, off = [
        await greedy_text(loaded, model_config, [LoraAdapter(path=adapters["good"], scale=scale)])
        for scale in (1.0, 0.3, 0.0)
    ]
    assert "Paris" in base
    assert full != base and weak not in (base, full)
    assert off == base


async def test_a_missing_adapter_fails_the_load_naming_it(smollm2_file, tmp_path):
    missing = str(tmp_path / "no-such-adapter.gguf")
    model = {"engine": "llamacpp", "location": str(smollm2_file), "context_size": 64, "parallel": 1,
             "device": {"gpu": False, "cpu_threads": 1}, "lora": [{"path": missing}]}
    async with ModelServer({"models": {"smol": model}}) as server:
        with pytest.raises(ModelLoadError) as caught:
            await server.text_completion({"model": "smol", "prompt": PROMPT, "max_tokens": 1})
    assert repr(missing) in caught.value.message and "does not exist" in caught.value.message


@pytest.mark.parametrize(
    "adapter, reason",
    [("wrong shape", "'blk.0.attn_q.weight' has incorrect shape"), ("wrong architecture", "arch mismatch")],
)
def test_an_adapter_for_another_model_is_a_load_error_saying_why(loaded, model_config, adapters, adapter, reason):
    with pytest.raises(ModelLoadError) as caught:
        loaded(model_config(context_size=64, parallel=1, lora=[LoraAdapter(path=adapters[adapter])]))
    assert repr(adapters[adapter]) in caught.value.message and reason in caught.value.message
