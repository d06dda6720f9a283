"""Grammars, JSON output and tool calls: constrained output a 135M model gets right."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import (
    AssistantMessage,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    Tool,
    ToolCall,
    ToolMessage,
    UserMessage,
)

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    Tool(function=FunctionDefinition(name="get_weather", description="Current weather in a city", parameters=WEATHER_PARAMETERS)),
    Tool(
        function=FunctionDefinition(
            name="add",
            description="Add two integers",
            parameters={
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        )
    ),
]
WEATHER_QUESTION = [UserMessage(content="What is the weather in Paris?")]


def exactly(text: str) -> str:
    """A grammar whose only sentence is ``text``."""
    return f"root ::= {json.dumps(text)}"


def tool_calls(chunks) -> list[dict]:
    """Accumulate ToolCallDeltas as a client does."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id:
                assert call["id"] is None, "id comes once, in the first delta"
                call["id"], call["name"] = delta.id, delta.name
            call["arguments"] += delta.arguments
    return [calls[index] for index in sorted(calls)]


async def test_gbnf_grammar_constrains_the_answer(smol):
    text, _, result = await smol.chat(
        messages=[UserMessage(content="Is the sky green? Answer yes or no.")], grammar='root ::= "yes" | "no"'
    )
    assert text in ("yes", "no")
    assert result.finish_reasons == ["stop"]


async def test_named_grammar_from_the_model_options(smol):
    text, _, _ = await smol.chat(messages=[UserMessage(content="Is water wet?")], grammar="yesno")
    assert text in ("yes", "no")


async def test_invalid_grammar_is_a_400_and_the_instance_keeps_working(smol):
    with pytest.raises(InvalidRequestError) as caught:
        await smol.chat(messages=WEATHER_QUESTION, grammar="root ::= (")
    assert caught.value.param == "grammar"
    with pytest.raises(InvalidRequestError, match="not found"):
        await smol.chat(messages=WEATHER_QUESTION, grammar="no-such-grammar")
    text, _, _ = await smol.chat(messages=[UserMessage(content="Say hello.")], max_tokens=3)
    assert text


async def test_json_object_output_parses(smol):
    text, _, result = await smol.chat(
        messages=[UserMessage(content="Describe a cat as JSON.")],
        response_format=ResponseFormatJsonObject(),
        max_tokens=60,
    )
    if result.finish_reasons == ["stop"]:
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


async def test_json_schema_output_matches_the_schema(smol):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": False,
    }
    text, _, result = await smol.chat(
        messages=[UserMessage(content="Invent a person with a name, an age and pets.")],
        response_format=ResponseFormatJsonSchema(json_schema=JsonSchemaFormat(name="person", schema=schema)),
        max_tokens=80,
    )
    assert result.finish_reasons == ["stop"], text
    jsonschema.validate(json.loads(text), schema)


async def test_tool_choice_required_calls_a_tool_with_valid_arguments(smol):
    _, chunks, result = await smol.chat(
        messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60
    )
    assert result.finish_reasons == ["tool_calls"]
    [call] = tool_calls(chunks)
    assert call["id"].startswith("call_")
    schema = {tool.function.name: tool.function.parameters for tool in TOOLS}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), schema)
    assert not "".join(chunk.text for chunk in chunks).strip()


async def test_named_tool_choice_calls_that_tool(smol):
    _, chunks, result = await smol.chat(
        messages=[UserMessage(content="What is two plus three?")],
        tools=TOOLS,
        tool_choice=NamedToolChoice(function=NamedFunction(name="add")),
        max_tokens=40,
    )
    assert result.finish_reasons == ["tool_calls"]
    [call] = tool_calls(chunks)
    assert call["name"] == "add"
    arguments = json.loads(call["arguments"])
    assert isinstance(arguments["a"], int) and isinstance(arguments["b"], int)


async def test_unknown_named_tool_is_refused(smol):
    with pytest.raises(InvalidRequestError) as caught:
        await smol.chat(
            messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=NamedToolChoice(function=NamedFunction(name="nope"))
        )
    assert caught.value.param == "tool_choice"


async def test_auto_mode_turns_hermes_blocks_into_tool_calls(smol):
    # a grammar makes the model write what a capable model writes on its own in auto mode
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    _, chunks, result = await smol.chat(
        messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="auto", grammar=exactly(written), max_tokens=60
    )
    assert result.finish_reasons == ["tool_calls"]
    [call] = tool_calls(chunks)
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert "<tool_call>" not in "".join(chunk.text for chunk in chunks)


async def test_auto_mode_answers_in_text_when_no_call_is_written(smol):
    text, chunks, result = await smol.chat(
        messages=[UserMessage(content="Say hello.")], tools=TOOLS, tool_choice="auto", grammar='root ::= "Hello there!"'
    )
    assert text == "Hello there!"
    assert result.finish_reasons == ["stop"]
    assert not tool_calls(chunks)


async def test_tool_choice_none_never_calls(smol):
    written = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    text, chunks, result = await smol.chat(
        messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="none", grammar=exactly(written), max_tokens=60
    )
    assert result.finish_reasons == ["stop"]
    assert not tool_calls(chunks)
    assert text.startswith("<tool_call>")


async def test_parallel_tool_calls(smol):
    written = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>'
    )
    _, chunks, result = await smol.chat(
        messages=WEATHER_QUESTION, tools=TOOLS, grammar=exactly(written), max_tokens=90
    )
    calls = tool_calls(chunks)
    assert [json.loads(call["arguments"])["city"] for call in calls] == ["Paris", "Rome"]
    assert len({call["id"] for call in calls}) == 2


async def test_tool_round_trip(smol):
    messages = [
        *WEATHER_QUESTION,
        AssistantMessage(
            content=None,
            tool_calls=[
                ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}'))
            ],
        ),
        ToolMessage(tool_call_id="call_1", content='{"temperature": 18, "sky": "sunny"}'),
    ]
    text, chunks, result = await smol.chat(messages=messages, tools=TOOLS, max_tokens=30)
    assert not tool_calls(chunks)
    assert "18" in text or "sunny" in text.lower()
