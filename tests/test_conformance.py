"""The engine conformance suite, run against the fake engine (registered for this session
only, without its entry point)."""

from __future__ import annotations

import pytest

from lllms_core.testing import fake, plugin_manager
from lllms_core.testing.conformance import ConformanceModels, EngineConformance

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def conformance_models():
    config = {"models": {"chat": {"engine": "fake", "slots": 2}, "embed": {"engine": "fake", "task": "embedding"}}}
    with ConformanceModels.serve(config, plugins=plugin_manager(fake), chat="chat", embedding="embed") as models:
        yield models


class TestFakeEngineConformance(EngineConformance):
    pass
