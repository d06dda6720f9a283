"""Splitting a generated stream into content and tool calls, whatever the token boundaries."""

from __future__ import annotations

import json

import pytest

from lllms_transformers.structured import ToolCallOutput

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": {"from": 1}}}\n</tool_call>'
SECOND = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def run(text: str, size: int, stops=()):
    output = ToolCallOutput(list(stops))
    content, deltas = "", []
    for start in range(0, len(text), size):
        piece, calls = output.feed(text[start : start + size])
        content += piece
        deltas += calls
    piece, calls = output.finish()
    return output, content + piece, deltas


def calls_of(deltas):
    calls = []
    for delta in deltas:
        if delta.index == len(calls):
            assert delta.id and delta.name
            calls.append([delta.name, ""])
        else:
            assert not delta.id and not delta.name
        calls[delta.index][1] += delta.arguments
    return [(name, json.loads(arguments)) for name, arguments in calls]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_content_then_two_calls(size):
    output, content, deltas = run("Let me check. " + CALL + "\n" + SECOND, size)
    assert content == "Let me check. "
    assert calls_of(deltas) == [("get_weather", {"city": "Paris", "days": {"from": 1}}), ("get_time", {})]
    assert output.called_tools


@pytest.mark.parametrize("size", [1, 4])
def test_text_that_only_looks_like_a_call_start_is_content(size):
    output, content, deltas = run("a <tool and <tool_c", size)
    assert content == "a <tool and <tool_c" and not deltas and not output.called_tools


def test_stop_strings_apply_to_content_not_arguments():
    output, content, deltas = run("Sure. STOP " + CALL, 3, stops=["STOP"])
    assert content == "Sure. " and output.stopped
