"""The tool-call parsers: what a streaming client receives, however the model's text is cut.

Formats no packaged model writes (Llama 3, Mistral, Qwen3-Coder) are fed text as such a
model writes it; every test feeds its text split at every position."""

from __future__ import annotations

import json
import re

import pytest

from lllms_core.chat import TOOL_FORMATS, CompletionOutput, Hermes, Llama3, Mistral, QwenCoder, ToolSetup, tool_format_for

FUNCTIONS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
    "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
}
PARIS = '{"city": "Paris", "days": 3}'
ROME = '{"city": "Rome \\"eternal\\" \\u00e9", "days": 1}'


def setup(tool_format, parallel: bool = True) -> ToolSetup:
    return ToolSetup(format=tool_format, tools=(), functions=FUNCTIONS, forced=None, parallel=parallel)


def feed(tool_format, pieces: list[str], parallel: bool = True):
    """Feed the pieces to a parser; return content, the calls as a client accumulates them,
    whether the list ended, and every argument prefix a client held on the way."""
    parser = setup(tool_format, parallel).parser()
    content, calls, prefixes = "", [], []
    for piece in [*pieces, None]:
        text, deltas = parser.push(piece) if piece is not None else parser.finish()
        content += text
        for delta in deltas:
            if delta.id is not None:
                assert delta.index == len(calls), "a call's first delta comes once, in order"
                assert delta.name in FUNCTIONS and delta.arguments == ""
                calls.append({"id": delta.id, "name": delta.name, "arguments": ""})
            else:
                assert delta.name is None and delta.index == len(calls) - 1
                calls[delta.index]["arguments"] += delta.arguments
                prefixes.append(calls[delta.index]["arguments"])
    return content, calls, parser.ended, prefixes


def every_cut(tool_format, text: str, parallel: bool = True):
    """The result of feeding ``text`` whole, checked to be the same for every cut into two
    pieces and for one character at a time; with the argument prefixes of the latter (each
    checked to close into valid JSON)."""
    whole = feed(tool_format, [text], parallel)
    for cut in range(1, len(text)):
        assert strip_ids(feed(tool_format, [text[:cut], text[cut:]], parallel)) == strip_ids(whole), cut
    one_by_one = feed(tool_format, list(text), parallel)
    assert strip_ids(one_by_one) == strip_ids(whole)
    for prefix in one_by_one[3]:
        closes_into_json(prefix)
    return (*whole[:3], one_by_one[3])


def strip_ids(result):
    content, calls, ended, _ = result
    return content, [(call["name"], call["arguments"]) for call in calls], ended


def closes_into_json(prefix: str) -> None:
    """A streamed prefix of arguments is a prefix of JSON that closing brackets complete."""
    stack, in_string, escape = [], False, False
    for character in prefix:
        if escape:
            escape = False
        elif in_string:
            escape, in_string = character == "\\", character != '"'
        elif character == '"':
            in_string = True
        elif character in "{[":
            stack.append("}" if character == "{" else "]")
        elif character in "}]":
            stack.pop()
    closing = ('"' if in_string else "") + "".join(reversed(stack))
    json.loads(prefix + closing)


def arguments(calls) -> list[tuple[str, dict]]:
    return [(call["name"], json.loads(call["arguments"])) for call in calls]


HERMES_CALL = Hermes.render_call("get_weather", PARIS)


def test_hermes_content_then_two_calls():
    text = "Let me check.\n" + HERMES_CALL + "\n" + Hermes.render_call("get_weather", ROME)
    content, calls, ended, prefixes = every_cut(Hermes, text)
    assert content == "Let me check.\n"
    assert arguments(calls) == [("get_weather", json.loads(PARIS)), ("get_weather", json.loads(ROME))]
    assert ended and len(prefixes) > 4  # arguments arrive in pieces
    assert len({call["id"] for call in calls}) == 2 and all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls)


def test_content_streams_before_the_end_and_only_a_possible_marker_is_held():
    parser = setup(Hermes).parser()
    assert parser.push("The answer is 4 <")[0] == "The answer is 4 "
    assert parser.push("3 and <tool")[0] == "<3 and "
    assert parser.push("s>")[0] == "<tools>"


def test_a_repeated_call_ends_the_list_and_is_not_sent():
    content, calls, ended, _ = every_cut(Hermes, HERMES_CALL + "\n" + HERMES_CALL + "\n" + HERMES_CALL)
    assert arguments(calls) == [("get_weather", json.loads(PARIS))]
    assert ended and content == ""


def test_without_parallel_calls_the_first_call_ends_the_list():
    text = HERMES_CALL + "\n" + Hermes.render_call("add", '{"a": 1, "b": 2}')
    _, calls, ended, _ = every_cut(Hermes, text, parallel=False)
    assert [call["name"] for call in calls] == ["get_weather"] and ended


def test_text_after_the_calls_ends_the_list():
    _, calls, ended, _ = every_cut(Hermes, HERMES_CALL + "\nI hope this helps! " + HERMES_CALL)
    assert len(calls) == 1 and ended


def test_unknown_functions_and_text_that_only_looks_like_a_call_stay_text():
    unknown = '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>'
    assert every_cut(Hermes, "1 < 2 and " + unknown)[:2] == ("1 < 2 and " + unknown, [])
    broken = "<tool_call> not JSON at all"
    assert every_cut(Hermes, broken)[:2] == (broken, [])


def test_keys_in_another_order_and_arguments_as_a_json_string():
    text = '<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>'
    assert arguments(every_cut(Hermes, text)[1]) == [("add", {"a": 1, "b": 2})]
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert arguments(every_cut(Hermes, text)[1]) == [("add", {"a": 1})]


def test_a_call_cut_by_the_token_limit_is_closed_into_valid_json():
    content, calls, _, _ = every_cut(Hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert arguments(calls) == [("get_weather", {"city": "Par"})]
    _, calls, _, _ = every_cut(Hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "da')
    assert arguments(calls) == [("get_weather", {"city": "Paris"})]
    _, calls, _, _ = every_cut(Hermes, HERMES_CALL.removesuffix("\n</tool_call>"))  # no closing tag
    assert arguments(calls) == [("get_weather", json.loads(PARIS))]


def test_llama3_json_calls_bare_and_after_the_python_tag():
    call = '{"name": "get_weather", "parameters": ' + PARIS + "}"
    assert arguments(every_cut(Llama3, call)[1]) == [("get_weather", json.loads(PARIS))]
    content, calls, _, _ = every_cut(Llama3, "<|python_tag|>" + call + "; " + call.replace("Paris", "Oslo"))
    assert content == "" and [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Oslo"]
    assert every_cut(Llama3, ' {"answer": 42}')[:2] == (' {"answer": 42}', [])  # JSON, not a call
    assert every_cut(Llama3, 'Here: {"name": "get_weather"}')[1] == []  # a call starts the answer


def test_mistral_calls_as_a_list_and_with_args_markers():
    listed = '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + PARIS + '}, {"name": "add", "arguments": {"a": 1}}]'
    content, calls, ended, _ = every_cut(Mistral, listed)
    assert arguments(calls) == [("get_weather", json.loads(PARIS)), ("add", {"a": 1})] and ended
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) for call in calls)  # as Mistral's templates require
    # [TOOL_CALLS] is a control token a backend may not show
    assert arguments(every_cut(Mistral, listed.removeprefix("[TOOL_CALLS]"))[1]) == arguments(calls)
    marked = "[TOOL_CALLS]get_weather[ARGS]" + PARIS + '[TOOL_CALLS]add[ARGS]{"b": 2}'
    assert arguments(every_cut(Mistral, marked)[1]) == [("get_weather", json.loads(PARIS)), ("add", {"b": 2})]
    assert every_cut(Mistral, "[1, 2, 3]")[:2] == ("[1, 2, 3]", [])


def test_qwen3_coder_xml_calls_become_json_arguments_by_the_schema():
    text = (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis \"<b>\" à\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    content, calls, _, prefixes = every_cut(QwenCoder, text)
    assert content == "Checking.\n"
    assert arguments(calls) == [("get_weather", {"city": 'Paris "<b>" à', "days": 3})]
    assert len(prefixes) > 3
    assert arguments(every_cut(QwenCoder, "<tool_call>\n<function=add>\n</function>\n</tool_call>")[1]) == [("add", {})]
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    assert arguments(every_cut(QwenCoder, cut)[1]) == [("get_weather", {"city": "Par"})]


@pytest.mark.parametrize("tool_format", TOOL_FORMATS, ids=lambda f: f.name)
def test_each_format_reads_the_calls_it_writes(tool_format):
    written = tool_format.render_calls([("get_weather", PARIS), ("add", '{"a": 1, "b": 2}')])
    _, calls, ended, _ = every_cut(tool_format, written)
    assert arguments(calls) == [("get_weather", json.loads(PARIS)), ("add", {"a": 1, "b": 2})] and ended


TEMPLATES = {
    "hermes": "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.tool_calls %}<tool_call>{% endif %}{% endfor %}</tool_call>",
    "llama3": "<|start_header_id|>{{ m }}<|eot_id|>{% if tools %}{{ tools }}{% endif %}<|python_tag|>",
    "mistral": "[INST]{{ m }}[/INST][TOOL_CALLS]{{ tool_calls }}",
    "qwen3_coder": "<tool_call>\n<function={{ name }}>\n<parameter={{ key }}>\n</parameter></function></tool_call>",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_format_is_chosen_from_the_chat_template(name):
    assert tool_format_for(TEMPLATES[name]).name == name


def test_a_template_without_a_format_gets_hermes():
    assert tool_format_for("{% for m in messages %}{{ m.content }}{% endfor %}") is Hermes
    assert tool_format_for(None) is Hermes


def test_the_output_applies_stop_strings_before_tool_calls():
    output = CompletionOutput(["STOP"], setup(Hermes))
    piece, ended = output.push("Sure. ST")
    assert piece.text == "Sure. " and not ended
    piece, ended = output.push("OP " + HERMES_CALL)
    assert ended and not piece.tool_calls and output.finish_reason("stop") == "stop"
    output = CompletionOutput([], setup(Hermes, parallel=False))
    piece, ended = output.push(HERMES_CALL + "\n" + HERMES_CALL)
    assert ended and len([d for d in piece.tool_calls if d.id]) == 1
    assert output.finish_reason("stop") == "tool_calls" and output.finish_reason("length") == "length"


def test_a_primer_starts_a_forced_call_the_model_did_not_write():
    # an engine without grammars starts the answer with the call; the model writes the rest
    output = CompletionOutput([], setup(Hermes, parallel=False), primer=Hermes.call_text("get_weather")[0] + "{")
    piece, ended = output.push('"city": "Paris"}}\n</tool_call>')
    assert not piece.text and ended and output.finish_reason("stop") == "tool_calls"
    assert piece.tool_calls[0].id and piece.tool_calls[0].name == "get_weather"
    assert json.loads("".join(delta.arguments for delta in piece.tool_calls)) == {"city": "Paris"}
