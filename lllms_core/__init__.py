"""lllms: local LLM inference behind an OpenAI-compatible API.

The main entry points, imported lazily so that ``lllms --help`` stays fast:
``ModelServer`` (the library facade), ``load_config``, ``serve`` and ``serve_async`` (HTTP).
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "ModelServer": "lllms_core.server",
    "load_config": "lllms_core.config",
    "Config": "lllms_core.config",
    "serve": "lllms_core.http",
    "serve_async": "lllms_core.http",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lllms_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = list(_EXPORTS)
