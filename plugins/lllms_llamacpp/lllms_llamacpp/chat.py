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

from lllms_core.plugin_api import (
    AssistantMessage,
    ChatMessage,
    DeveloperMessage,
    InvalidRequestError,
    ModelLoadError,
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
        try:
            self.template = environment.from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ModelLoadError(f"the chat template does not compile: {error}") from None
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
    messages: list[ChatMessage], template: ChatTemplate, tools: list[dict] | None, image_marker: str | None = None
) -> tuple[list[dict], str | None]:
    """Messages as the template's dicts, and the assistant prefill (the text of a last
    assistant message, which the answer continues). With ``image_marker``, a user message's
    images are that text, in their place.

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
            turns.append({"role": "user", "content": message_text(message, image_marker)})
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


CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*')
CALL_END = re.compile(r"\}\s*" + re.escape(TOOL_CALL_CLOSE))
HEADER_LIMIT = 200
"""Characters after ``<tool_call>`` within which a call must name its function."""
ARGUMENTS_HOLD = 32
"""Characters of arguments held back while streaming: the call's end may be among them."""


def _split_marker(text: str) -> tuple[str, str | None]:
    """Text before ``<tool_call>`` and the rest from it (None: no marker; a partial
    marker at the end stays in the first part's tail for the caller to hold back)."""
    position = text.find(TOOL_CALL_OPEN)
    return (text, None) if position == -1 else (text[:position], text[position:])


def _marker_tail(text: str) -> int:
    """How many trailing characters may be the start of ``<tool_call>``."""
    for length in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(TOOL_CALL_OPEN[:length]):
            return length
    return 0


class ToolCallParser:
    """Splits generated text into content and Hermes-style tool calls, as it streams.

    Content streams until ``<tool_call>`` (a partial marker is held back). A call of a
    known function written as ``{"name": ..., "arguments": ...}`` streams: one delta with
    its id and name, then pieces of its arguments' JSON text. A block in another shape
    is parsed when generation ends; what does not parse as calls stays text.
    """

    def __init__(self, known: set[str]):
        self.known = known
        self.state = "text"
        self.buffer = ""
        self.calls = 0
        self.sent = ""
        """The arguments text of the current call sent so far."""
        self.trailing = ""
        self.unparsed: str | None = None

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content to emit now, and tool-call deltas."""
        if self.unparsed is not None:
            self.unparsed += text
            return "", []
        self.buffer += text
        content, deltas = "", []
        while True:
            if self.state == "text":
                before, rest = _split_marker(self.buffer)
                if rest is None:
                    keep = _marker_tail(before)
                    content += before[: len(before) - keep]
                    self.buffer = before[len(before) - keep :]
                    return content, deltas
                content += before
                self.buffer = rest[len(TOOL_CALL_OPEN) :]
                self.state = "header"
            elif self.state == "header":
                match = CALL_HEADER.match(self.buffer)
                if match is not None and match.end() == len(self.buffer):
                    return content, deltas  # more whitespace may follow before the arguments
                if match is None or match.group(1) not in self.known:
                    if match is not None or len(self.buffer) > HEADER_LIMIT:
                        self.unparsed = TOOL_CALL_OPEN + self.buffer
                        self.buffer = ""
                    return content, deltas
                deltas.append(ToolCallDelta(index=self.calls, id=f"call_{secrets.token_hex(12)}", name=match.group(1)))
                self.buffer = self.buffer[match.end() :]
                self.sent = ""
                self.state = "arguments"
            elif self.state == "arguments":
                end = CALL_END.search(self.buffer)
                if end is None:
                    ready = len(self.buffer) - ARGUMENTS_HOLD
                    if ready > 0:
                        deltas.append(ToolCallDelta(index=self.calls, arguments=self.buffer[:ready]))
                        self.sent += self.buffer[:ready]
                        self.buffer = self.buffer[ready:]
                    return content, deltas
                arguments = self.buffer[: end.start()].rstrip()
                if arguments:
                    deltas.append(ToolCallDelta(index=self.calls, arguments=arguments))
                self.buffer = self.buffer[end.end() :]
                self.calls += 1
                self.state = "between"
            else:  # between calls: whitespace, another call, or text after the calls
                stripped = self.buffer.lstrip()
                if not stripped:
                    return content, deltas
                if TOOL_CALL_OPEN.startswith(stripped[: len(TOOL_CALL_OPEN)]):
                    if len(stripped) < len(TOOL_CALL_OPEN):
                        return content, deltas
                    self.buffer = stripped
                    self.state = "text"
                else:
                    self.trailing += self.buffer
                    self.buffer = ""
                    return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What is left when generation ends: text, and the deltas of calls not yet sent."""
        if self.unparsed is not None:
            return self._parse_unparsed()
        if self.state == "text":
            text, self.buffer = self.buffer, ""
            return text, []
        if self.state == "header":  # a marker that never named a function
            self.unparsed, self.buffer = TOOL_CALL_OPEN + self.buffer, ""
            return self._parse_unparsed()
        deltas = []
        if self.state == "arguments":  # ended without </tool_call>: drop the call's closing brace
            whole = (self.sent + self.buffer).rstrip()
            if whole.endswith("}") and _is_json(whole[:-1]):
                whole = whole[:-1].rstrip()
            rest = whole[len(self.sent) :]
            if rest:
                deltas.append(ToolCallDelta(index=self.calls, arguments=rest))
            self.calls += 1
        self.buffer = ""
        return self.trailing.strip(), deltas

    @property
    def called(self) -> bool:
        return self.calls > 0

    def _parse_unparsed(self) -> tuple[str, list[ToolCallDelta]]:
        deltas: list[ToolCallDelta] = []
        for body in _call_bodies(self.unparsed):
            try:
                call = json.loads(body)
            except ValueError:
                break
            if not isinstance(call, dict) or call.get("name") not in self.known:
                break
            arguments = call.get("arguments", call.get("parameters", {}))
            deltas.append(ToolCallDelta(index=self.calls, id=f"call_{secrets.token_hex(12)}", name=call["name"]))
            deltas.append(ToolCallDelta(index=self.calls, arguments=json.dumps(arguments, ensure_ascii=False)))
            self.calls += 1
        if not deltas:
            return self.unparsed, []
        return "", deltas


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _call_bodies(text: str) -> list[str]:
    bodies = []
    for match in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", text, re.S):
        body = match.group(1).strip()
        if body:
            bodies.append(body)
    return bodies
