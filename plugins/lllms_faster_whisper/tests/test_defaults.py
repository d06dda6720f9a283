"""`lllms serve` without a configuration serves speech when the speech engines and their
model packages are installed."""

from __future__ import annotations

from lllms_core.config import load_config
from lllms_core.defaults import default_config


def test_the_default_configuration_hears_speaks_and_answers_voice():
    config = load_config(default_config())
    assert config.models["whisper-tiny.en"].engine == "faster-whisper"
    assert config.models["piper-joe"].task == "text-to-speech"
    voice = config.models["voice"]
    assert (voice.engine, voice.options.speech_model, voice.options.chat_model) == ("composed", "whisper-tiny.en", "smollm2")
