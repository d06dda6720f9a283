"""Which grammar constrains a completion: a request's ``grammar``, its JSON
``response_format``, or a forced tool call. One of them at most; the rules are the
same in every engine that has grammars."""

from __future__ import annotations

from typing import Any, Callable

import msgspec

from lllms_core.chat.gbnf import json_schema_gbnf, tool_call_gbnf
from lllms_core.chat.tool_calls import DEFAULT_TOOL_FORMAT
from lllms_core.chat.tools import ToolSetup, tool_setup
from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import (
    ChatCompletionRequest,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    TextCompletionRequest,
)


def output_grammar(request: Any, tools: ToolSetup | None = None, named: dict[str, str] | None = None) -> str | None:
    """The GBNF grammar a completion must follow, or None.

    ``grammar`` (GBNF text, or the name of one of ``named``) and a JSON
    ``response_format`` exclude each other; a forced tool call (``tool_choice``
    ``required`` or a named function) excludes both. With ``tool_choice: "auto"`` a
    grammar or format still applies (what it makes the model write may be a call).
    """
    response_format = getattr(request, "response_format", None)
    structured = isinstance(response_format, (ResponseFormatJsonObject, ResponseFormatJsonSchema))
    if tools is not None and tools.forced is not None:
        if request.grammar is not None or structured:
            raise InvalidRequestError(
                "a forced tool call cannot be combined with grammar or response_format", param="tool_choice"
            )
        return tool_call_gbnf(tools)
    if request.grammar is not None:
        if structured:
            raise InvalidRequestError("grammar and a JSON response_format cannot be combined", param="grammar")
        if named and request.grammar in named:
            return named[request.grammar]
        if "::=" not in request.grammar:
            raise InvalidRequestError(f"grammar {request.grammar!r} not found", param="grammar")
        return request.grammar
    if isinstance(response_format, ResponseFormatJsonObject):
        return json_schema_gbnf({"type": "object"})
    if isinstance(response_format, ResponseFormatJsonSchema):
        schema = response_format.json_schema.schema
        return json_schema_gbnf({"type": "object"} if schema is msgspec.UNSET else schema, param="response_format")
    return None


def checked_grammar(request: Any, parse: Callable[[str, str], None], named: dict[str, str] | None = None) -> str | None:
    """What an engine's ``check_request`` does with a request's grammar: find it (as
    :func:`output_grammar`) and ``parse(grammar, param)`` it, raising a 400 for one that does
    not parse. A forced tool call's grammar follows the model's tool format, which is known
    only with an instance: here its conflicts and parameter schemas are checked, and None
    returned (the task builds it)."""
    if isinstance(request, ChatCompletionRequest):
        tools = tool_setup(request, DEFAULT_TOOL_FORMAT)
        if tools is not None and tools.forced is not None:
            output_grammar(request, tools)
            return None
    elif not isinstance(request, TextCompletionRequest):
        return None
    grammar = output_grammar(request, None, named)
    if grammar is not None:
        parse(grammar, "grammar" if request.grammar is not None else "response_format")
    return grammar
