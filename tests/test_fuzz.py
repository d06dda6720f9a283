"""A bounded schema fuzz of the HTTP API: schemathesis generates requests from lllms' own
OpenAPI description (valid ones, and ones the description forbids) and sends them to a real
server with fake models. Any 5xx fails, and so does a response whose status, content type or
body the description does not give for that operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from lllms_core.api.openapi import openapi_document

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 30
"""Requests per operation and mode: about a minute for the whole API on a quiet machine."""
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(openapi_document()).get_all_operations()]
RUNS = [(operation, GenerationMode.POSITIVE) for operation in OPERATIONS] + [
    (operation, GenerationMode.NEGATIVE) for operation in OPERATIONS if operation.method.upper() == "POST"
]
"""Every operation with valid input; those that take a body with invalid input too (the GET
routes take nothing that could be invalid)."""


@pytest.fixture(scope="module")
def fuzzed_server(server_factory):
    return server_factory(
        {
            "models": {
                "chat": {"engine": "fake", "slots": 4},
                "embed": {"engine": "fake", "task": "embedding"},
                "whisper": {"engine": "fake", "task": "speech-to-text"},
            }
        }
    )


@pytest.mark.parametrize(("operation", "mode"), RUNS, ids=[f"{mode.value} {operation.label}" for operation, mode in RUNS])
def test_the_api_answers_as_its_description_says(fuzzed_server, operation, mode):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def send(case):
        case.call_and_validate(base_url=fuzzed_server.base_url, timeout=30, checks=CHECKS)

    send()
