"""The OpenAPI document: a valid OpenAPI 3.1 description that schema-driven clients can
use, and that agrees with what lllms accepts and sends."""

from __future__ import annotations

import re
import httpx
import msgspec
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from helpers.openai_schema import parse_sse
from helpers.sound import tone_wav
from lllms_core.api.openapi import openapi_document
from lllms_core.schemas import ChatCompletionRequest, EmbeddingRequest, TextCompletionRequest
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(30)

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def validator(component: str) -> Draft202012Validator:
    """A JSON Schema validator for ``#/components/schemas/<component>``, refs resolved in the document."""
    registry = Registry().with_resource("urn:lllms", Resource(openapi_document(), DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:lllms#/components/schemas/{component}"}, registry=registry)


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(document, ref: str):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_document_is_openapi_3_1_with_resolvable_refs_and_complete_operations():
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "lllms" and document["info"]["version"]
    for ref in set(refs(document)):
        resolve(document, ref)  # raises KeyError when it points nowhere
    operation_ids = []
    for path, item in document["paths"].items():
        operations = {method: op for method, op in item.items() if method in METHODS}
        assert operations, path
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            assert any(status.startswith("2") for status in operation["responses"]), (method, path)
            operation_ids.append(operation["operationId"])
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(path.replace("}", "{").split("{")[1::2]), path
    assert len(operation_ids) == len(set(operation_ids))
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)


def test_document_lists_the_routes_a_client_uses():
    paths = openapi_document()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
            "/v1/models", "/v1/models/{model}", "/", "/health", "/metrics"} <= set(paths)
    assert paths["/v1/chat/completions"]["post"]["operationId"] == "createChatCompletion"
    assert {"url": "/openai", "description": "The same routes under /openai"} in paths["/v1/models"]["servers"]
    form = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file", "model"]
    assert "audio" not in form["properties"] and "filename" not in form["properties"]
    chat = openapi_document()["components"]["schemas"]["ChatCompletionRequest"]
    assert "plugin_parameters" not in chat["properties"]  # taken from top-level body fields instead


@pytest.mark.parametrize(
    ("component", "kind", "body", "valid"),
    [
        ("ChatCompletionRequest", ChatCompletionRequest,
         {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "stream": True}, True),
        ("ChatCompletionRequest", ChatCompletionRequest,
         {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          "future_openai_field": 1}, True),
        ("ChatCompletionRequest", ChatCompletionRequest,
         {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, False),
        ("ChatCompletionRequest", ChatCompletionRequest, {"model": "m", "messages": []}, False),
        ("ChatCompletionRequest", ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, False),
        ("TextCompletionRequest", TextCompletionRequest, {"model": "m", "prompt": "Once", "max_tokens": 5}, True),
        ("TextCompletionRequest", TextCompletionRequest, {"model": "m", "prompt": "Once", "max_tokens": 0}, False),
        ("EmbeddingRequest", EmbeddingRequest, {"model": "m", "input": ["a", "b"], "dimensions": 8}, True),
        ("EmbeddingRequest", EmbeddingRequest, {"model": "m", "input": "a", "encoding_format": "hex"}, False),
    ],
)
def test_request_schemas_accept_and_refuse_what_the_api_does(component, kind, body, valid):
    assert validator(component).is_valid(body) is valid
    try:
        msgspec.json.decode(msgspec.json.encode(body), type=kind)
        decoded = True
    except msgspec.ValidationError:
        decoded = False
    assert decoded is valid


def test_response_schemas_describe_openai_shapes():
    chat = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }
    assert validator("ChatCompletion").is_valid(chat)
    assert not validator("ChatCompletion").is_valid({**chat, "object": "text_completion"})
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "He"}, "finish_reason": None}]}
    assert validator("ChatCompletionChunk").is_valid(chunk)
    error = {"error": {"message": "The model 'x' does not exist", "type": "invalid_request_error",
                       "param": "model", "code": "model_not_found"}}
    assert validator("Error").is_valid(error)
    assert validator("ModelList").is_valid(
        {"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "lllms"}]}
    )


async def test_status_schema_matches_a_running_servers_status(tmp_path):
    config = {
        "server": {"cache_dir": str(tmp_path)},
        "models": {"m1": {"engine": "fake", "min_instances": 1, "slots": 2}, "m2": {"engine": "fake"}},
    }
    async with ModelServer(config) as server:
        await server.chat_completion({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
        status = msgspec.json.decode(msgspec.json.encode(server.status()))
    errors = [error.message for error in validator("ServerStatus").iter_errors(status)]
    assert errors == []
    assert status["instances"][0]["slots"][0]["context_depth"] > 0


@pytest.fixture(scope="module")
def http(server_factory):
    server = server_factory(
        {
            "models": {
                "chat": {"engine": "fake", "slots": 2},
                "story": {"engine": "fake", "task": "text-completion"},
                "embed": {"engine": "fake", "task": "embedding"},
                "whisper": {"engine": "fake", "task": "speech-to-text"},
            },
        }
    )
    with httpx.Client(base_url=server.base_url, timeout=20) as client:
        yield client


def documented(response: httpx.Response, template: str | None = None) -> list:
    """Check ``response`` against the operation the document describes for its request;
    return the JSON bodies it carried (one per event for a stream)."""
    document = openapi_document()
    request = response.request
    path = template or request.url.path.removeprefix("/openai")
    operation = document["paths"][path][request.method.lower()]
    described = operation["responses"].get(str(response.status_code))
    assert described is not None, f"{request.method} {path} answered an undocumented {response.status_code}"
    if "$ref" in described:
        described = resolve(document, described["$ref"])
    media_type = response.headers["content-type"].split(";")[0]
    content = described.get("content", {})
    assert media_type in content, f"{request.method} {path} {response.status_code}: undocumented {media_type}"
    if media_type == "text/event-stream":
        bodies, _ = parse_sse(response.text.splitlines(), require_done=not path.startswith("/v1/audio/"))
        component = content[media_type]["x-event-schema"]["$ref"].rsplit("/", 1)[1]
    elif media_type == "application/json":
        bodies = [response.json()]
        schema = content[media_type]["schema"]
        component = schema["$ref"].rsplit("/", 1)[1] if "$ref" in schema else None
    else:
        return []
    for body in bodies:
        if component is not None:
            errors = [f"{list(error.absolute_path)}: {error.message}" for error in validator(component).iter_errors(body)]
            assert errors == [], f"{request.method} {path}: {errors}"
    return bodies


def test_responses_of_a_running_server_match_the_document(http):
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    [body] = documented(http.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 1}))
    assert body["choices"][0]["message"]["content"] == "You said: hi"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    [body] = documented(http.post("/openai/v1/chat/completions", json={**chat, "tools": tools}))
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    events = documented(http.post("/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1]["usage"]["completion_tokens"] == 3
    events = documented(http.post("/v1/chat/completions", json={**chat, "stream": True, "tools": tools}))
    assert any(choice["delta"].get("tool_calls") for event in events for choice in event["choices"])

    text = {"model": "story", "prompt": "Once upon a time", "max_tokens": 3}
    [body] = documented(http.post("/v1/completions", json={**text, "logprobs": 1, "echo": True}))
    assert body["choices"][0]["text"].endswith("and then the")
    events = documented(http.post("/v1/completions", json={**text, "stream": True}))
    assert "".join(event["choices"][0]["text"] for event in events if event["choices"]) == "and then the"

    for encoding_format in ("float", "base64"):
        [body] = documented(http.post("/v1/embeddings", json={"model": "embed", "input": ["a", "b"], "encoding_format": encoding_format}))
        assert len(body["data"]) == 2

    for response_format in ("json", "verbose_json", "text", "srt", "vtt"):
        response = http.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", tone_wav(0.2), "audio/wav")},
            data={"model": "whisper", "response_format": response_format},
        )
        documented(response)
        assert response.status_code == 200

    [body] = documented(http.get("/v1/models"))
    assert {model["id"] for model in body["data"]} == {"chat", "story", "embed", "whisper"}
    documented(http.get("/v1/models/chat"), "/v1/models/{model}")
    [error] = documented(http.get("/v1/models/nope"), "/v1/models/{model}")
    assert error["error"]["code"] == "model_not_found"
    [error] = documented(http.post("/v1/chat/completions", json={**chat, "temperature": 5}))
    assert error["error"]["param"] == "temperature"
    documented(http.post("/v1/chat/completions", json={**chat, "model": "nope"}))

    documented(http.get("/"))
    [health] = documented(http.get("/health"))
    assert health == {"status": "ok"}
    documented(http.get("/metrics"))
    [served] = documented(http.get("/openapi.json"))
    assert served == msgspec.json.decode(msgspec.json.encode(openapi_document()))


def test_every_route_of_the_app_is_in_the_document():
    from lllms_core.app import create_app

    app = create_app({"models": {}})
    paths = openapi_document()["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule).replace("{model_id}", "{model}")
        path = path.removeprefix("/openai")
        assert path in paths, f"{rule.rule} is not in /openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], f"{method} {rule.rule} is not in /openapi.json"


def test_audio_responses_of_a_running_server_match_the_document(server_factory):
    server = server_factory(
        {
            "models": {
                "ears": {"engine": "fake", "task": "speech-to-text"},
                "voice": {"engine": "fake", "task": "text-to-speech"},
            }
        }
    )
    with httpx.Client(base_url=server.base_url, timeout=20) as http:
        audio = {"file": ("a.wav", tone_wav(0.2), "audio/wav")}
        for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            [body] = documented(http.post(path, files=audio, data={"model": "ears", "response_format": "verbose_json"}))
            assert body["task"] == ("translate" if path.endswith("translations") else "transcribe")
        events = documented(http.post("/v1/audio/transcriptions", files=audio, data={"model": "ears", "stream": "true"}))
        assert [event["type"] for event in events] == ["transcript.text.delta", "transcript.text.done"]
        speech = {"model": "voice", "input": "one two", "voice": "low"}
        for response_format in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
            response = http.post("/v1/audio/speech", json={**speech, "response_format": response_format})
            documented(response)
            assert response.status_code == 200 and response.content
        events = documented(http.post("/v1/audio/speech", json={**speech, "stream_format": "sse"}))
        assert events[-1]["type"] == "speech.audio.done"
        [error] = documented(http.post("/v1/audio/speech", json={**speech, "voice": "alto"}))
        assert error["error"]["param"] == "voice"
