"""Embeddings with all-MiniLM-L6-v2 through the HTTP API with the openai client (which asks
for base64 unless told otherwise)."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.timeout(120)

TEXTS = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_a_paraphrase_is_closer_than_an_unrelated_text(client):
    response = client.embeddings.create(model="minilm", input=TEXTS)
    cat, kitten, stocks = (item.embedding for item in response.data)
    assert len(cat) == 384
    assert math.isclose(math.sqrt(sum(x * x for x in cat)), 1.0, rel_tol=1e-3)  # the model's Normalize module
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3
    assert response.usage.prompt_tokens >= 3 * 6


def test_float_encoding_and_base64_agree(client):
    as_base64 = client.embeddings.create(model="minilm", input=TEXTS[0]).data[0].embedding
    as_floats = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(as_base64, as_floats)) < 1e-5


def test_dimensions_cut_and_renormalise(client):
    [item] = client.embeddings.create(model="minilm", input=TEXTS[0], dimensions=64).data
    assert len(item.embedding) == 64
    assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-3)


def test_pooling_can_be_chosen_per_request(client):
    mean = client.embeddings.create(model="minilm", input=TEXTS[0]).data[0].embedding
    cls = client.embeddings.create(model="minilm", input=TEXTS[0], extra_body={"pooling": "cls"}).data[0].embedding
    assert cosine(mean, cls) < 0.99


def test_token_inputs_embed_like_their_text(client, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    tokens = tokenizer(TEXTS[1])["input_ids"]
    by_text = client.embeddings.create(model="minilm", input=TEXTS[1]).data[0].embedding
    by_tokens = client.embeddings.create(model="minilm", input=[tokens]).data[0].embedding
    assert cosine(by_text, by_tokens) > 0.999
