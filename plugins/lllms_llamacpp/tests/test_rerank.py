"""Reranking through ``POST /v1/rerank`` with llama.cpp: a reranker GGUF scores each (query,
document) pair with its classifier head (rank pooling); a GGUF that is not a reranker ranks by
the cosine similarity of its embeddings.

No reranker GGUF installs offline, so the reranker is a tiny randomly initialised Qwen3-Reranker
style model (rank pooling, a "yes"/"no" classifier head, a ``rerank`` template; a second one
without the template, whose vocabulary adds EOS and SEP) with SmolLM2's real tokenizer, written
with the ``gguf`` package: its scores are noise; what is real is the path, and what a user sees
of it (the shape, the order, top_n, documents, usage, errors)."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(120)

QUERY = "What do bees make?"
PASSAGES = [
    "Honey bees make honey from the nectar of flowers and store it in wax combs.",
    "The train to Lyon leaves from platform four at ten past nine.",
    "A violin has four strings tuned in fifths.",
    "Glaciers carve valleys as they move slowly downhill.",
]
RERANK_TEMPLATE = "<|im_start|>user\n<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n"


def write_tiny_reranker(path: Path, tokenizer_source: Path, template: bool = True) -> None:
    """A two-layer Qwen3 GGUF (32 wide) with rank pooling and a two-label classifier head, and
    the tokenizer of ``tokenizer_source``; random weights (seeded). With ``template``, a
    ``rerank`` template; else a vocabulary that adds EOS and SEP tokens (as BERT rerankers')."""
    import gguf

    reader = gguf.GGUFReader(str(tokenizer_source))

    def values(name: str) -> list:
        field = reader.fields[name]
        return [field.parts[index] for index in field.data]

    tokens = [bytes(part).decode() for part in values("tokenizer.ggml.tokens")]
    merges = [bytes(part).decode() for part in values("tokenizer.ggml.merges")]
    token_types = [int(part[0]) for part in values("tokenizer.ggml.token_type")]
    n_embd, n_head, n_layer, n_ff = 32, 2, 2, 64
    head = n_embd // n_head
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_name("tiny random reranker")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(["yes", "no"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(int(values("tokenizer.ggml.bos_token_id")[0][0]))
    writer.add_eos_token_id(int(values("tokenizer.ggml.eos_token_id")[0][0]))
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])
    else:
        writer.add_sep_token_id(0)
        writer.add_add_eos_token(True)
        writer.add_add_sep_token(True)
    random = np.random.default_rng(0)

    def weights(*shape: int) -> np.ndarray:
        return (random.standard_normal(shape) * 0.2).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    writer.add_tensor("token_embd.weight", weights(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    writer.add_tensor("cls.output.weight", weights(2, n_embd))
    for layer in range(n_layer):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", ones(n_embd))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(block + name + ".weight", weights(n_embd, n_embd))
        writer.add_tensor(block + "attn_q_norm.weight", ones(head))
        writer.add_tensor(block + "attn_k_norm.weight", ones(head))
        writer.add_tensor(block + "ffn_norm.weight", ones(n_embd))
        writer.add_tensor(block + "ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(block + "ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(block + "ffn_down.weight", weights(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def server(smollm2_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reranker")
    write_tiny_reranker(folder / "templated.gguf", smollm2_file)
    write_tiny_reranker(folder / "pairs.gguf", smollm2_file, template=False)
    device = {"gpu": False, "cpu_threads": 1}
    smol = {"engine": "llamacpp", "location": str(smollm2_file), "context_size": 512, "parallel": 2, "device": device}
    config = {
        "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
        "models": {
            "ranker": {"engine": "llamacpp", "task": "rerank", "location": str(folder / "templated.gguf"),
                       "context_size": 128, "parallel": 3, "device": device},
            "ranker-pairs": {"engine": "llamacpp", "task": "rerank", "location": str(folder / "pairs.gguf"),
                             "context_size": 128, "device": device},
            "smol-rerank": {**smol, "task": "rerank"},
            "smol-embed": {**smol, "task": "embedding"},
        },
    }  # fmt: skip
    running = BackgroundServer(config).start()
    yield running
    running.stop()


def rerank(server, **body) -> httpx.Response:
    return httpx.post(server.url("/v1/rerank"), json=body, timeout=60)


def test_a_reranker_gguf_scores_each_pair_with_its_classifier(server):
    documents = [PASSAGES[0], {"text": PASSAGES[1]}, PASSAGES[2], {"text": PASSAGES[3]}]
    response = rerank(server, model="ranker", query=QUERY, documents=documents, top_n=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ranker" and body["id"].startswith("rerank-")
    results = body["results"]
    # random weights: the scores are noise, but each is the probability of "yes" the head gives
    assert len(results) == 3 and all(0 < result["relevance_score"] < 1 for result in results)
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert len({result["index"] for result in results}) == 3
    for result in results:
        assert result["document"] == {"text": PASSAGES[result["index"]]}
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4 * len(QUERY.split())

    # the 4 pairs go through 3 sequences in 2 batches: a pair's score is its own, wherever it is
    # (to flash attention's f16 arithmetic, which differs a little with the batch's shape)
    everything = rerank(server, model="ranker", query=QUERY, documents=PASSAGES).json()["results"]
    reversed_order = rerank(server, model="ranker", query=QUERY, documents=PASSAGES[::-1]).json()["results"]
    by_document = {result["index"]: result["relevance_score"] for result in everything}
    for result in reversed_order:
        assert result["relevance_score"] == pytest.approx(by_document[len(PASSAGES) - 1 - result["index"]], abs=3e-3)
    assert [result["index"] for result in everything][:3] == [result["index"] for result in results]

    bare = rerank(server, model="ranker", query=QUERY, documents=PASSAGES, top_n=1, return_documents=False).json()
    assert bare["results"] == [{"index": everything[0]["index"], "relevance_score": everything[0]["relevance_score"]}]


def test_a_reranker_without_a_template_reads_query_eos_sep_document_eos(server):
    body = rerank(server, model="ranker-pairs", query=QUERY, documents=PASSAGES).json()
    assert sorted(result["index"] for result in body["results"]) == list(range(len(PASSAGES)))
    assert all(0 < result["relevance_score"] < 1 for result in body["results"])

    def count(text: str) -> int:
        tokenized = httpx.post(server.url("/tokenize"), json={"model": "ranker-pairs", "content": text, "add_special": False})
        return tokenized.json()["count"]

    assert body["usage"]["prompt_tokens"] == sum(count(QUERY) + count(passage) + 3 for passage in PASSAGES)


def test_a_pair_longer_than_the_reranker_reads_is_a_400(server):
    response = rerank(server, model="ranker", query=QUERY, documents=["short", "word " * 300])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "documents" and "document 1" in error["message"]
    assert rerank(server, model="ranker", query=QUERY, documents=["short"]).status_code == 200


def test_a_gguf_that_is_not_a_reranker_ranks_by_cosine_similarity(server):
    body = rerank(server, model="smol-rerank", query=QUERY, documents=PASSAGES).json()
    embedded = httpx.post(server.url("/v1/embeddings"), json={"model": "smol-embed", "input": [QUERY, *PASSAGES]},
                          timeout=60).json()["data"]  # fmt: skip
    query, *passages = [np.array(item["embedding"]) for item in embedded]
    cosines = [float(query @ passage / (np.linalg.norm(query) * np.linalg.norm(passage))) for passage in passages]
    assert [result["index"] for result in body["results"]] == sorted(range(len(PASSAGES)), key=lambda i: -cosines[i])
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(cosines[result["index"]], abs=1e-4)
    assert not math.isclose(body["results"][0]["relevance_score"], body["results"][-1]["relevance_score"])
