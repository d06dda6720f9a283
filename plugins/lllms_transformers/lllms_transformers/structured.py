"""Structured output through xgrammar: JSON, JSON schemas, GBNF grammars and tool calls.

The grammar is applied by xgrammar's transformers logits processor. Tool calls
use the Hermes / Qwen form that many chat templates know::

    <tool_call>
    {"name": "<function name>", "arguments": <arguments as JSON>}
    </tool_call>

and a structural tag makes the model write exactly that: free text until
``<tool_call>`` for ``tool_choice: auto``, only calls for ``required`` or a
named function. Since the grammar fixes the form, the stream is split into
content and calls by the fixed markers, not by guessing.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

import msgspec
import xgrammar as xgr
from xgrammar.contrib.hf import LogitsProcessor as GrammarLogitsProcessor
from xgrammar.structural_tag import (
    JSONSchemaFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from lllms_core.plugin_api import (
    ChatCompletionRequest,
    InvalidRequestError,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    StopStringFilter,
    Tool,
    ToolCall,
    ToolCallDelta,
)

CALL_OPEN = "<tool_call>"
CALL_HEAD = '<tool_call>\n{"name": "'
CALL_ARGUMENTS = '", "arguments": '
CALL_END = "}\n</tool_call>"

TOOL_INSTRUCTIONS = """You may call one or more functions to answer the user. The functions are described in JSON within <tools></tools>:
<tools>
{tools}
</tools>
To call a function, answer with a JSON object with the function name and its arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>"""


def function_dict(tool: Tool) -> dict[str, Any]:
    return msgspec.to_builtins(tool.function)


def tool_instructions(tools: list[Tool]) -> str:
    """The system prompt that describes the tools, for templates that do not know tools."""
    return TOOL_INSTRUCTIONS.format(tools="\n".join(json.dumps(function_dict(tool)) for tool in tools))


def call_text(call: ToolCall) -> str:
    """A past tool call as the model would have written it."""
    return f"{CALL_HEAD}{call.function.name}{CALL_ARGUMENTS}{call.function.arguments}{CALL_END}"


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

    def for_chat(self, request: ChatCompletionRequest, tools_active: bool) -> xgr.CompiledGrammar | None:
        asked = []
        if tools_active:
            asked.append("tools")
        response_format = request.response_format
        if isinstance(response_format, (ResponseFormatJsonObject, ResponseFormatJsonSchema)):
            asked.append("response_format")
        if request.grammar:
            asked.append("grammar")
        if len(asked) > 1:
            raise InvalidRequestError(
                f"only one of tools, response_format and grammar may constrain the output (got {', '.join(asked)})",
                param=asked[1],
            )
        if tools_active:
            return self.for_tools(request)
        if isinstance(response_format, ResponseFormatJsonObject):
            # an object, as OpenAI's json_object; compact, so a small model cannot loop on whitespace
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if isinstance(response_format, ResponseFormatJsonSchema):
            schema = response_format.json_schema.schema
            schema = {"type": "object"} if schema is msgspec.UNSET else schema
            try:
                return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            except (RuntimeError, ValueError) as error:
                raise InvalidRequestError(f"the JSON schema cannot be used: {error}", param="response_format") from None
        if request.grammar:
            return self.for_grammar(request.grammar)
        return None

    def for_grammar(self, grammar: str) -> xgr.CompiledGrammar:
        try:
            return self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"the grammar is not valid: {error}", param="grammar") from None

    def for_tools(self, request: ChatCompletionRequest) -> xgr.CompiledGrammar:
        tools = request.tools or []
        choice = request.tool_choice
        if isinstance(choice, NamedToolChoice):
            tools = [tool for tool in tools if tool.function.name == choice.function.name]
            if not tools:
                raise InvalidRequestError(f"tool_choice names an unknown function {choice.function.name!r}", param="tool_choice")
        tags = []
        for tool in tools:
            parameters = tool.function.parameters
            schema = {"type": "object"} if parameters is msgspec.UNSET else parameters
            tags.append(
                TagFormat(
                    begin=f"{CALL_HEAD}{tool.function.name}{CALL_ARGUMENTS}",
                    content=JSONSchemaFormat(json_schema=schema, max_whitespace_cnt=1),
                    end=CALL_END,
                )
            )
        single = request.parallel_tool_calls is False
        if choice in (None, "auto"):
            structure = TriggeredTagsFormat(triggers=[CALL_OPEN], tags=tags, stop_after_first=single)
        else:
            structure = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=single)
        try:
            return self.compiler.compile_structural_tag(StructuralTag(format=structure))
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"the tools' parameter schemas cannot be used: {error}", param="tools") from None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class ToolCallOutput:
    """Splits generated text into content and tool calls (ToolCallDelta: the first piece of
    a call has its id and name, the next ones pieces of its arguments)."""

    def __init__(self, stops: list[str]):
        self.content = StopStringFilter(stops)
        self.stopped = False
        self.called_tools = False
        self.calls = 0
        self.mode = "text"
        self.buffer = ""

    def _text(self, text: str) -> str:
        if self.stopped:
            return ""
        emitted, self.stopped = self.content.push(text)
        return "" if self.called_tools and not emitted.strip() else emitted

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self.buffer += text
        content, deltas = "", []
        while True:
            if self.mode == "text":
                at = self.buffer.find(CALL_OPEN)
                cut = at if at != -1 else len(self.buffer) - _partial_suffix(self.buffer, CALL_OPEN)
                content += self._text(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                if at == -1:
                    break
                self.mode = "head"
            elif self.mode == "head":
                at = self.buffer.find(CALL_ARGUMENTS)
                if at == -1:
                    break
                name = self.buffer[len(CALL_HEAD) : at]
                deltas.append(ToolCallDelta(index=self.calls, id=f"call_{secrets.token_hex(12)}", name=name))
                self.buffer = self.buffer[at + len(CALL_ARGUMENTS) :]
                self.mode = "arguments"
                self.called_tools = True
            else:
                at = self.buffer.find(CALL_END)
                cut = at if at != -1 else len(self.buffer) - _partial_suffix(self.buffer, CALL_END)
                if cut:
                    deltas.append(ToolCallDelta(index=self.calls, arguments=self.buffer[:cut]))
                if at == -1:
                    self.buffer = self.buffer[cut:]
                    break
                self.buffer = self.buffer[at + len(CALL_END) :]
                self.mode = "text"
                self.calls += 1
        return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left once generation ended (a call cut by the token limit stays cut)."""
        rest, self.buffer = self.buffer, ""
        if self.mode == "arguments" and rest:
            return self._text(""), [ToolCallDelta(index=self.calls, arguments=rest)]
        content = self._text(rest) if self.mode == "text" else ""
        tail = "" if self.stopped else self.content.flush()
        return content + ("" if self.called_tools and not tail.strip() else tail), []
