"""The gpt4all engine for lllms (GGUF models through gpt4all 2.8.2).

Importing this package does not import gpt4all: the engine loads it when it
creates an instance, so ``lllms --help`` stays fast.
"""

from lllms_core.plugin_api import hookimpl

from lllms_gpt4all.engine import Gpt4AllEngine, Gpt4AllOptions

__all__ = ["Gpt4AllEngine", "Gpt4AllOptions", "register_engines"]


@hookimpl
def register_engines(register):
    register(Gpt4AllEngine)
