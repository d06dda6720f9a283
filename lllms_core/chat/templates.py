"""Chat templates: a model's Jinja template, rendered once here for every engine.

The environment is the one Hugging Face templates are written for: sandboxed Jinja
with ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` filter that keeps non-ASCII text, and a no-op
``{% generation %}`` block. What a template can do (tools, past calls, tool results,
a system role) is found once by rendering probe conversations, as llama.cpp's
``common/chat`` does, and the tool-call format from its text.

Rendering also says which spans of the prompt are the client's text (message
contents, tool definitions, past calls' names and arguments): an engine tokenizes
those as plain text, so text that spells a special token (``<|im_start|>``) stays
text and a message cannot forge a turn. Client text that spells a special token is
wrapped in two noncharacters before rendering and found by them afterwards.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable

import msgspec

from lllms_core.chat.tool_calls import ToolFormat, tool_format_for
from lllms_core.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from lllms_core.chat.tools import ToolSetup
    from lllms_core.schemas import ChatMessage

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The template of a model that has none."""

PLAIN_OPEN = "\ufdd0"
PLAIN_CLOSE = "\ufdd1"


class TemplateError(Exception):
    """A template refused what it was given (``raise_exception``)."""


class TemplateCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a chat template renders (found by probing it)."""

    system_role: bool = True
    tools: bool = False
    """It renders the ``tools`` variable."""
    tool_calls: bool = False
    """It renders an assistant message's ``tool_calls``."""
    tool_responses: bool = False
    """It renders ``tool`` messages."""
    object_arguments: bool = True
    """Past calls' arguments are given as objects (most templates ``tojson`` them); else as JSON text."""


class RenderedPrompt(msgspec.Struct, frozen=True):
    """A rendered prompt and the spans (start, end) of it that are the client's text."""

    text: str
    plain_spans: tuple[tuple[int, int], ...] = ()

    def pieces(self) -> list[tuple[str, bool]]:
        """The prompt as (text, parse_special) pieces, in order: the template's text may
        hold special tokens, the client's never does."""
        pieces, position = [], 0
        for start, end in self.plain_spans:
            if start > position:
                pieces.append((self.text[position:start], True))
            pieces.append((self.text[start:end], False))
            position = end
        if position < len(self.text) or not pieces:
            pieces.append((self.text[position:], True))
        return pieces


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators=None, sort_keys: bool = False) -> str:
    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    if ensure_ascii:  # keep the plain-text marks findable
        text = text.replace("\\ufdd0", PLAIN_OPEN).replace("\\ufdd1", PLAIN_CLOSE)
    return text


def _raise(message: str) -> None:
    raise TemplateError(message)


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}`` (marks assistant text in HF templates): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols], loader=jinja2.BaseLoader()
    )
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    environment.filters["tojson"] = _tojson
    return environment


class ChatTemplate:
    """A compiled chat template.

    ``special_tokens``: the texts the model's tokenizer turns into special tokens (the
    client's text that spells one is marked plain). ``variables``: what the template
    gets besides ``messages``, ``tools`` and ``add_generation_prompt``, such as
    ``bos_token`` and ``eos_token``. ``content_parts``: the template takes every message's
    content as a list of parts, images among them (vision-language models).
    """

    def __init__(
        self,
        source: str | None,
        *,
        special_tokens: Iterable[str] = (),
        variables: dict[str, Any] | None = None,
        content_parts: bool = False,
    ):
        import jinja2

        self.source = source or CHATML_TEMPLATE
        self.content_parts = content_parts
        """Every message's content is given as a list of parts (vision-language templates)."""
        self.special_tokens = tuple(sorted({token for token in special_tokens if token}, key=len, reverse=True))
        self.variables = dict(variables or {})
        try:
            self.template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ModelLoadError(f"the chat template does not compile: {error}") from None
        self.tool_format: type[ToolFormat] = tool_format_for(self.source)
        self.capabilities = self._probe()

    # --- client text --------------------------------------------------------------

    def spells_special(self, text: str) -> bool:
        return any(token in text for token in self.special_tokens)

    def plain(self, text: str) -> str:
        """Mark ``text`` as the client's, if it spells a special token."""
        return f"{PLAIN_OPEN}{text}{PLAIN_CLOSE}" if self.spells_special(text) else text

    def plain_value(self, value: Any) -> Any:
        """:meth:`plain` on every string (keys included) of a JSON-like value."""
        if isinstance(value, str):
            return self.plain(value)
        if isinstance(value, dict):
            return {self.plain_value(key): self.plain_value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.plain_value(item) for item in value]
        return value

    # --- rendering ----------------------------------------------------------------

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        prefill: str | None = None,
    ) -> RenderedPrompt:
        """Render template messages (:func:`lllms_core.chat.messages.template_messages`,
        whose client text is marked already); ``prefill`` follows the generation prompt
        (the answer continues it)."""
        import jinja2

        variables = {**self.variables, "messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools:
            variables["tools"] = tools
        try:
            text = self.template.render(**variables)
        except TemplateError as error:
            raise InvalidRequestError(f"the chat template refused the messages: {error}", param="messages") from None
        except jinja2.TemplateError as error:
            raise InvalidRequestError(f"the model's chat template failed: {error}", param="messages") from None
        return _find_plain(text + (prefill or ""))

    def prompt(
        self,
        messages: list["ChatMessage"],
        tools: "ToolSetup | None" = None,
        *,
        add_generation_prompt: bool = True,
        image_marker: str | None = None,
    ) -> RenderedPrompt:
        """Render request messages by the message policy (:mod:`lllms_core.chat.messages`).
        Without ``add_generation_prompt`` (a conversation to preload) a last assistant
        message is a turn of its own, not a prefill. ``image_marker``: the text that stands
        for each image (for an engine that puts the image's tokens there)."""
        from lllms_core.chat.messages import template_messages

        turns, prefill = template_messages(
            messages, capabilities=self.capabilities, tools=tools, plain=self.plain, plain_value=self.plain_value,
            prefill=add_generation_prompt, image_marker=image_marker, content_parts=self.content_parts,
        )
        payload = self.plain_value(tools.payload()) if tools is not None and self.capabilities.tools else None
        return self.render(turns, tools=payload, add_generation_prompt=add_generation_prompt, prefill=prefill)

    # --- what the template can do -------------------------------------------------

    def _probe(self) -> TemplateCapabilities:
        def renders(marker: str, messages: list[dict], tools: list[dict] | None = None) -> bool:
            if self.content_parts:
                messages = [dict(message, content=[{"type": "text", "text": message["content"]}]) for message in messages]
            try:
                return marker in self.render(messages, tools=tools).text
            except Exception:  # a template that refuses the probe does not do what it probes
                return False

        user = {"role": "user", "content": "Hello"}

        def call(arguments: Any) -> dict:
            return {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_probe1", "type": "function", "function": {"name": "probe_function", "arguments": arguments}}
            ]}  # fmt: skip

        tool = {"type": "function", "function": {
            "name": "probe_function", "description": "A probe", "parameters": {"type": "object", "properties": {}}
        }}  # fmt: skip
        object_call = renders("probe_argument", [user, call({"probe_argument": 1}), {"role": "user", "content": "Hi"}])
        text_call = renders("probe_argument", [user, call('{"probe_argument": 1}'), {"role": "user", "content": "Hi"}])
        result = {"role": "tool", "tool_call_id": "call_probe1", "name": "probe_function", "content": "probe_result"}
        arguments = {"probe_argument": 1} if object_call or not text_call else '{"probe_argument": 1}'
        tools = renders("probe_function", [user], [tool])
        return TemplateCapabilities(
            system_role=renders("probe_system", [{"role": "system", "content": "probe_system"}, user]),
            tools=tools,
            tool_calls=object_call or text_call,
            # a template that knows nothing of tools may still print any role: not a tool role it was trained on
            tool_responses=(tools or object_call or text_call) and renders("probe_result", [user, call(arguments), result]),
            object_arguments=object_call or not text_call,
        )


def _find_plain(text: str) -> RenderedPrompt:
    """Take the plain-text marks out of a rendered prompt and keep where they were.
    A mark the template left unclosed makes the rest of the prompt plain (the safe side)."""
    if PLAIN_OPEN not in text and PLAIN_CLOSE not in text:
        return RenderedPrompt(text)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length = depth = 0
    start = 0
    for part in _split_marks(text):
        if part == PLAIN_OPEN:
            if depth == 0:
                start = length
            depth += 1
        elif part == PLAIN_CLOSE:
            if depth == 1 and length > start:
                spans.append((start, length))
            depth = max(depth - 1, 0)
        else:
            out.append(part)
            length += len(part)
    if depth and length > start:
        spans.append((start, length))
    return RenderedPrompt("".join(out), tuple(spans))


def _split_marks(text: str) -> list[str]:
    return [part for part in re.split(f"([{PLAIN_OPEN}{PLAIN_CLOSE}])", text) if part]
