"""The OpenAI-compatible API over real HTTP, with the official ``openai`` client and raw
httpx; every body and streamed chunk is validated against OpenAI's API description."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest
from helpers.sound import tone_wav
from helpers.openai_schema import (
    async_openai_client,
    openai_client,
    parse_sse,
    validate,
    validate_chat_stream,
    validate_completion_stream,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai_client(api_server.url("/v1"), "unused")


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=20) as http_client:
        yield http_client


def user(text: str, **params) -> dict:
    return {"messages": [{"role": "user", "content": text}], **params}


def stream_lines(http, path: str, body: dict) -> list[str]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(response.iter_lines())


# --- chat -------------------------------------------------------------------------


def test_chat_completion_with_the_openai_client(client):
    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there"}], temperature=0, seed=0, user="tester"
    )
    assert completion.object == "chat.completion"
    assert completion.model == "chat"
    assert completion.system_fingerprint
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "You said: hello there"
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_chat_completion_body_matches_openai_schema(http):
    response = http.post("/v1/chat/completions", json={"model": "chat", **user("hi"), "n": 2, "logprobs": True, "top_logprobs": 1})
    assert response.status_code == 200
    body = validate("CreateChatCompletionResponse", response.json())
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    logprobs = body["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in logprobs) == "You said: hi"
    assert len(logprobs[0]["top_logprobs"]) == 1


def test_both_base_paths_serve_the_api(http):
    for prefix in ("/v1", "/openai/v1"):
        response = http.post(f"{prefix}/chat/completions", json={"model": "chat", **user("hi")})
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "You said: hi"


def test_chat_accepts_content_parts_and_a_tool_round_trip(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    first = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": [{"type": "text", "text": "find it"}]}], tools=tools
    )
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"echo": "find it"}
    # an SDK echoes the assistant's tool-call message with content null, then the tool's answer
    second = client.chat.completions.create(
        model="chat",
        messages=[
            {"role": "user", "content": "find it"},
            choice.message.model_dump(exclude_none=False),
            {"role": "tool", "tool_call_id": call.id, "content": "found"},
        ],
    )
    assert second.choices[0].message.content == "You said: found"


def test_chat_stream_is_openai_sequence(http):
    lines = stream_lines(http, "/v1/chat/completions", {"model": "chat", **user("one two"), "stream": True})
    chunks = validate_chat_stream(lines)
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "You said: one two"
    # the finish reason comes even though usage was not asked for; no usage anywhere
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_chat_stream_with_usage_ends_with_a_usage_chunk(http):
    body = {"model": "chat", **user("count"), "stream": True, "stream_options": {"include_usage": True}}
    chunks = validate_chat_stream(stream_lines(http, "/v1/chat/completions", body))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_stream_with_logprobs_and_n(http):
    body = {"model": "chat", **user("hi"), "stream": True, "n": 2, "logprobs": True, "top_logprobs": 1}
    chunks = validate_chat_stream(stream_lines(http, "/v1/chat/completions", body))
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content") or "" for c in mine) == "You said: hi"
        tokens = [t["token"] for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert "".join(tokens) == "You said: hi"
        assert mine[-1]["finish_reason"] == "stop"


def test_tool_call_stream_deltas(http):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body = {"model": "chat", **user("find"), "stream": True, "tools": tools}
    chunks = validate_chat_stream(stream_lines(http, "/v1/chat/completions", body))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "call_fake0", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    assert all(set(call) == {"index", "function"} and call["index"] == 0 for call in calls[1:])
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"echo": "find"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streaming_with_the_openai_client(client):
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == "You said: stream me"
    assert usage.completion_tokens == 4


def test_stream_helper_of_the_openai_client_with_tools(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with client.chat.completions.stream(
        model="chat", messages=[{"role": "user", "content": "look"}], tools=tools
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"echo": "look"}


async def test_async_openai_client_streams(api_server):
    client = async_openai_client(api_server.url("/v1"), "unused")
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "async"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == "You said: async"
    completion = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "again"}])
    assert completion.choices[0].message.content == "You said: again"
    await client.close()


def test_keepalive_comments_while_waiting_for_an_instance(http, client):
    # "lazy" takes 0.5 s to load and keep-alives go out every 0.1 s until the first chunk
    lines = stream_lines(http, "/v1/chat/completions", {"model": "lazy", **user("wake up"), "stream": True})
    chunks, comments = parse_sse(lines)
    assert comments and set(comments) == {": keep-alive"}
    assert lines.index(comments[0]) < lines.index(next(line for line in lines if line.startswith("data:")))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    # SSE clients skip comments
    stream = client.chat.completions.create(model="lazy", messages=[{"role": "user", "content": "again"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "You said: again"


# --- completions --------------------------------------------------------------------


def test_text_completion(client, http):
    completion = client.completions.create(model="chat", prompt="once upon", max_tokens=3)
    assert completion.choices[0].text == "and then the"
    assert completion.choices[0].finish_reason == "length"
    body = validate("CreateCompletionResponse", http.post("/v1/completions", json={"model": "chat", "prompt": "x"}).json())
    assert body["object"] == "text_completion"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_a_list_of_prompts_times_n_gives_consecutive_choices(http):
    response = http.post("/v1/completions", json={"model": "chat", "prompt": ["a", "b c"], "n": 2, "max_tokens": 2})
    body = validate("CreateCompletionResponse", response.json())
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 1 + 2
    assert body["usage"]["completion_tokens"] == 2 * 2 * 2


def test_completion_echo_and_legacy_logprobs(http):
    body = {"model": "chat", "prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 2}
    response = http.post("/v1/completions", json=body)
    [choice] = validate("CreateCompletionResponse", response.json())["choices"]
    assert choice["text"] == "hiand then"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["and", " then"]
    assert logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["top_logprobs"] == [{"and": -0.5}, {" then": -0.5}]
    assert logprobs["text_offset"] == [2, 5], "offsets in the text, echoed prompt included"
    chunks = validate_completion_stream(stream_lines(http, "/v1/completions", {**body, "stream": True}))
    assert [offset for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
            for offset in c["choices"][0]["logprobs"]["text_offset"]] == [2, 5]  # fmt: skip


def test_completion_stream(http):
    body = {"model": "chat", "prompt": ["a", "b"], "stream": True, "max_tokens": 2, "logprobs": 1,
            "stream_options": {"include_usage": True}}
    chunks = validate_completion_stream(stream_lines(http, "/v1/completions", body))
    assert all(c["object"] == "text_completion" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "and then"
        assert [c["finish_reason"] for c in mine] == [None, None, "length"]
        assert [offset for c in mine if c["logprobs"] for offset in c["logprobs"]["text_offset"]] == [0, 3]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completion_stream_with_the_openai_client(client):
    stream = client.completions.create(model="chat", prompt="go", stream=True, max_tokens=4)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == "and then the story"


# --- embeddings --------------------------------------------------------------------


def test_embeddings_float_and_base64(client, http):
    as_floats = validate(
        "CreateEmbeddingResponse", http.post("/v1/embeddings", json={"model": "embed", "input": ["a b", "c"]}).json()
    )
    as_base64 = http.post("/v1/embeddings", json={"model": "embed", "input": ["a b", "c"], "encoding_format": "base64"}).json()
    assert as_floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    for floats, encoded in zip(as_floats["data"], as_base64["data"]):
        # little-endian float32s, base64-encoded (the schema only knows the float form)
        raw = base64.b64decode(encoded["embedding"])
        encoded["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert encoded["embedding"] == pytest.approx(floats["embedding"], abs=1e-6)
    validate("CreateEmbeddingResponse", as_base64)
    # the openai client asks for base64 by default and decodes it
    result = client.embeddings.create(model="embed", input=["a b", "c"])
    assert [item.index for item in result.data] == [0, 1]
    assert result.data[0].embedding == pytest.approx(as_floats["data"][0]["embedding"], abs=1e-6)


def test_embedding_dimensions(client):
    result = client.embeddings.create(model="embed", input="one", dimensions=4, encoding_format="float")
    assert len(result.data[0].embedding) == 4


# --- transcriptions ------------------------------------------------------------------

AUDIO = ("clip.wav", tone_wav(0.5), "audio/wav")


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "verbose_json", "vtt"])
def test_transcription_formats(client, http, response_format):
    result = client.audio.transcriptions.create(model="whisper", file=AUDIO, response_format=response_format, temperature=0)
    text = f"fake transcription of {len(AUDIO[1])} bytes"
    response = http.post(
        "/v1/audio/transcriptions", files={"file": AUDIO}, data={"model": "whisper", "response_format": response_format}
    )
    assert response.status_code == 200
    if response_format == "json":
        assert result.text == text
        validate("CreateTranscriptionResponseJson", response.json())
    elif response_format == "verbose_json":
        assert result.text == text and result.language == "en" and result.duration == 1.5
        body = validate("CreateTranscriptionResponseVerboseJson", response.json())
        assert body["segments"][0]["end"] == 1.5
    elif response_format == "text":
        assert result.strip() == text
    elif response_format == "srt":
        assert result.strip() == f"1\n00:00:00,000 --> 00:00:01,500\n{text}"
    else:
        assert result.strip() == f"WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n{text}"


def test_transcription_needs_a_speech_model_and_a_file(http):
    response = http.post("/v1/audio/transcriptions", files={"file": AUDIO}, data={"model": "chat"})
    assert response.status_code == 400
    error = validate("ErrorResponse", response.json())["error"]
    assert error["param"] == "model" and "speech-to-text" in error["message"]
    response = http.post("/v1/audio/transcriptions", data={"model": "whisper"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


# --- models, status, health, metrics ---------------------------------------------------


def test_models(client, http):
    ids = {model.id: model.owned_by for model in client.models.list()}
    assert ids == {"chat": "fake", "slow": "fake", "lazy": "fake", "embed": "fake", "whisper": "fake"}
    validate("ListModelsResponse", http.get("/openai/v1/models").json())
    model = client.models.retrieve("embed")
    assert (model.id, model.object, model.owned_by) == ("embed", "model", "fake")
    validate("Model", http.get("/v1/models/embed").json())
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("nope")
    assert raised.value.code == "model_not_found"


def test_status_health_metrics_and_openapi(http):
    status = http.get("/").json()
    assert set(status["models"]) >= {"chat", "embed"} and "instances" in status
    health = http.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and "lllms_requests_total" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert http.get("/openapi.json").json()["openapi"].startswith("3.")


def test_request_ids(http):
    generated = http.get("/health").headers["x-request-id"]
    assert generated and generated != http.get("/health").headers["x-request-id"]
    assert http.get("/health", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    assert http.get("/health", headers={"x-request-id": "no spaces allowed"}).headers["x-request-id"] != "no spaces allowed"
    assert http.get("/nowhere").headers["x-request-id"]
    with http.stream("POST", "/v1/chat/completions", json={"model": "chat", **user("x"), "stream": True}) as response:
        assert response.headers["x-request-id"]
