"""What a chat request asks of tools: which functions, whether a call is forced, how
many calls may come, and how the model is told about them (one payload, one text)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from lllms_core.chat.tool_calls import ToolCallParser, ToolFormat
from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import ChatCompletionRequest, NamedToolChoice

TOOL_INSTRUCTIONS = """You may call one or more functions to answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, reply with one block per call, each with the function's name and its arguments:
{example}"""
"""The system text that describes the tools to a model whose chat template does not take them."""


class ToolSetup(msgspec.Struct, kw_only=True, frozen=True):
    """The tools of one request, as the chat layer uses them.

    ``functions``: parameter schemas by function name (the functions a call may name).
    ``forced``: the functions a call must be made to (``tool_choice`` ``required`` or a
    named function), or None when the model may answer in text. ``parallel``: whether
    several calls may come in one answer.
    """

    format: type[ToolFormat]
    tools: tuple[Any, ...]
    """The request's ``Tool`` Structs."""
    functions: dict[str, dict[str, Any]]
    forced: tuple[str, ...] | None
    parallel: bool

    def parser(self) -> ToolCallParser:
        return self.format.parser(self)

    def payload(self) -> list[dict[str, Any]]:
        """The tools as a chat template's ``tools`` variable takes them (OpenAI's shape)."""
        return [msgspec.to_builtins(tool) for tool in self.tools]

    def instructions(self, plain=lambda text: text) -> str:
        """The system text describing the tools and the call format; ``plain`` marks the
        client's text in it (see :meth:`ChatTemplate.plain`)."""
        definitions = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in self.payload())
        example = self.format.render_call("<function name>", "<arguments as a JSON object>")
        return TOOL_INSTRUCTIONS.format(tools=plain(definitions), example=example)


def tool_setup(request: ChatCompletionRequest, tool_format: type[ToolFormat]) -> ToolSetup | None:
    """The request's tools in ``tool_format``, or None when it uses none (no tools, or
    ``tool_choice: "none"``). A named function that is not among the tools is a 400.
    (Any request with ``tools`` will do: one without ``tool_choice`` is ``"auto"``.)"""
    choice = getattr(request, "tool_choice", None)
    if not request.tools or choice == "none":
        return None
    functions = {
        tool.function.name: (tool.function.parameters if tool.function.parameters is not msgspec.UNSET else {"type": "object"})
        for tool in request.tools
    }
    forced: tuple[str, ...] | None = None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in functions:
            raise InvalidRequestError(
                f"tool_choice names the function {choice.function.name!r}, which is not in tools", param="tool_choice"
            )
        forced = (choice.function.name,)
    elif choice == "required":
        forced = tuple(functions)
    parallel = getattr(request, "parallel_tool_calls", None) is not False and not isinstance(choice, NamedToolChoice)
    return ToolSetup(format=tool_format, tools=tuple(request.tools), functions=functions, forced=forced, parallel=parallel)
