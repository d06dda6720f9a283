"""Rerank and tokenize routes over real HTTP, on fake models (the routes' own logic)."""

from __future__ import annotations

import httpx
import pytest
from helpers.openai_schema import validate

pytestmark = pytest.mark.timeout(30)

DOCS = ["the cat sat", {"text": "a dog ran far"}, "cats and dogs ran"]


@pytest.fixture(scope="module")
def http(apis_server):
    with httpx.Client(base_url=apis_server.base_url, timeout=20) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_orders_by_relevance(http, path):
    body = http.post(path, json={"model": "ranker", "query": "dog ran", "documents": DOCS}).json()
    assert [result["index"] for result in body["results"]] == [1, 2, 0]
    assert body["results"][0] == {"index": 1, "relevance_score": 1.0, "document": {"text": "a dog ran far"}}
    assert body["usage"]["prompt_tokens"] == 13 and body["model"] == "ranker"


def test_top_n_and_return_documents(http):
    body = http.post("/v1/rerank", json={"model": "ranker", "query": "dog ran", "documents": DOCS, "top_n": 1, "return_documents": False}).json()
    assert body["results"] == [{"index": 1, "relevance_score": 1.0}]


def test_an_embedding_model_reranks_by_cosine(http):
    body = http.post("/v1/rerank", json={"model": "embed", "query": "The Cat Sat", "documents": DOCS}).json()
    # the fake embeds case-insensitively: the same words give the same vector, cosine 1
    assert body["results"][0]["index"] == 0 and body["results"][0]["relevance_score"] == pytest.approx(1.0)


def test_tokenize_and_detokenize(http):
    tokens = http.post("/tokenize", json={"model": "chat", "content": "one two one", "with_pieces": True}).json()
    assert [token["piece"] for token in tokens["tokens"]] == ["one", "two", "one"]
    assert tokens["tokens"][0]["id"] == tokens["tokens"][2]["id"] and tokens["count"] == 3
    ids = [token["id"] for token in tokens["tokens"]]
    assert http.post("/detokenize", json={"model": "chat", "tokens": ids}).json()["content"] == "one two one"
    chat = http.post("/tokenize", json={"model": "chat", "messages": [{"role": "user", "content": "one two"}]}).json()
    assert chat["count"] == 2 and isinstance(chat["tokens"][0], int)


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/rerank", {"model": "ranker", "query": "x", "documents": []}, 400, "documents"),
        ("/v1/rerank", {"model": "ranker", "documents": ["a"]}, 400, "query"),
        ("/v1/rerank", {"model": "chat", "query": "x", "documents": ["a"]}, 400, "model"),
        ("/v1/rerank", {"model": "nope", "query": "x", "documents": ["a"]}, 404, "model"),
        ("/v1/rerank", {"model": "ranker", "query": "x", "documents": ["a"], "top_n": 0}, 400, "top_n"),
        ("/tokenize", {"model": "chat"}, 400, "content"),
        ("/tokenize", {"model": "chat", "content": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "content"),
        ("/detokenize", {"model": "chat", "tokens": [-1]}, 400, "tokens[0]"),
        ("/detokenize", {"model": "chat", "tokens": [987654]}, 400, "tokens"),
    ],
    ids=["no-documents", "no-query", "chat-model", "unknown-model", "top-n", "nothing", "both", "negative", "unknown-token"],
)
def test_bad_input_gets_openais_error_shape(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status
    assert validate("ErrorResponse", response.json())["error"]["param"] == param
