"""Configuration: TOML files and dicts, and errors that name the model and the field."""

from __future__ import annotations

import pytest

from lllms_core.config import load_config
from lllms_core.errors import ConfigError


def test_a_toml_file_loads_with_engine_options_beside_core_fields(tmp_path):
    path = tmp_path / "lllms.toml"
    path.write_text(
        """
[server]
concurrency = 2
max_queue = 5

[models."smol:chat-1.0"]
engine = "fake"
slots = 3
ttl = 0
completion_defaults = { temperature = 0.2 }
device = { gpu = false, cpu_threads = 2 }
"""
    )
    config = load_config(path)
    model = config.models["smol:chat-1.0"]
    assert config.server.concurrency == 2 and config.server.max_queue == 5
    assert model.id == "smol:chat-1.0"
    assert model.task == "chat-completion", "the engine's default task"
    assert model.options.slots == 3
    assert model.ttl == 0 and model.device.gpu is False and model.device.cpu_threads == 2


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"m": {"engine": "fake", "tll": 3}}, ["model 'm'", "tll"]),
        ({"m": {"engine": "fake", "ttl": "long"}}, ["model 'm'", "ttl", "float"]),
        ({"m": {"engine": "fake", "max_instances": 0}}, ["model 'm'", "max_instances", ">= 1"]),
        ({"m": {"engine": "fake", "device": {"gpu_layer": 3}}}, ["model 'm'", "gpu_layer"]),
        ({"m": {"engine": "nope"}}, ["model 'm'", "unknown engine 'nope'", "fake"]),
        ({"m": {"engine": "fake", "task": "speech-to-image"}}, ["model 'm'", "speech-to-image"]),
        ({"m": {"engine": "fake", "slots": "many"}}, ["model 'm'", "engine 'fake'", "slots"]),
        ({"m": {"engine": "fake", "min_instances": 2}}, ["model 'm'", "min_instances"]),
        ({"m": {"engine": "fake", "completion_defaults": {"temprature": 1}}}, ["model 'm'", "temprature"]),
        ({"m": {"engine": "fake", "completion_defaults": {"temperature": 9}}}, ["model 'm'", "temperature"]),
        ({"bad id!": {"engine": "fake"}}, ["model 'bad id!'", "letters, digits"]),
        ({"m": {"task": "chat-completion"}}, ["model 'm'", "engine"]),
    ],
)
def test_bad_model_settings_name_the_model_and_the_field(models, expected):
    with pytest.raises(ConfigError) as error:
        load_config({"models": models})
    for text in expected:
        assert text in error.value.message


def test_unknown_server_setting_is_an_error():
    with pytest.raises(ConfigError, match="concurency"):
        load_config({"server": {"concurency": 2}})


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[models\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
