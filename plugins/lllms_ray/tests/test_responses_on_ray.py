"""The core's Responses API tests, unchanged, through the cluster's ingress (all but the one
that starts its own server in the test's process)."""

import pytest
from test_api_responses import *  # noqa: F401,F403

del test_an_error_during_the_stream_ends_it_with_response_failed  # noqa: F821
pytestmark = pytest.mark.timeout(180)
