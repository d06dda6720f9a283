"""The Hermes tool-call parser on its own: what a streaming client receives."""

from __future__ import annotations

import json

import pytest

from lllms_llamacpp.chat import ToolCallParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def run(text: str, step: int) -> tuple[str, list[dict], int]:
    """Feed ``text`` in pieces of ``step`` characters; return content, calls, argument deltas."""
    parser = ToolCallParser({"get_weather", "add"})
    content, deltas = "", []
    for start in range(0, len(text), step):
        piece, new = parser.push(text[start : start + step])
        content += piece
        deltas += new
    piece, new = parser.finish()
    content += piece
    deltas += new
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, {"name": None, "arguments": ""})
        if delta.id:
            call["name"] = delta.name
        call["arguments"] += delta.arguments
    return content, [calls[i] for i in sorted(calls)], sum(1 for d in deltas if d.arguments)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_stream_the_same_however_the_text_is_cut(step):
    content, calls, _ = run("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"), step)
    assert content == "Let me check.\n"
    assert [json.loads(call["arguments"])["city"] for call in calls] == ["Paris", "Rome"]
    assert all(call["name"] == "get_weather" for call in calls)
    assert all(call["arguments"].startswith("{") for call in calls)


def test_arguments_arrive_in_pieces_while_generating():
    long_call = CALL.replace("Paris", "Paris, the capital city of France on the Seine")
    _, [call], pieces = run(long_call, 1)
    assert pieces >= 2
    assert json.loads(call["arguments"])["city"].startswith("Paris, the capital")


def test_a_call_without_its_closing_tag():
    _, [call], _ = run(CALL.removesuffix("\n</tool_call>"), 2)
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_other_key_order_is_parsed_at_the_end():
    text = '<tool_call>{"arguments": {"a": 1, "b": 2}, "name": "add"}</tool_call>'
    content, [call], _ = run(text, 4)
    assert content == "" and call["name"] == "add" and json.loads(call["arguments"]) == {"a": 1, "b": 2}


def test_unknown_functions_and_plain_text_stay_text():
    assert run("No tools needed: 1 < 2.", 1)[:2] == ("No tools needed: 1 < 2.", [])
    unknown = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    assert run(unknown, 5)[:2] == (unknown, [])
