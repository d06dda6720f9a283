"""Structured output through xgrammar: the core's grammars, compiled for one tokenizer.

Every grammar is GBNF from the core chat layer (a request's ``grammar``, a JSON schema,
a forced tool call; see :mod:`lllms_core.chat.gbnf`), compiled by xgrammar and applied
by its transformers logits processor. With ``tool_choice: "auto"`` a structural tag
leaves the model free until it writes its format's marker (``<tool_call>``), then holds
it to calls of the request's functions with matching arguments.
"""

from __future__ import annotations

import threading
from typing import Any

import xgrammar as xgr
from xgrammar.contrib.hf import LogitsProcessor as GrammarLogitsProcessor
from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TriggeredTagsFormat

from lllms_core.plugin_api import (
    InvalidRequestError,
    ToolSetup,
    output_grammar,
    tool_call_gbnf,
)


def check_grammar(grammar: str, param: str) -> None:
    """Parse a grammar in xgrammar's dialect (without a tokenizer); a 400 if it does not parse."""
    try:
        xgr.Grammar.from_ebnf(grammar)
    except (RuntimeError, ValueError) as error:
        raise InvalidRequestError(f"the grammar is not valid: {error}", param=param) from None


def logits_processor(grammar: xgr.CompiledGrammar) -> GrammarLogitsProcessor:
    """A fresh processor (they are single-use) applying ``grammar``."""
    return GrammarLogitsProcessor(grammar)


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer (built on first use; compiled grammars are cached by xgrammar)."""

    def __init__(self, generator):
        self.generator = generator
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                generator = self.generator
                info = xgr.TokenizerInfo.from_huggingface(
                    generator.tokenizer,
                    vocab_size=generator.vocab_size,
                    stop_token_ids=generator.stop_token_ids,
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, grammar: str, param: str) -> xgr.CompiledGrammar:
        try:
            return self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"the grammar is not valid: {error}", param=param) from None

    def for_request(self, request: Any, tools: ToolSetup | None, checked: str | None) -> xgr.CompiledGrammar | None:
        """The compiled grammar of a request (``checked``: what ``check_request`` found)."""
        if tools is not None and tools.forced is not None:
            return self.compile(output_grammar(request, tools), "tools")
        grammar = checked if checked is not None else output_grammar(request)
        if grammar is not None:
            return self.compile(grammar, "grammar" if request.grammar is not None else "response_format")
        if tools is not None:
            return self._calls_after_marker(tools)
        return None

    def _calls_after_marker(self, tools: ToolSetup) -> xgr.CompiledGrammar:
        """Free text until the format's marker, then calls of the request's functions."""
        trigger = tools.format.parser_class.markers[0]
        tag = TagFormat(begin=trigger, content=GrammarFormat(grammar=tool_call_gbnf(tools, after=trigger)), end="")
        try:
            return self.compiler.compile_structural_tag(StructuralTag(format=TriggeredTagsFormat(triggers=[trigger], tags=[tag])))
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"the tools' parameter schemas cannot be used: {error}", param="tools") from None
