"""The llama.cpp engine for lllms (GGUF models through llama-cpp-python).

Importing this package does not import llama_cpp: the engine loads it when it
creates an instance, so ``lllms --help`` stays fast.
"""

from lllms_core.plugin_api import hookimpl

from lllms_llamacpp.engine import LlamaCppEngine, LlamaCppOptions

__all__ = ["LlamaCppEngine", "LlamaCppOptions", "register_engines"]


@hookimpl
def register_engines(register):
    register(LlamaCppEngine)
