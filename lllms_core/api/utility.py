"""Rerank and tokenize routes: ``POST /v1/rerank`` (and ``/rerank``), ``POST /tokenize``,
``POST /detokenize``, in the shapes of Jina's and Cohere's rerank APIs and llama-server's
tokenizer routes. Errors have OpenAI's shape."""

from __future__ import annotations

import secrets

from quart import Blueprint, Response

from lllms_core.api.common import json_response, read_request, state
from lllms_core.schemas import DetokenizeRequest, RerankRequest, TokenizeRequest

api = Blueprint("utility", __name__)


@api.post("/v1/rerank")
@api.post("/rerank")
async def rerank() -> Response:
    body = await read_request(RerankRequest)
    result = await state().server.rerank(body)
    ranked = sorted(range(len(result.scores)), key=lambda index: result.scores[index], reverse=True)
    texts = body.texts
    results = []
    for index in ranked[: body.top_n]:
        entry = {"index": index, "relevance_score": result.scores[index]}
        if body.return_documents:
            entry["document"] = {"text": texts[index]}
        results.append(entry)
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return json_response({"id": "rerank-" + secrets.token_hex(12), "model": body.model, "results": results, "usage": usage})


@api.post("/tokenize")
async def tokenize() -> Response:
    body = await read_request(TokenizeRequest)
    result = await state().server.tokenize(body)
    tokens = result.tokens
    if body.with_pieces:
        tokens = [{"id": token, "piece": piece} for token, piece in zip(result.tokens, result.pieces or ())]
    return json_response({"model": body.model, "tokens": tokens, "count": len(result.tokens)})


@api.post("/detokenize")
async def detokenize() -> Response:
    body = await read_request(DetokenizeRequest)
    result = await state().server.detokenize(body)
    return json_response({"model": body.model, "content": result.content})
