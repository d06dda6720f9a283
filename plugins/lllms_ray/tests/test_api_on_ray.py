"""The core's own API tests, unchanged, against the same configuration served by a Ray
cluster: every route, exact SSE, errors, limits, keys, CORS and client disconnects go
through the ingress to the models' replicas (fake engine, see tests/conftest.py here).

Left out are the core tests that need the server in the test's own process (a plugin
registered in the test, a monkeypatched fault, an environment variable, a signal sent to
it) or that watch a single process start (``/health`` before the models load).
"""

from __future__ import annotations

import pytest
from test_api import *  # noqa: F401,F403 (every test of the module)
from test_api_errors import (  # noqa: F401
    chat,
    error_of,
    guarded,
    guarded_http,
    test_a_missing_field_is_named,
    test_a_model_of_another_task_is_refused,
    test_an_error_after_the_stream_started_is_an_error_event,
    test_api_keys,
    test_completion_features_the_engine_cannot_do_are_refused,
    test_cors,
    test_invalid_values_name_the_field,
    test_malformed_json,
    test_oversize_body,
    test_parameters_the_engine_cannot_do_are_refused,
    test_queue_full_is_429_with_retry_after,
    test_the_openai_client_sees_the_param,
    test_unknown_model,
    test_unknown_routes_and_methods,
    test_zero_is_a_value_and_unknown_fields_are_accepted,
)
from test_api_lifecycle import (  # noqa: F401
    slot_busy,
    test_an_abandoned_request_frees_the_instance_at_once,
    test_an_abandoned_stream_frees_the_instance_at_once,
    wait_until,
)

# the first test of the module waits for its application to be deployed
pytestmark = pytest.mark.timeout(180)
