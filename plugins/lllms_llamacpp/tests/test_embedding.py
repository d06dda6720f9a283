"""Embeddings: pooled, normalised, batched, closer for paraphrases."""

from __future__ import annotations

import math

import pytest

from lllms_core.errors import ContextLengthExceededError
from lllms_core.schemas import EmbeddingRequest


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


async def embed(embedder, **fields):
    return await embedder.engine.embedding(embedder.context(), EmbeddingRequest(model="smollm2", **fields))


async def test_a_paraphrase_is_closer_than_an_unrelated_sentence(embedder):
    result = await embed(
        embedder,
        input=[
            "The cat is sleeping on the sofa.",
            "A cat naps on the couch.",
            "Interest rates rose sharply at the central bank meeting.",
        ],
    )
    sentence, paraphrase, unrelated = result.embeddings
    assert cosine(sentence, paraphrase) > cosine(sentence, unrelated)
    assert all(abs(math.sqrt(cosine(v, v)) - 1) < 1e-6 for v in result.embeddings)
    assert len(sentence) == embedder.instance.model.n_embd


async def test_batched_inputs_match_single_ones(embedder):
    texts = ["first sentence here", "a second, longer sentence about something else", "third"]
    together = await embed(embedder, input=texts)
    alone = [(await embed(embedder, input=text)).embeddings[0] for text in texts]
    for batched, single in zip(together.embeddings, alone):
        assert cosine(batched, single) > 0.9999


async def test_token_input_dimensions_pooling_and_usage(embedder):
    tokens = embedder.instance.model.tokenize("hello world", add_special=True, parse_special=False)
    by_tokens = await embed(embedder, input=tokens)
    by_text = await embed(embedder, input="hello world")
    assert cosine(by_tokens.embeddings[0], by_text.embeddings[0]) > 0.9999
    assert by_text.prompt_tokens == len(tokens)
    short = await embed(embedder, input="hello world", dimensions=64)
    assert len(short.embeddings[0]) == 64
    last = await embed(embedder, input="hello world", pooling="last")
    assert cosine(last.embeddings[0], by_text.embeddings[0]) < 0.9999


async def test_an_input_longer_than_the_context_is_refused(embedder):
    with pytest.raises(ContextLengthExceededError):
        await embed(embedder, input="word " * 2000)
