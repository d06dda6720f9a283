"""lllms' engine conformance suite against the gpt4all engine: SmolLM2-135M-Instruct (its
gpt4all-compatible copy) for chat and text, all-MiniLM-L6-v2 as a BERT GGUF for embeddings,
on the session's server."""

from __future__ import annotations

import pytest

from lllms_core.testing.conformance import ConformanceModels, EngineConformance

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def conformance_models(served):
    return ConformanceModels(served, chat="smol", embedding="minilm")


class TestGpt4AllConformance(EngineConformance):
    pass
