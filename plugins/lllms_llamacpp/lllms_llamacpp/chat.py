"""Chat prompts: the model's own Jinja chat template, tools, and tool-call parsing.

Tool calls use the Hermes format, whatever the template: the model writes
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks. When the
template knows tools, it gets them (``tools`` variable); otherwise the tool
definitions go into the system prompt and tool results into a user message, as
``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import Any

import msgspec

from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import (
    AssistantMessage,
    ChatMessage,
    DeveloperMessage,
    SystemMessage,
    Tool,
    ToolCallDelta,
    ToolMessage,
    message_text,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TOOLS_SYSTEM_PROMPT = """You may call one or more functions to answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, reply with one block per call, each a JSON object with the function's name and arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments>}}}}
</tool_call>"""


def _raise(message: str) -> None:
    raise InvalidRequestError(f"the chat template refused the messages: {message}", param="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class ChatTemplate:
    """A compiled chat template and how the model's tokens frame a prompt."""

    def __init__(self, source: str | None, *, bos_token: str, eos_token: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        environment.filters["tojson"] = _tojson
        self.source = source or CHATML_TEMPLATE
        self.template = environment.from_string(self.source)
        self.knows_tools = "tools" in self.source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], *, tools: list[dict] | None, add_generation_prompt: bool) -> str:
        import jinja2

        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            variables["tools"] = tools
        try:
            return self.template.render(**variables)
        except InvalidRequestError:
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                # templates without a system role (Gemma...): put the system text in the first turn
                merged = dict(messages[1], content=f"{messages[0]['content']}\n\n{messages[1]['content']}")
                return self.render([merged, *messages[2:]], tools=tools, add_generation_prompt=add_generation_prompt)
            raise
        except jinja2.TemplateError as error:
            raise InvalidRequestError(f"the model's chat template failed: {error}", param="messages") from None


def tool_definitions(tools: list[Tool]) -> list[dict]:
    return [msgspec.to_builtins(tool) for tool in tools]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _tool_call_block(name: str, arguments: str) -> str:
    payload = json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


def prepare_messages(
    messages: list[ChatMessage], template: ChatTemplate, tools: list[dict] | None
) -> tuple[list[dict], str | None]:
    """Messages as the template's dicts, and the assistant prefill (the text of a last
    assistant message, which the answer continues).

    System and developer messages are merged, in order, into one system message first.
    """
    system_parts: list[str] = []
    turns: list[dict] = []
    call_names: dict[str, str] = {}
    for message in messages:
        if isinstance(message, (SystemMessage, DeveloperMessage)):
            system_parts.append(message_text(message))
        elif isinstance(message, AssistantMessage):
            text = message_text(message)
            calls = message.tool_calls or []
            for call in calls:
                call_names[call.id] = call.function.name
            if template.knows_tools and calls:
                turns.append(
                    {
                        "role": "assistant",
                        "content": text,
                        "tool_calls": [
                            {
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                            }
                            for call in calls
                        ],
                    }
                )
            else:
                blocks = [_tool_call_block(call.function.name, call.function.arguments) for call in calls]
                turns.append({"role": "assistant", "content": "\n".join(filter(None, [text, *blocks]))})
        elif isinstance(message, ToolMessage):
            text = message_text(message)
            if template.knows_tools:
                turns.append(
                    {"role": "tool", "content": text, "tool_call_id": message.tool_call_id,
                     "name": call_names.get(message.tool_call_id, "")}
                )
                continue
            block = f"<tool_response>\n{text}\n</tool_response>"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool_results": True})
        else:
            turns.append({"role": "user", "content": message_text(message)})
    if tools and not template.knows_tools:
        system_parts.append(TOOLS_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools)))
    prefill = None
    last = messages[-1]
    if isinstance(last, AssistantMessage) and not last.tool_calls:
        prefill = turns.pop()["content"]
    for turn in turns:
        turn.pop("tool_results", None)
    if system_parts:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system_parts)})
    return turns, prefill


class ToolCallParser:
    """Splits generated text into content and Hermes-style tool calls.

    Text is streamed until ``<tool_call>`` appears (a partial marker is held back);
    what follows is parsed when generation ends.
    """

    def __init__(self) -> None:
        self.pending = ""
        self.calls_text: str | None = None

    def push(self, text: str) -> str:
        if self.calls_text is not None:
            self.calls_text += text
            return ""
        self.pending += text
        position = self.pending.find(TOOL_CALL_OPEN)
        if position != -1:
            emitted, self.calls_text = self.pending[:position], self.pending[position:]
            self.pending = ""
            return emitted
        keep = 0
        for length in range(min(len(TOOL_CALL_OPEN) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(TOOL_CALL_OPEN[:length]):
                keep = length
                break
        emitted = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return emitted

    def finish(self, known: set[str]) -> tuple[str, list[ToolCallDelta]]:
        """Leftover text and the calls' deltas (first carries id and name, then the arguments).
        Text that does not parse as calls of known functions is returned as text."""
        if self.calls_text is None:
            text, self.pending = self.pending, ""
            return text, []
        deltas: list[ToolCallDelta] = []
        for number, body in enumerate(_call_bodies(self.calls_text)):
            try:
                call = json.loads(body)
            except ValueError:
                break
            if not isinstance(call, dict) or call.get("name") not in known:
                break
            arguments = call.get("arguments", call.get("parameters", {}))
            deltas.append(ToolCallDelta(index=number, id=f"call_{secrets.token_hex(12)}", name=call["name"]))
            deltas.append(ToolCallDelta(index=number, arguments=json.dumps(arguments, ensure_ascii=False)))
        if not deltas:
            return self.calls_text, []
        return "", deltas


def _call_bodies(text: str) -> list[str]:
    bodies = []
    for match in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", text, re.S):
        body = match.group(1).strip()
        if body:
            bodies.append(body)
    return bodies
