"""Saved slot states in the model's prompt cache (RAM tier only).

A slot's state is its tokens and its ``DynamicCache``. Before a slot's cache is cut back
for another conversation it is kept in the model's prompt cache (a deep copy: generation
grows a cache in place), and a prompt that extends a kept state gets a copy of it instead
of evaluating those tokens. Only caches that can be cut back to a prefix (``crop``) are
kept; they are live torch objects, so they stay in RAM (the disk tier holds only bytes an
engine can write). Everything here blocks: it runs in the instance's worker thread.
"""

from __future__ import annotations

import copy
from typing import Any

from lllms_core.plugin_api import PROMPT_CACHE_BLOCK as BLOCK
from lllms_core.plugin_api import ContextKey, common_prefix


def cache_bytes(cache: Any) -> int:
    """The bytes of a cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "element_size"):
                total += tensor.element_size() * tensor.nelement()
    return total


def keepable(cache: Any) -> bool:
    return cache is not None and hasattr(cache, "crop") and cache_bytes(cache) > 0


def prepare_slot(state, prompt: list[int], prompt_cache, previous_key: ContextKey) -> None:
    """Before ``prompt`` runs in the slot: keep what the slot holds beyond the prompt's prefix,
    and take a kept state that holds more of the prompt than the slot does."""
    if prompt_cache is None:
        return
    kept = common_prefix(state.tokens, prompt)
    if len(state.tokens) - kept >= BLOCK and keepable(state.cache) and not prompt_cache.holds(state.tokens):
        saved = copy.deepcopy(state.cache)
        prompt_cache.put(state.tokens, saved, cache_bytes(saved), previous_key, persistent=False)
    limit = len(prompt) - 1  # the last prompt token is evaluated for its logits
    if limit - min(kept, limit) < BLOCK:
        return
    found = prompt_cache.lookup(prompt[:limit], better_than=kept)
    if found is None:
        return
    entry, length = found
    data = entry.data
    if data is None:
        return
    state.cache, state.tokens = copy.deepcopy(data), list(entry.tokens)
    prompt_cache.restored(entry, length)


def save_slot(state, prompt_cache, key: ContextKey) -> None:
    """Keep the slot's state before its instance is disposed."""
    if keepable(state.cache) and len(state.tokens) >= BLOCK and not prompt_cache.holds(state.tokens):
        prompt_cache.put(state.tokens, state.cache, cache_bytes(state.cache), key, persistent=False)
