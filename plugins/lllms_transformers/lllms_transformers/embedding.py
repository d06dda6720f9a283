"""Text embeddings with sentence-transformers style models.

The model's ``modules.json`` names its modules: the transformer (its directory),
the pooling (``1_Pooling/config.json``) and whether a ``Normalize`` module
follows. Plain transformers models without these files get mean pooling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lllms_core.plugin_api import (
    EmbeddingRequest,
    EmbeddingResult,
    InvalidRequestError,
    ModelLoadError,
    RequestImages,
    UnsupportedParameterError,
    is_image_data_url,
    check_token_ids,
)

BATCH = 32
"""Inputs embedded in one forward pass."""

POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}


class Embedder:
    def __init__(self, model, tokenizer, device, pooling: str, normalize: bool, max_length: int | None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.dimensions = model.config.hidden_size

    @classmethod
    def load(cls, model, prepared: Path, device, dtype) -> "Embedder":
        from transformers import AutoModel, AutoTokenizer

        from lllms_transformers.loading import load_pretrained

        modules = _read_json(prepared / "modules.json") or []
        transformer_dir, pooling, normalize = prepared, "mean", False
        for module in modules:
            kind = module.get("type", "")
            if kind.endswith("models.Transformer"):
                transformer_dir = prepared / module.get("path", "")
            elif kind.endswith("models.Pooling") and not model.options.pooling:
                pooling = _pooling_mode(model, _read_json(prepared / module.get("path", "") / "config.json") or {})
            elif kind.endswith("models.Normalize"):
                normalize = True
        if not modules:
            normalize = True  # OpenAI's embeddings are unit length
        if model.options.pooling:
            pooling = model.options.pooling
        if model.options.normalize is not None:
            normalize = model.options.normalize
        settings = _read_json(transformer_dir / "sentence_bert_config.json") or {}
        tokenizer = AutoTokenizer.from_pretrained(transformer_dir, local_files_only=True, trust_remote_code=model.options.trust_remote_code)
        tokenizer.padding_side = "right"  # last-token pooling counts from the left
        encoder = load_pretrained(AutoModel, transformer_dir, model, device, dtype)
        max_length = settings.get("max_seq_length") or getattr(encoder.config, "max_position_embeddings", None)
        if model.context_size:
            max_length = min(max_length or model.context_size, model.context_size)
        return cls(encoder, tokenizer, device, pooling, normalize, max_length)

    def info(self) -> dict:
        return {"device": str(self.device), "pooling": self.pooling, "normalize": self.normalize, "dimensions": self.dimensions}

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def embed(self, request: EmbeddingRequest, images: RequestImages) -> EmbeddingResult:
        if any(is_image_data_url(item) for item in request.inputs):
            raise UnsupportedParameterError("this model embeds texts only; image inputs need a CLIP-style model", param="input")
        if request.dimensions is not None and request.dimensions > self.dimensions:
            raise InvalidRequestError(
                f"dimensions must be at most {self.dimensions} for this model", param="dimensions"
            )
        pooling = request.pooling or self.pooling
        vectors: list[list[float]] = []
        tokens = 0
        inputs = request.inputs
        for start in range(0, len(inputs), BATCH):
            batch = self._encode(inputs[start : start + BATCH])
            tokens += int(batch["attention_mask"].sum())
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            pooled = _pool(hidden, batch["attention_mask"], pooling)
            if request.dimensions is not None:
                pooled = pooled[:, : request.dimensions]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            vectors.extend(pooled.float().cpu().tolist())
        return EmbeddingResult(embeddings=vectors, prompt_tokens=tokens)

    def _encode(self, items: list) -> dict:
        truncate = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        if all(isinstance(item, str) for item in items):
            batch = self.tokenizer(items, padding=True, return_tensors="pt", **truncate)
        else:
            for item in items:
                if not isinstance(item, str):
                    check_token_ids(item, self.model.config.vocab_size, "input")
            ids = [self.tokenizer(item)["input_ids"] if isinstance(item, str) else list(item) for item in items]
            if self.max_length:
                ids = [row[: self.max_length] for row in ids]
            batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {name: tensor.to(self.device) for name, tensor in batch.items()}


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _pooling_mode(model, config: dict) -> str:
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    others = [key for key, value in config.items() if key.startswith("pooling_mode_") and value and key not in POOLING_MODES]
    if others or len(modes) > 1:
        raise ModelLoadError(
            f"model {model.id!r}: its pooling ({', '.join(others + modes)}) is not supported; set `pooling` to mean, cls or last"
        )
    return modes[0] if modes else "mean"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
