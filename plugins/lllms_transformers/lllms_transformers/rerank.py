"""Cross-encoder reranking: a sequence-classification model (sentence-transformers' CrossEncoder
format) scores each (query, document) pair read together."""

from __future__ import annotations

from pathlib import Path

import torch

from lllms_core.plugin_api import RerankRequest, RerankResult

BATCH = 16
"""Pairs scored in one forward pass."""


class Reranker:
    def __init__(self, model, tokenizer, device, max_length: int | None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length

    @classmethod
    def load(cls, model, prepared: Path, device, dtype) -> "Reranker":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lllms_transformers.loading import load_pretrained

        tokenizer = AutoTokenizer.from_pretrained(prepared, local_files_only=True, trust_remote_code=model.options.trust_remote_code)
        scorer = load_pretrained(AutoModelForSequenceClassification, prepared, model, device, dtype)
        max_length = model.context_size or getattr(scorer.config, "max_position_embeddings", None)
        return cls(scorer, tokenizer, device, max_length)

    def info(self) -> dict:
        return {"device": str(self.device), "labels": self.model.config.num_labels}

    def close(self) -> None:
        self.model = None

    def rerank(self, request: RerankRequest) -> RerankResult:
        """Scores as CrossEncoder gives them: the sigmoid of a one-label model's logit, else the
        probability of the last label (the "relevant" one of a two-label model)."""
        texts = request.texts
        scores: list[float] = []
        tokens = 0
        truncate = {"truncation": "only_second", "max_length": self.max_length} if self.max_length else {}
        for start in range(0, len(texts), BATCH):
            documents = texts[start : start + BATCH]
            batch = self.tokenizer([request.query] * len(documents), documents, padding=True, return_tensors="pt", **truncate)
            tokens += int(batch["attention_mask"].sum())
            with torch.inference_mode():
                logits = self.model(**{name: tensor.to(self.device) for name, tensor in batch.items()}).logits.float()
            if logits.shape[-1] == 1:
                scores += torch.sigmoid(logits[:, 0]).cpu().tolist()
            else:
                scores += torch.softmax(logits, dim=-1)[:, -1].cpu().tolist()
        return RerankResult(scores=scores, prompt_tokens=tokens)
