"""Validate bodies against OpenAI's own API description (tests/openai_openapi/openapi.json,
the schemas the tests use, from openai/openai-openapi; see the README there).

The document is loaded once. Its OpenAPI 3.0 leftovers (``nullable: true``) become
``anyOf: [schema, {"type": "null"}]``, which a JSON Schema validator understands.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any

import httpx2
import openai
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI = Path(__file__).resolve().parents[1] / "openai_openapi" / "openapi.json"
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


def parse_sse(lines: list[str], require_done: bool = True) -> tuple[list[Any], list[str]]:
    """The JSON bodies of a server-sent event stream's ``data:`` events, and its comment
    lines. Raise unless the stream ends with ``data: [DONE]`` and nothing after it
    (``require_done``: audio streams end with their own ``*.done`` event instead)."""
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
    assert done or not require_done, "the stream did not end with data: [DONE]"
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


def component_for(path: str, body: Any) -> str | None:
    """The schema of a successful non-streamed response of an OpenAI route."""
    if path.endswith("/input_items"):
        return "ResponseItemList"
    if "/responses" in path:
        return "Response" if body.get("object") == "response" else None
    if path.endswith("/chat/completions"):
        return "CreateChatCompletionResponse"
    if path.endswith("/completions"):
        return "CreateCompletionResponse"
    if path.endswith("/embeddings"):
        return "CreateEmbeddingResponse"
    if path.endswith("/models"):
        return "ListModelsResponse"
    if "/models/" in path:
        return "Model"
    if path.endswith("/audio/transcriptions"):
        return "CreateTranscriptionResponseVerboseJson" if "segments" in body else "CreateTranscriptionResponseJson"
    if path.endswith("/audio/translations"):
        return "CreateTranslationResponseVerboseJson" if "segments" in body else "CreateTranslationResponseJson"
    return None


def decode_base64_embeddings(body: Any) -> Any:
    """The body with base64 embeddings decoded (OpenAI's schema only knows the float form)."""
    body = copy.deepcopy(body)
    for item in body.get("data", []):
        if isinstance(item.get("embedding"), str):
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return body


def check_response_body(response: httpx2.Response) -> None:
    if response.status_code >= 400:
        validate("ErrorResponse", response.json())
        return
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    body = response.json()
    component = component_for(response.request.url.path, body)
    if component is not None:
        validate(component, decode_base64_embeddings(body))


def check_event(path: str, data: bytes) -> None:
    """Validate one ``data:`` event of a stream from ``path``."""
    if data == b"[DONE]":
        return
    body = json.loads(data)
    if path.endswith("/responses"):
        validate("ResponseStreamEvent", body)
    elif "error" in body:
        validate("ErrorResponse", body)
    elif path.endswith("/chat/completions"):
        validate("CreateChatCompletionStreamResponse", body)
    elif path.endswith("/audio/transcriptions"):
        validate("CreateTranscriptionResponseStreamEvent", body)
    elif path.endswith("/audio/speech"):
        validate("CreateSpeechResponseStreamEvent", body)
    else:
        validate_completion_chunk(body)


class EventChecker:
    """Splits a stream's bytes into events as they pass and validates each."""

    def __init__(self, path: str):
        self.path = path
        self.pending = b""

    def feed(self, data: bytes) -> None:
        self.pending += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self.pending:
            event, self.pending = self.pending.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    check_event(self.path, line[len(b"data: "):])


class CheckedStream(httpx2.SyncByteStream):
    def __init__(self, stream: httpx2.SyncByteStream, path: str):
        self.stream = stream
        self.checker = EventChecker(path)

    def __iter__(self):
        for data in self.stream:
            self.checker.feed(data)
            yield data

    def close(self) -> None:
        self.stream.close()


class AsyncCheckedStream(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, path: str):
        self.stream = stream
        self.checker = EventChecker(path)

    async def __aiter__(self):
        async for data in self.stream:
            self.checker.feed(data)
            yield data

    async def aclose(self) -> None:
        await self.stream.aclose()


def is_stream(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def check_response(response: httpx2.Response) -> None:
    if is_stream(response):
        response.stream = CheckedStream(response.stream, response.request.url.path)
        return
    response.read()
    check_response_body(response)


async def check_async_response(response: httpx2.Response) -> None:
    if is_stream(response):
        response.stream = AsyncCheckedStream(response.stream, response.request.url.path)
        return
    await response.aread()
    check_response_body(response)


def openai_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    """An ``openai`` client whose every response body and streamed event is validated
    against OpenAI's schema (a failure raises from the client call)."""
    http_client = httpx2.Client(event_hooks={"response": [check_response]})
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http_client)


def async_openai_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    http_client = httpx2.AsyncClient(event_hooks={"response": [check_async_response]})
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http_client)
