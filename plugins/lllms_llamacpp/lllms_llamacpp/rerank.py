"""Reranking with a reranker GGUF (BGE-reranker, Jina, Qwen3-Reranker...): llama.cpp's rank
pooling puts the model's classifier head on each sequence, so the pooled output of one
(query, document) pair is its relevance score.

Pairs are written as llama-server writes them: through the GGUF's ``rerank`` template
(``tokenizer.chat_template.rerank``, with ``{query}`` and ``{document}``) when it has one,
else ``[BOS] query [EOS] [SEP] document [EOS]`` as the vocabulary adds those tokens. Several
pairs are scored in one batch, one sequence each. Imports llama_cpp: only the engine's
methods import this module.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Iterator

import llama_cpp

from lllms_core.plugin_api import ContextLengthExceededError, EngineError

if TYPE_CHECKING:
    from lllms_llamacpp.native import Context, Model

PLACEHOLDER = re.compile(r"\{(query|document)\}")


def pair_tokens(model: "Model", query: str, document: str) -> list[int]:
    """The tokens of one (query, document) pair, as the model was trained to read it."""
    template = model.metadata.get("tokenizer.chat_template.rerank")
    if template is not None:
        return _templated(model, template, {"query": query, "document": document})
    vocab = model.vocab
    sep = llama_cpp.llama_vocab_sep(vocab)
    eos = model.eos if model.eos >= 0 else sep
    add_eos = llama_cpp.llama_vocab_get_add_eos(vocab)
    tokens = [model.bos] if model.add_bos and model.bos >= 0 else []
    tokens += model.tokenize(query, add_special=False, parse_special=False)
    if add_eos:
        tokens.append(eos)
    if llama_cpp.llama_vocab_get_add_sep(vocab):
        tokens.append(sep)
    tokens += model.tokenize(document, add_special=False, parse_special=False)
    if add_eos:
        tokens.append(eos)
    return tokens


def _templated(model: "Model", template: str, texts: dict[str, str]) -> list[int]:
    """The template's own text with its special tokens parsed; the query's and document's never
    are (a document cannot write the end of its turn and an answer). The whitespace before a
    placeholder goes with the client's text, which a BPE vocabulary reads as one word with it."""
    tokens: list[int] = []
    parts = PLACEHOLDER.split(template)
    for number, part in enumerate(parts):
        if number % 2:
            continue
        lead = ""
        if number + 1 < len(parts):
            stripped = part.rstrip(" ")
            part, lead = stripped, part[len(stripped) :]
        if part:
            tokens += model.tokenize(part, add_special=False, parse_special=True)
        if number + 1 < len(parts):
            tokens += model.tokenize(lead + texts[parts[number + 1]], add_special=False, parse_special=False)
    return tokens


def score(values: list[float]) -> float:
    """A relevance score from the classifier's outputs: one output is a logit (its sigmoid, as
    sentence-transformers' CrossEncoder gives it); several (Qwen3-Reranker's "yes" and "no") are
    probabilities already, the first being relevance."""
    if len(values) == 1:
        return 1 / (1 + math.exp(-values[0]))
    return values[0]


def groups(inputs: list[list[int]], sequences: int, batch: int) -> Iterator[list[list[int]]]:
    """The token lists in consecutive groups of at most ``sequences`` lists and ``batch`` tokens."""
    group: list[list[int]] = []
    total = 0
    for tokens in inputs:
        if group and (len(group) == sequences or total + len(tokens) > batch):
            yield group
            group, total = [], 0
        group.append(tokens)
        total += len(tokens)
    if group:
        yield group


def rank(model: "Model", context: "Context", query: str, documents: list[str], limit: int) -> tuple[list[float], int]:
    """Each document's relevance to the query and the tokens read (runs in a worker thread)."""
    pairs = [pair_tokens(model, query, document) for document in documents]
    for index, tokens in enumerate(pairs):
        if len(tokens) > limit:
            raise ContextLengthExceededError(
                f"document {index} and the query make {len(tokens)} tokens; this model reads at most {limit}",
                param="documents",
            )
    outputs = llama_cpp.llama_model_n_cls_out(model.pointer)
    scores: list[float] = []
    for group in groups(pairs, context.settings.n_seq, context.n_batch):
        context.clear()
        context.clear_batch()
        for seq, tokens in enumerate(group):
            for position, token in enumerate(tokens):
                context.add(token, position, seq, True)
        if context.decode() != 0:
            raise EngineError("llama.cpp could not score the documents")
        for seq in range(len(group)):
            pooled = llama_cpp.llama_get_embeddings_seq(context.pointer, seq)
            if not pooled:
                raise EngineError("llama.cpp gave no score for a document")
            scores.append(score([pooled[index] for index in range(outputs)]))
    return scores, sum(len(tokens) for tokens in pairs)
