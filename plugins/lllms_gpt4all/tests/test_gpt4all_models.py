"""Preparing and loading models: the compatible copy for a newer pre-tokenizer, the
error for an unknown one, quiet loading, timeouts, and the CPU fallback."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import trio

from gpt4all_models import CPU, SMOLLM_URL
from lllms_core.config import load_config
from lllms_core.errors import ModelLoadError, RequestTimeoutError
from lllms_core.server import ModelServer
from lllms_core.store import ModelStore
from lllms_gpt4all import Gpt4AllEngine

pytestmark = pytest.mark.timeout(120)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def engine_for(cache_dir, models: dict):
    config = load_config({"server": {"cache_dir": str(cache_dir)}, "models": models})
    engines: dict = {}
    store = ModelStore(config, engines)
    engines["gpt4all"] = engine = Gpt4AllEngine(store)
    return engine, config


async def test_newer_pre_tokenizer_gets_a_compatible_copy(tmp_path, smollm_path, caplog):
    original_digest, original_mtime = sha256(smollm_path), os.stat(smollm_path).st_mtime
    engine, config = engine_for(tmp_path, {"smol": {"engine": "gpt4all", "url": SMOLLM_URL}})
    model = config.models["smol"]

    with caplog.at_level(logging.INFO, logger="lllms.gpt4all"):
        prepared = await engine.prepare_model(model, smollm_path)
    copy = prepared.path
    assert copy.startswith(str(tmp_path / "gpt4all-compat"))
    assert "'smollm'" in caplog.text and "'refact'" in caplog.text and copy in caplog.text
    # the copy differs from the original in the pre-tokenizer's value only
    original, copied = np.fromfile(smollm_path, dtype=np.uint8), np.fromfile(copy, dtype=np.uint8)
    assert original.size == copied.size
    differing = np.flatnonzero(original != copied)  # "smollm" and "refact" differ in every letter
    assert differing.tolist() == list(range(differing[0], differing[0] + 6))
    assert bytes(original[differing]) == b"smollm" and bytes(copied[differing]) == b"refact"
    # and the original is untouched
    assert (sha256(smollm_path), os.stat(smollm_path).st_mtime) == (original_digest, original_mtime)

    # an up-to-date copy is reused, not written again
    caplog.clear()
    written_at = os.stat(copy).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="lllms.gpt4all"):
        again = await engine.prepare_model(model, smollm_path)
    assert again.path == copy and os.stat(copy).st_mtime_ns == written_at
    assert "wrote a copy" not in caplog.text

    # and gpt4all loads it
    instance = await engine.create_instance(model, prepared, load_device())
    try:
        assert instance.native.backend == "cpu"
    finally:
        await engine.dispose_instance(instance)


def load_device():
    from lllms_core.engine import Device

    return Device(gpu=False, cpu_threads=1)


async def test_models_sharing_a_file_share_one_copy(tmp_path, smollm_path, caplog):
    engine, config = engine_for(
        tmp_path, {name: {"engine": "gpt4all", "url": SMOLLM_URL} for name in ("one", "two")}
    )
    prepared = {}

    async def prepare(name):
        prepared[name] = await engine.prepare_model(config.models[name], smollm_path)

    with caplog.at_level(logging.INFO, logger="lllms.gpt4all"):
        async with trio.open_nursery() as nursery:
            for name in ("one", "two"):
                nursery.start_soon(prepare, name)
    assert prepared["one"].path == prepared["two"].path
    assert caplog.text.count("wrote a copy") == 1
    assert [p.name for p in (tmp_path / "gpt4all-compat").iterdir() if p.suffix == ".gguf"] == [
        os.path.basename(prepared["one"].path)
    ]


async def test_unknown_pre_tokenizer_fails_preparation_naming_it(tmp_path, unknown_pre_tokenizer_gguf):
    engine, config = engine_for(
        tmp_path, {"future": {"engine": "gpt4all", "location": str(unknown_pre_tokenizer_gguf)}}
    )
    with pytest.raises(ModelLoadError, match="'future-bpe'"):
        await engine.prepare_model(config.models["future"], unknown_pre_tokenizer_gguf)
    assert not (tmp_path / "gpt4all-compat").exists()


async def test_an_embedding_task_needs_a_bert_model(tmp_path, smollm_path):
    engine, config = engine_for(tmp_path, {"e": {"engine": "gpt4all", "task": "embedding", "url": SMOLLM_URL}})
    with pytest.raises(ModelLoadError, match="BERT"):
        await engine.prepare_model(config.models["e"], smollm_path)


def test_loading_on_a_machine_without_cuda_prints_nothing(tmp_path, smollm_path):
    """gpt4all prints a line per CUDA backend it cannot load; the engine keeps them out
    of stderr (they go to the debug log)."""
    script = textwrap.dedent(
        f"""
        import logging, trio
        from lllms_core.engine import Device
        from lllms_core.config import load_config
        from lllms_core.store import ModelStore
        from lllms_gpt4all import Gpt4AllEngine

        logging.basicConfig(level=logging.DEBUG, format="LOG %(name)s %(message)s")
        config = load_config({{"server": {{"cache_dir": {str(tmp_path)!r}}},
                               "models": {{"m": {{"engine": "gpt4all", "url": {SMOLLM_URL!r}}}}}}})
        engine = Gpt4AllEngine(ModelStore(config, {{}}))

        async def main():
            model = config.models["m"]
            prepared = await engine.prepare_model(model, {str(smollm_path)!r})
            instance = await engine.create_instance(model, prepared, Device(gpu=False, cpu_threads=1))
            await engine.dispose_instance(instance)

        trio.run(main)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines() if not line.startswith("LOG ")]
    assert noise == []
    from gpt4all import _pyllmodel

    if not _pyllmodel.cuda_found:  # then gpt4all did complain, and it went to the debug log
        assert any(line.startswith("LOG lllms.gpt4all gpt4all: Failed to load") for line in result.stderr.splitlines())


async def test_timeout_stops_generation_and_frees_the_instance(tmp_path):
    config = {
        "server": {"cache_dir": str(tmp_path), "request_timeout": 1},
        "models": {"smol": {"engine": "gpt4all", "url": SMOLLM_URL, "min_instances": 1, "device": CPU}},
    }
    essay = {"model": "smol", "messages": [{"role": "user", "content": "Write a long essay about Rome."}]}
    async with ModelServer(config) as server:
        started = trio.current_time()
        with pytest.raises(RequestTimeoutError):
            await server.chat_completion({**essay, "max_tokens": 1500})
        assert trio.current_time() - started < 5
        answer = await server.chat_completion({**essay, "max_tokens": 3})
        assert answer.choices[0].finish_reason == "length"


async def test_gpu_auto_falls_back_to_the_cpu_without_a_gpu(tmp_path):
    config = {
        "server": {"cache_dir": str(tmp_path)},
        "models": {
            "smol": {"engine": "gpt4all", "url": SMOLLM_URL, "min_instances": 1, "device": {"gpu": "auto", "cpu_threads": 1}}
        },
    }
    async with ModelServer(config) as server:
        answer = await server.chat_completion(
            {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        )
        assert answer.usage.completion_tokens > 0
        (instance,) = server.status()["instances"]
        assert instance["info"]["backend"] in ("cpu", "kompute", "cuda", "metal")


def test_a_load_failure_says_why(smollm_path):
    """llama.cpp tells why a load fails on stderr only; the error carries it (here: the
    original SmolLM2 file, which the compatible copy exists for)."""
    from lllms_gpt4all.native import NativeModel

    with pytest.raises(ModelLoadError, match="unknown pre-tokenizer type: 'smollm'"):
        NativeModel(
            str(smollm_path), context_size=512, gpu_layers=0, backend="kompute", gpu_device=None, threads=1, batch_size=8
        )
