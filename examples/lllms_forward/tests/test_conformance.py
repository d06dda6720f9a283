"""lllms' engine conformance suite against the forward engine, in front of a real lllms
server that serves lllms' fake engine."""

from __future__ import annotations

import pytest

from lllms_core.testing.conformance import ConformanceModels, EngineConformance

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def conformance_models(upstream):
    base_url = upstream.url("/v1")
    config = {
        "models": {
            "chat": {"engine": "forward", "base_url": base_url},
            "embed": {"engine": "forward", "task": "embedding", "base_url": base_url},
        }
    }
    with ConformanceModels.serve(config, chat="chat", embedding="embed") as models:
        yield models


class TestForwardConformance(EngineConformance):
    pass
