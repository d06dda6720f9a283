"""The plugin as lllms sees it: entry point, option validation, lazy import."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from lllms_core.config import load_config
from lllms_core.errors import ConfigError
from lllms_core.plugins import get_plugin_manager

from lllms_llamacpp import LlamaCppEngine, LlamaCppOptions


def test_the_entry_point_registers_the_engine():
    assert get_plugin_manager().engines["llamacpp"] is LlamaCppEngine


def test_options_are_read_flat_from_the_model_table():
    config = load_config(
        {"models": {"m": {"engine": "llamacpp", "location": "/m.gguf", "parallel": 2, "context_overflow": "error",
                          "lora": [{"path": "/a.gguf", "scale": 0.5}]}}}
    )
    options = config.models["m"].options
    assert isinstance(options, LlamaCppOptions)
    assert options.parallel == 2 and options.lora[0].scale == 0.5
    assert config.models["m"].context_overflow == "error"  # a core field, beside the options


def test_a_misspelt_option_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="paralel"):
        load_config({"models": {"m": {"engine": "llamacpp", "location": "/m.gguf", "paralel": 2}}})


def test_importing_the_plugin_does_not_import_llama_cpp():
    code = "import sys, lllms_llamacpp; print('llama_cpp' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lora": [{"path": "/no/such/adapter.gguf"}]}, "LoRA adapter"),
        ({"chat_template": "{% for %}"}, "chat template"),
    ],
)
def test_load_errors_name_what_is_wrong(smollm2_file, model_config, options, message):
    from lllms_core.engine import Device
    from lllms_core.errors import ModelLoadError

    from lllms_llamacpp.engine import load_instance

    config = model_config(context_size=64)
    config.options = msgspec.convert(options, LlamaCppOptions)
    with pytest.raises(ModelLoadError, match=message):
        load_instance(config, smollm2_file, Device(gpu=False, cpu_threads=1))


def test_a_cpu_only_build_does_not_claim_the_gpu():
    from lllms_core.plugins import get_plugin_manager

    import llama_cpp

    engine = get_plugin_manager().engines["llamacpp"]()
    assert engine.gpu_available() is bool(llama_cpp.llama_supports_gpu_offload())
    assert engine.gpu_available() is False, "this machine's llama-cpp-python is a CPU build"
