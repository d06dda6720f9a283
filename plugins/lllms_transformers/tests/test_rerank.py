"""Reranking with transformers: all-MiniLM-L6-v2 (the default embedding model) by cosine
similarity in the core, and the cross-encoder path on a tiny randomly initialised model."""

from __future__ import annotations

import pytest

from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(120)

QUERY = "How many legs does a spider have?"
PASSAGES = [
    "The Eiffel Tower was finished in 1889 for the World's Fair in Paris.",
    "Spiders are arachnids: every spider has eight legs and two body segments.",
    "Bread is made from flour, water, yeast and salt, baked in an oven.",
    "The stock market fell sharply on Monday after the announcement.",
]


@pytest.fixture(scope="session")
def cross_encoder(minilm_dir, tmp_path_factory):
    """A randomly initialised two-layer BERT sequence classifier (one label) with MiniLM's real
    tokenizer, saved as a CrossEncoder folder: its scores are noise, only the path is real."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    directory = tmp_path_factory.mktemp("cross-encoder")
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


async def test_minilm_ranks_the_answering_passage_first(minilm_dir, cache_dir):
    config = {"server": {"cache_dir": str(cache_dir)},
              "models": {"minilm": {"engine": "transformers", "task": "embedding", "location": str(minilm_dir)}}}
    async with ModelServer(config) as server:
        result = await server.rerank({"model": "minilm", "query": QUERY, "documents": PASSAGES})
    assert max(range(len(PASSAGES)), key=result.scores.__getitem__) == 1
    assert result.scores[1] > 0.5 > max(result.scores[0], result.scores[2], result.scores[3])


async def test_a_cross_encoder_scores_every_pair(cross_encoder, cache_dir):
    config = {"server": {"cache_dir": str(cache_dir)},
              "models": {"ranker": {"engine": "transformers", "task": "rerank", "location": str(cross_encoder)}}}
    async with ModelServer(config) as server:
        result = await server.rerank({"model": "ranker", "query": QUERY, "documents": PASSAGES})
        again = await server.rerank({"model": "ranker", "query": QUERY, "documents": list(reversed(PASSAGES))})
    # random weights: the scores are noise, but each is a probability, one per document, and a
    # document's score does not depend on its position or its neighbours
    assert len(result.scores) == len(PASSAGES) and all(0 < score < 1 for score in result.scores)
    assert again.scores == pytest.approx(list(reversed(result.scores)), abs=1e-5)
    assert result.prompt_tokens > len(PASSAGES) * 10


async def test_tokenize_round_trip(minilm_dir, cache_dir):
    config = {"server": {"cache_dir": str(cache_dir)},
              "models": {"minilm": {"engine": "transformers", "task": "embedding", "location": str(minilm_dir)}}}
    async with ModelServer(config) as server:
        tokens = await server.tokenize({"model": "minilm", "content": "local models are private", "add_special": False})
        text = await server.detokenize({"model": "minilm", "tokens": tokens.tokens})
    assert text.content == "local models are private"
