"""The engine's model options and chat-format recognition (no model needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt4all_models import SMOLLM_URL
from lllms_core.config import load_config
from lllms_core.errors import ConfigError
from lllms_gpt4all.chat import CHAT_FORMATS, detect_chat_format


def model_config(**options):
    return load_config({"models": {"m": {"engine": "gpt4all", "url": SMOLLM_URL, **options}}}).models["m"]


def test_options_are_read_from_the_model_table():
    options = model_config(batch_size=64, chat_format="llama3", user_template="<u>%1</u>").options
    assert (options.batch_size, options.chat_format, options.user_template) == (64, "llama3", "<u>%1</u>")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"user_template": "no placeholder"}, "user_template"),
        ({"system_template": "%1 and %2"}, "system_template"),
        ({"batch_size": 512}, "batch_size"),
        ({"chat_format": "alpaca"}, "chat_format"),
        ({"batch_sise": 64}, "batch_sise"),
    ],
)
def test_a_bad_option_is_a_config_error_naming_it(options, field):
    with pytest.raises(ConfigError, match=field):
        model_config(**options)


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{{ '<|im_start|>' + message['role'] }}{{ '<|im_end|>' }}", "chatml"),
        ("{{ '<|start_header_id|>' + role + '<|end_header_id|>' }}{{ '<|eot_id|>' }}", "llama3"),
        ("{{ '<|user|>' + content + '<|end|>' }}{{ '<|assistant|>' }}", "phi3"),
        ("{{ '<|user|>\n' + content + eos_token }}{{ '<|assistant|>' }}", None),  # Zephyr
        ("{{ '[INST] ' + content + ' [/INST]' }}", None),
        (None, None),
    ],
)
def test_chat_format_is_recognised_from_the_jinja_template(template, expected):
    assert detect_chat_format(template) == expected


def test_a_reply_is_the_assistant_template_split_at_its_text():
    chatml = CHAT_FORMATS["chatml"]
    assert chatml.reply_template() == "<|im_start|>user\n%1<|im_end|>\n<|im_start|>assistant\n%2"
    assert chatml.reply_end == "<|im_end|>\n"


def test_the_engine_is_registered_without_importing_gpt4all():
    script = (
        "import sys; from lllms_core.plugins import get_plugin_manager; "
        "engine = get_plugin_manager().engines['gpt4all']; "
        "assert engine.__module__ == 'lllms_gpt4all.engine', engine; "
        "heavy = [name for name in ('gpt4all', 'gguf', 'numpy') if name in sys.modules]; "
        "assert not heavy, heavy"
    )
    environment = {**os.environ, "LLLMS_PLUGINS": "gpt4all"}  # this plugin alone
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr
