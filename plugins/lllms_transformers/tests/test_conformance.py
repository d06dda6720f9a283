"""lllms' engine conformance suite against the transformers engine: SmolLM2-135M-Instruct
(converted from its GGUF) for chat and text, all-MiniLM-L6-v2 for embeddings, on the
session's server."""

from __future__ import annotations

import pytest

from lllms_core.testing.conformance import ConformanceModels, EngineConformance

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def conformance_models(server):
    return ConformanceModels(server, chat="smol", embedding="minilm")


class TestTransformersConformance(EngineConformance):
    pass
