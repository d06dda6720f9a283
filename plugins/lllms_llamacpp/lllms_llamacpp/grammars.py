"""GBNF grammars for JSON output, JSON schemas and forced tool calls."""

from __future__ import annotations

import json
from typing import Any

from lllms_core.plugin_api import InvalidRequestError

from lllms_llamacpp.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _literal(text: str) -> str:
    return json.dumps(text)


def json_object_grammar() -> str:
    """Any JSON object."""
    return schema_grammar({"type": "object"}, param="response_format")


def schema_grammar(schema: dict[str, Any], *, param: str) -> str:
    """A grammar whose sentences are the JSON documents matching ``schema``."""
    converter = _converter()
    try:
        resolved = converter.resolve_refs(schema, "request")
        converter.visit(resolved, "")
        return converter.format_grammar()
    except Exception as error:  # the converter raises plain errors on schemas it cannot express
        raise InvalidRequestError(f"cannot turn the JSON schema into a grammar: {error}", param=param) from None


def tool_call_grammar(functions: list[tuple[str, dict[str, Any]]], *, parallel: bool) -> str:
    """A grammar forcing one (or, with ``parallel``, several) Hermes-style calls of the
    given functions, with arguments matching each function's parameter schema."""
    converter = _converter()
    alternatives = []
    try:
        for number, (name, parameters) in enumerate(functions):
            schema = converter.resolve_refs(parameters or {"type": "object"}, f"tool-{number}")
            arguments_rule = converter.visit(schema, f"tool{number}-arguments")
            prefix = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '
            alternatives.append(f"{_literal(prefix)} {arguments_rule} {_literal(chr(125) + chr(10) + TOOL_CALL_CLOSE)}")
    except Exception as error:
        raise InvalidRequestError(f"cannot turn a tool's parameters into a grammar: {error}", param="tools") from None
    call = " | ".join(f"({alternative})" for alternative in alternatives)
    rules = converter.format_grammar()
    root = 'root ::= call ("\\n" call)*' if parallel else "root ::= call"
    return f"{root}\ncall ::= {call}\n{rules}"
