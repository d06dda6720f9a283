"""Validate bodies against OpenAI's own API description (/work/shared/openai/openapi.json).

The document is loaded once. Its OpenAPI 3.0 leftovers (``nullable: true``) become
``anyOf: [schema, {"type": "null"}]``, which a JSON Schema validator understands.
"""

from __future__ import annotations

import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI = Path(os.environ.get("OPENAI_OPENAPI", "/work/shared/openai/openapi.json"))
URI = "urn:openai"


def without_nullable(node: Any) -> Any:
    """The schema tree with every ``nullable: true`` schema turned into an anyOf with null."""
    if isinstance(node, list):
        return [without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: without_nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def document() -> dict[str, Any]:
    return without_nullable(json.loads(OPENAPI.read_text()))


@cache
def registry() -> Registry:
    return Registry().with_resource(URI, Resource(document(), DRAFT202012))


@cache
def validator(component: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{component}"}, registry=registry())


@cache
def legacy_completion_chunk_validator() -> Draft202012Validator:
    """``CreateCompletionResponse`` with ``finish_reason: null`` allowed, as OpenAI's own
    server sends it in every chunk of a /v1/completions stream but the last."""
    relaxed = copy.deepcopy(document())
    choice = relaxed["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    uri = "urn:openai-completion-stream"
    relaxed_registry = Registry().with_resource(uri, Resource(relaxed, DRAFT202012))
    return Draft202012Validator({"$ref": f"{uri}#/components/schemas/CreateCompletionResponse"}, registry=relaxed_registry)


def validate(component: str, body: Any) -> Any:
    """Raise ``jsonschema.ValidationError`` unless ``body`` is a valid ``component``; return it."""
    validator(component).validate(body)
    return body


def validate_completion_chunk(body: Any) -> Any:
    legacy_completion_chunk_validator().validate(body)
    return body


def parse_sse(lines: list[str]) -> tuple[list[Any], list[str]]:
    """The JSON bodies of a server-sent event stream's ``data:`` events, and its comment
    lines. Raise unless the stream ends with ``data: [DONE]`` and nothing after it."""
    bodies: list[Any] = []
    comments: list[str] = []
    done = False
    for line in lines:
        if not line:
            continue
        assert not done, f"event after [DONE]: {line!r}"
        if line.startswith(":"):
            comments.append(line)
        elif line == "data: [DONE]":
            done = True
        else:
            assert line.startswith("data: "), line
            bodies.append(json.loads(line[len("data: "):]))
    assert done, "the stream did not end with data: [DONE]"
    return bodies, comments


def validate_chat_stream(lines: list[str]) -> list[Any]:
    """Parse a chat completion stream and validate each chunk; return the chunks."""
    chunks, _ = parse_sse(lines)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    return chunks


def validate_completion_stream(lines: list[str]) -> list[Any]:
    chunks, _ = parse_sse(lines)
    for chunk in chunks:
        validate_completion_chunk(chunk)
    return chunks
