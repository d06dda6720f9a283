"""Request messages → the messages a chat template renders: one policy for every engine.

- **System and developer messages** are both ``system``. Those at the start are joined
  (a blank line between them) into one system message; a later one stays a system turn
  in its place. For a template without a system role, system text goes in front of the
  next user message.
- **Tools** (when the request uses them): a template that renders ``tools`` gets them
  as its ``tools`` variable; otherwise the tool instructions (the tools as JSON schemas
  and the format to call them in) end the first system message.
- **Past calls** (an assistant message's ``tool_calls``): a template that renders them
  gets them in OpenAI's shape, arguments as an object when it renders objects; otherwise
  they are written into the message's text as the model writes calls.
- **Tool results**: a template that renders ``tool`` messages gets them, with the name
  of the function called; otherwise consecutive results become one user message of
  ``<tool_response>…</tool_response>`` blocks.
- **A last assistant message** without calls is a prefill: the answer continues it.
- **Images** in user messages reach a model that sees images: as a marker in the text the
  engine replaces with the image's tokens, or as ``{"type": "image"}`` content parts for a
  vision-language template. Otherwise image and audio parts are refused (400).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from lllms_core.chat.templates import TemplateCapabilities
from lllms_core.chat.tool_calls import DEFAULT_TOOL_FORMAT
from lllms_core.chat.tools import ToolSetup
from lllms_core.errors import UnsupportedParameterError
from lllms_core.schemas import (
    AssistantMessage,
    ChatMessage,
    DeveloperMessage,
    ImageUrlPart,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
    message_text,
)

NO_TEMPLATE = TemplateCapabilities()
"""What an engine without Jinja templates renders: roles only."""


def _keep(text: str) -> str:
    return text


def _text(message: ChatMessage, index: int) -> str:
    content = message.content
    if isinstance(content, list) and any(not isinstance(part, (TextPart, RefusalPart)) for part in content):
        raise UnsupportedParameterError(
            f"this model reads text only; messages[{index}] has image or audio content", param="messages"
        )
    return message_text(message)


def _user_content(message: UserMessage, index: int, plain: Callable[[str], str], image_marker: str | None,
                  content_parts: bool) -> str | list[dict[str, Any]]:
    """A user message's content: its text, with its images as ``image_marker`` or, for a
    template that takes content parts, as ``{"type": "image"}`` parts in their place."""
    content = message.content
    seeing = image_marker is not None or content_parts
    if isinstance(content, str) or not seeing or not any(isinstance(part, ImageUrlPart) for part in content):
        return plain(_text(message, index))
    if any(not isinstance(part, (TextPart, ImageUrlPart)) for part in content):
        raise UnsupportedParameterError(f"this model reads text and images; messages[{index}] has audio", param="messages")
    if content_parts:
        return [{"type": "image"} if isinstance(part, ImageUrlPart) else {"type": "text", "text": plain(part.text)}
                for part in content]
    return plain(message_text(message, image_marker))


def _as_parts(content: Any) -> list[dict[str, Any]]:
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def _arguments(arguments: str, as_object: bool) -> Any:
    if not as_object:
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(
    messages: list[ChatMessage],
    *,
    capabilities: TemplateCapabilities = NO_TEMPLATE,
    tools: ToolSetup | None = None,
    plain: Callable[[str], str] = _keep,
    plain_value: Callable[[Any], Any] = _keep,
    prefill: bool = True,
    image_marker: str | None = None,
    content_parts: bool = False,
) -> tuple[list[dict[str, Any]], str | None]:
    """The template's messages and the prefill (see the module's policy). ``plain`` and
    ``plain_value`` mark the client's text (:meth:`ChatTemplate.plain`). ``prefill``: a last
    assistant message is a prefill (else a complete turn, as in a preloaded conversation).
    For a model that sees images, a user message's images are ``image_marker`` in its text,
    or with ``content_parts`` (vision-language templates) every content is a list of parts
    and images are ``{"type": "image"}`` parts; else images are refused."""
    tool_format = tools.format if tools is not None else DEFAULT_TOOL_FORMAT
    turns: list[dict[str, Any]] = []
    system: list[str] = []
    call_names: dict[str, str] = {}
    pending_system: list[str] = []  # for a template without a system role: goes into the next user turn
    for index, message in enumerate(messages):
        text = _text(message, index) if not isinstance(message, UserMessage) else ""
        if isinstance(message, (SystemMessage, DeveloperMessage)):
            if not turns:
                system.append(plain(text))
            elif capabilities.system_role:
                turns.append({"role": "system", "content": plain(text)})
            else:
                pending_system.append(plain(text))
        elif isinstance(message, AssistantMessage):
            calls = message.tool_calls or []
            for call in calls:
                call_names[call.id] = call.function.name
            if calls and capabilities.tool_calls:
                turns.append({
                    "role": "assistant",
                    "content": plain(text),
                    "tool_calls": [
                        {"id": plain(call.id), "type": "function", "function": {
                            "name": plain(call.function.name),
                            "arguments": plain_value(_arguments(call.function.arguments, capabilities.object_arguments)),
                        }}
                        for call in calls
                    ],
                })  # fmt: skip
            else:
                written = tool_format.render_calls((call.function.name, call.function.arguments) for call in calls)
                turns.append({"role": "assistant", "content": "\n".join(filter(None, [plain(text), plain(written) if calls else ""]))})
        elif isinstance(message, ToolMessage):
            if capabilities.tool_responses:
                turns.append({"role": "tool", "content": plain(text), "tool_call_id": plain(message.tool_call_id),
                              "name": plain(call_names.get(message.tool_call_id, ""))})
                continue
            block = f"<tool_response>\n{plain(text)}\n</tool_response>"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool_results": True})
        else:
            content = _user_content(message, index, plain, image_marker, content_parts)
            if pending_system:
                content = [{"type": "text", "text": "\n\n".join(pending_system)}, *content] if isinstance(content, list) \
                    else "\n\n".join([*pending_system, content])
                pending_system = []
            turns.append({"role": "user", "content": content})
    if tools is not None and not capabilities.tools:
        system.append(tools.instructions(plain))
    continued = None
    last = messages[-1]
    if prefill and isinstance(last, AssistantMessage) and not last.tool_calls:
        continued = turns.pop()["content"]
    for turn in turns:
        turn.pop("tool_results", None)
    if system:
        if capabilities.system_role:
            turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
        else:
            first_user = next((turn for turn in turns if turn["role"] == "user"), None)
            if first_user is None:
                turns.insert(0, {"role": "user", "content": "\n\n".join(system)})
            elif isinstance(first_user["content"], list):
                first_user["content"] = [{"type": "text", "text": "\n\n".join(system)}, *first_user["content"]]
            else:
                first_user["content"] = "\n\n".join([*system, first_user["content"]])
    if content_parts:
        turns = [dict(turn, content=_as_parts(turn["content"])) for turn in turns]
    return turns, continued


def config_messages(messages: list[Any]) -> list[ChatMessage]:
    """A model's ``initial_messages`` (role and content) as request messages."""
    import msgspec

    return msgspec.convert([{"role": message.role, "content": message.content} for message in messages], list[ChatMessage])
