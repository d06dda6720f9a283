"""The chat layer every engine uses (see docs/chat.md).

- templates: :class:`ChatTemplate` renders a model's Jinja chat template (sandboxed, as
  Hugging Face templates expect) into a :class:`RenderedPrompt` that says which spans
  are the client's text; :class:`TemplateCapabilities` is what it renders.
- messages: :func:`template_messages`, the one policy for system/developer messages,
  tools, past calls, tool results and prefills.
- tools: :func:`tool_setup` reads a request's tools into a :class:`ToolSetup`; the
  registry :data:`TOOL_FORMATS` of :class:`ToolFormat` s (Hermes, Llama 3, Mistral,
  Qwen3-Coder) is chosen from the template by :func:`tool_format_for`; each has a
  streaming :class:`ToolCallParser`.
- output: :class:`CompletionOutput` turns generated text into content and tool-call
  deltas, applying stop strings (:class:`StopStringFilter`, built on
  :func:`partial_marker_length`).
- grammars: :func:`output_grammar` picks a request's grammar (:func:`checked_grammar`
  checks it before the request is queued); :func:`json_schema_gbnf`
  and :func:`tool_call_gbnf` write GBNF.
- context overflow: :class:`ContextBudget`, :func:`fit_chat` (for an engine with a
  tokenizer), :func:`fit_messages`, :func:`fit_tokens`, :func:`fewest_tokens`.
"""

from lllms_core.chat.constraints import checked_grammar, output_grammar
from lllms_core.chat.gbnf import json_schema_gbnf, tool_call_gbnf
from lllms_core.chat.json_stream import JsonInvalid, JsonScanner
from lllms_core.chat.markers import StopStringFilter, find_marker, partial_marker_length
from lllms_core.chat.messages import NO_TEMPLATE, config_messages, template_messages
from lllms_core.chat.output import CompletionOutput, OutputPiece
from lllms_core.chat.overflow import (
    ContextBudget,
    ContextOverflow,
    PromptTooLong,
    fewest_tokens,
    fit_chat,
    fit_messages,
    fit_tokens,
)
from lllms_core.chat.templates import CHATML_TEMPLATE, ChatTemplate, RenderedPrompt, TemplateCapabilities
from lllms_core.chat.tool_calls import (
    DEFAULT_TOOL_FORMAT,
    TOOL_FORMATS,
    Hermes,
    Llama3,
    Mistral,
    QwenCoder,
    ToolCallParser,
    ToolFormat,
    tool_format_for,
)
from lllms_core.chat.tools import TOOL_INSTRUCTIONS, ToolSetup, tool_setup

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "CompletionOutput",
    "ContextBudget",
    "ContextOverflow",
    "DEFAULT_TOOL_FORMAT",
    "Hermes",
    "JsonInvalid",
    "JsonScanner",
    "Llama3",
    "Mistral",
    "NO_TEMPLATE",
    "OutputPiece",
    "PromptTooLong",
    "QwenCoder",
    "RenderedPrompt",
    "StopStringFilter",
    "TOOL_FORMATS",
    "TOOL_INSTRUCTIONS",
    "TemplateCapabilities",
    "ToolCallParser",
    "ToolFormat",
    "ToolSetup",
    "checked_grammar",
    "config_messages",
    "fewest_tokens",
    "find_marker",
    "fit_chat",
    "fit_messages",
    "fit_tokens",
    "json_schema_gbnf",
    "output_grammar",
    "partial_marker_length",
    "template_messages",
    "tool_call_gbnf",
    "tool_format_for",
    "tool_setup",
]
