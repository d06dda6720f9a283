"""The core's Anthropic Messages API tests, unchanged, through the cluster's ingress (all
but the one that configures its own server with an API key in the test's environment)."""

import pytest
from test_api_anthropic import *  # noqa: F401,F403

del test_the_api_key_may_come_as_x_api_key  # noqa: F821
pytestmark = pytest.mark.timeout(180)  # the first test waits for the application to deploy
