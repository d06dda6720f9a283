"""Model preparation: the GGUF is converted once, and the plugin imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import msgspec
import pytest

from lllms_core.config import ModelConfig
from lllms_transformers import TransformersOptions, loading

pytestmark = pytest.mark.timeout(180)


def test_importing_the_plugin_imports_neither_torch_nor_transformers():
    code = "import sys, lllms_transformers; print(sorted({'torch', 'transformers', 'xgrammar'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert output.stdout.strip() == "[]"


def test_the_gguf_is_converted_once_and_reused(client, cache_dir, smollm2_gguf):
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    converted = loading.conversion_target(smollm2_gguf, cache_dir / "transformers")
    names = {path.name for path in converted.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", loading.CONVERTED_MARK} <= names
    assert json.loads((converted / loading.CONVERTED_MARK).read_text())["size"] > 0
    model = ModelConfig(id="smol", engine="transformers", options=msgspec.convert({}, TransformersOptions))
    started = time.monotonic()
    assert loading.prepare(model, smollm2_gguf, cache_dir) == converted
    assert time.monotonic() - started < 2
