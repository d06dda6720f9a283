"""JSON schemas and tool calls as GBNF: what the grammars let a model write.

The grammars are checked with xgrammar's matcher (what the transformers engine applies);
llama.cpp parses the same text (its tests generate with it)."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import pytest
import xgrammar as xgr

from lllms_core.chat import TOOL_FORMATS, Mistral, ToolSetup, json_schema_gbnf, output_grammar, tool_call_gbnf
from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import ChatCompletionRequest

COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]))


def language(grammar: str):
    matcher = xgr.GrammarMatcher(COMPILER.compile_grammar(grammar), terminate_without_stop_token=True)

    def accepts(text: str) -> bool:
        matcher.reset()
        return matcher.accept_string(text) and matcher.is_terminated()

    return accepts


def check(schema, valid: list[str], invalid: list[str]) -> None:
    accepts = language(json_schema_gbnf(schema))
    for text in valid:
        jsonschema.validate(json.loads(text), schema)
        assert accepts(text), text
    for text in invalid:
        assert not accepts(text), text


def test_integer_ranges():
    check({"type": "integer", "minimum": 10, "maximum": 20}, ["10", "15", "20"], ["9", "21", "9327551831090926", "015"])
    accepts = language(json_schema_gbnf({"type": "integer", "minimum": -123, "maximum": 42}))
    assert [n for n in range(-300, 300) if accepts(str(n))] == list(range(-123, 43))
    accepts = language(json_schema_gbnf({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 300}))
    assert [n for n in range(-10, 400) if accepts(str(n))] == list(range(4, 300))
    accepts = language(json_schema_gbnf({"type": "integer", "minimum": 25}))
    assert [n for n in range(0, 1000) if accepts(str(n))] == list(range(25, 1000)) and accepts("1234567890123456")


def test_number_ranges():
    accepts = language(json_schema_gbnf({"type": "number", "minimum": 0.5, "maximum": 2.25}))
    candidates = [f"{whole}.{fraction}" for whole in range(4) for fraction in ("0", "05", "25", "5", "75", "251", "2499")]
    assert [c for c in candidates if accepts(c)] == [c for c in candidates if 0.5 <= float(c) <= 2.25]
    assert accepts("1") and accepts("2.25") and not accepts("2.2500001") and not accepts("1e0")
    accepts = language(json_schema_gbnf({"type": "number", "exclusiveMinimum": -1.5, "maximum": 0}))
    assert [accepts(t) for t in ("-1.5", "-1.49", "-1", "0", "0.0", "0.01")] == [False, True, True, True, True, False]


def test_all_of_is_merged():
    check(
        {"allOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"]},
            {"properties": {"a": {"maximum": 5}, "b": {"type": "string"}}, "required": ["b"]},
        ]},  # fmt: skip
        ['{"a": 3, "b": "x"}'],
        ['{"a": 3}', '{"b": "x"}', '{"a": 6, "b": "x"}'],
    )


def test_recursive_definitions():
    linked = {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
        }, "required": ["value", "next"]}},  # fmt: skip
        "$ref": "#/$defs/node",
    }
    check(linked, ['{"value": 1, "next": null}', '{"value": 1, "next": {"value": 2, "next": null}}'], ['{"value": 1}'])
    tree = {"type": "object", "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["name", "children"]}
    check(tree, ['{"name": "a", "children": [{"name": "b", "children": []}]}'], ['{"name": "a", "children": [{}]}'])


def test_objects_arrays_strings_and_enums():
    check(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}}, "required": ["b"]},
        ['{"b": "x"}', '{"a": 1, "b": "x"}', '{"b": "x", "c": true}', '{"a": 1, "b": "x", "c": false}'],
        ['{}', '{"a": 1}', '{"b": "x", "a": 1}', '{"b": "x", "d": 1}', '{"a": 1, "b": "x",}'],
    )
    check({"type": "object"}, ['{}', '{"x": [1, {"y": null}]}'], ['[]'])
    check({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, ["[1, 2]", "[1, 2, 3]"], ["[1]", "[1, 2, 3, 4]"])
    check({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
          ['[1, "a"]', "[1]", "[]"], ['["a"]', '[1, "a", 2]'])
    check({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"'], ['"a"', '"abcd"'])
    check({"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, ['"AB-123"'], ['"AB-12"', '"ab-123"'])
    check({"type": "string", "pattern": "abc"}, ['"xabcx"', '"abc"'], ['"ab"'])
    check({"type": "string", "format": "date"}, ['"2024-02-29"'], ['"2024-13-01"'])
    check({"enum": ["red", 1, None]}, ['"red"', "1", "null"], ['"blue"'])
    check({"type": ["string", "null"]}, ['"a"', "null"], ["1"])


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "integer", "minimum": 20, "maximum": 10}, "at least 20 and at most 10"),
        ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "no integer"),
        ({"enum": []}, "has no value"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "types"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}, "requires 'b'"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 exceeds maxLength 2"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
        ({"$ref": "#/$defs/missing"}, "points to nothing"),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ],
)
def test_a_schema_no_value_matches_is_a_400_that_says_why(schema, reason):
    with pytest.raises(InvalidRequestError, match=reason.replace("(", "\\(")) as refused:
        json_schema_gbnf(schema)
    assert refused.value.status == 400 and refused.value.param == "response_format"


FUNCTIONS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city", "unit"]},
    "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
}  # fmt: skip


@pytest.mark.parametrize("tool_format", TOOL_FORMATS, ids=lambda f: f.name)
def test_forced_call_grammars_accept_the_format_and_honour_parallel(tool_format):
    one = tool_format.render_calls([("get_weather", '{"city": "Paris", "unit": "c"}')])
    two = tool_format.render_calls([("get_weather", '{"city": "Paris", "unit": "c", "days": 3}'), ("add", '{"a": 1, "b": 2}')])
    if tool_format is Mistral:  # [TOOL_CALLS] is a special token a grammar cannot force
        one, two = one.removeprefix("[TOOL_CALLS]"), two.removeprefix("[TOOL_CALLS]")
    for parallel in (False, True):
        accepts = language(tool_call_gbnf(ToolSetup(format=tool_format, tools=(), functions=FUNCTIONS, forced=None, parallel=parallel)))
        assert accepts(one)
        assert accepts(two) == parallel
        assert not accepts(one.replace("Paris", "Paris", 1).replace("get_weather", "get_time"))
    days = tool_format.render_calls([("get_weather", '{"city": "Paris", "unit": "c", "days": 9}')])
    if tool_format is Mistral:
        days = days.removeprefix("[TOOL_CALLS]")
    accepts = language(tool_call_gbnf(ToolSetup(format=tool_format, tools=(), functions=FUNCTIONS, forced=None, parallel=True)))
    assert not accepts(days)


def test_a_named_function_forces_that_function():
    accepts = language(tool_call_gbnf(ToolSetup(format=TOOL_FORMATS[-1], tools=(), functions=FUNCTIONS, forced=("add",), parallel=False)))
    assert accepts(TOOL_FORMATS[-1].render_call("add", '{"a": 1, "b": 2}'))
    assert not accepts(TOOL_FORMATS[-1].render_call("get_weather", '{"city": "Paris", "unit": "c"}'))


def test_which_grammar_constrains_a_request():
    def ask(**fields):
        return msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}, ChatCompletionRequest)

    assert output_grammar(ask()) is None
    assert output_grammar(ask(grammar="yesno"), named={"yesno": 'root ::= "yes"'}) == 'root ::= "yes"'
    with pytest.raises(InvalidRequestError, match="not found"):
        output_grammar(ask(grammar="nope"))
    with pytest.raises(InvalidRequestError) as refused:
        output_grammar(ask(grammar='root ::= "a"', response_format={"type": "json_object"}))
    assert refused.value.param == "grammar"
    forced = ToolSetup(format=TOOL_FORMATS[-1], tools=(), functions=FUNCTIONS, forced=("add",), parallel=False)
    with pytest.raises(InvalidRequestError) as refused:
        output_grammar(ask(grammar='root ::= "a"'), forced)
    assert refused.value.param == "tool_choice"
