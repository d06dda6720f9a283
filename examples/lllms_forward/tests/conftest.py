"""A real lllms server serving lllms' fake engine (registered for these tests only): the
other server the forward engine forwards to."""

from __future__ import annotations

import pytest

from lllms_core import ModelServer
from lllms_core.testing import BackgroundServer, fake, plugin_manager


@pytest.fixture(scope="session")
def upstream():
    config = {"models": {"chat": {"engine": "fake", "slots": 4}, "embed": {"engine": "fake", "task": "embedding"}}}
    with BackgroundServer(ModelServer(config, plugins=plugin_manager(fake))) as server:
        yield server
