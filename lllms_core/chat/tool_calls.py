"""Tool-call formats: how a model writes calls, and the stream parsers that read them.

A :class:`ToolFormat` is one way models write tool calls (Hermes ``<tool_call>``
blocks, Llama 3 JSON, Mistral ``[TOOL_CALLS]``, Qwen3-Coder XML). The registry
:data:`TOOL_FORMATS` chooses one from a model's chat template (:func:`tool_format_for`);
a template that shows none gets Hermes, which the tool instructions then teach.

Each format's parser splits generated text into content and :class:`ToolCallDelta`
pieces as it streams, and sends only what parses: a call's first delta carries its id
and name once the name is complete and names one of the request's functions; then come
pieces of its arguments as JSON text, each extending a prefix that closes into valid
JSON (see :mod:`lllms_core.chat.json_stream`). What only looks like a call stays text.

A list of calls ends (``ended``; the engine stops generating) when a call is complete
and parallel calls are off, when a call repeats one before it (the repeat is dropped:
a small model at temperature 0 otherwise writes the same call until ``max_tokens``), or
when text follows the calls.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Iterable

from lllms_core.chat.json_stream import WHITESPACE, JsonInvalid, JsonScanner
from lllms_core.chat.markers import find_marker, partial_marker_length
from lllms_core.schemas import ToolCallDelta

if TYPE_CHECKING:
    from lllms_core.chat.tools import ToolSetup

Reading = Generator[None, None, Any]
"""A parser step that suspends (yields) until more text arrives."""


class Rejected(Exception):
    """What was read since the marker is not a call: it is text after all."""


class ListEnded(Exception):
    """The list of calls is over; what follows is not sent."""


class Reader:
    """The text a parser received and has not consumed. Its helpers are generators that
    wait (yield) for more text; at the end of the text they raise :class:`EOFError`."""

    def __init__(self) -> None:
        self.buffer = ""
        self.eof = False
        self.taken: list[str] | None = None
        """What was consumed since :meth:`record` (the raw text of a candidate call)."""

    def record(self) -> None:
        self.taken = []

    def take(self, count: int) -> str:
        text, self.buffer = self.buffer[:count], self.buffer[count:]
        if self.taken is not None:
            self.taken.append(text)
        return text

    def wait(self, count: int = 1) -> Reading:
        """Wait until ``count`` characters are there."""
        while len(self.buffer) < count:
            if self.eof:
                raise EOFError
            yield

    def skip_whitespace(self) -> Reading:
        while True:
            stripped = self.buffer.lstrip(WHITESPACE)
            if stripped or self.eof:
                self.take(len(self.buffer) - len(stripped))
                return
            self.take(len(self.buffer))
            yield

    def accept(self, literal: str) -> Reading:
        """Consume ``literal`` if the text continues with it; True if it did."""
        while len(self.buffer) < len(literal) and literal.startswith(self.buffer) and not self.eof:
            yield
        if self.buffer.startswith(literal):
            self.take(len(literal))
            return True
        return False

    def expect(self, literal: str) -> Reading:
        if not (yield from self.accept(literal)):
            if self.eof and literal.startswith(self.buffer):
                raise EOFError
            raise JsonInvalid(f"expected {literal!r}")

    def until(self, marker: str) -> Reading:
        """The text up to ``marker`` (consumed with it)."""
        while marker not in self.buffer:
            if self.eof:
                raise EOFError
            yield
        text = self.take(self.buffer.index(marker))
        self.take(len(marker))
        return text

    def json_value(self, on_piece: Callable[[str, str], None] | None = None) -> Reading:
        """One JSON value's text (without leading whitespace). ``on_piece(text, closing)``
        receives the parts that can go out as they are read, with what would close them."""
        yield from self.skip_whitespace()
        scanner = JsonScanner()
        text, sent = "", 0
        while True:
            used = scanner.feed(self.buffer)
            text += self.take(used)
            if on_piece is not None and scanner.safe > sent:
                on_piece(text[sent : scanner.safe], scanner.closing())
                sent = scanner.safe
            if scanner.done:
                return text
            if self.eof:
                scanner.end()  # a number at the very end; anything else is incomplete
                if on_piece is not None and scanner.safe > sent:
                    on_piece(text[sent:], "")
                return text
            yield


class ToolCallParser:
    """Splits a model's output into content and tool calls, as it streams (the base of
    every format's parser).

    ``push(text)`` returns ``(content, deltas)``; ``finish()`` what is left when generation
    ends. ``ended`` turns true when the list of calls is over.
    """

    markers: ClassVar[tuple[str, ...]] = ()
    """Texts that start a list of calls anywhere in the output."""
    leading: ClassVar[tuple[str, ...]] = ()
    """Texts that start a list of calls only at the start of the output (after whitespace)."""

    def __init__(self, setup: "ToolSetup", new_id: Callable[[], str]):
        self.functions = setup.functions
        self.parallel = setup.parallel
        self.new_id = new_id
        self.reader = Reader()
        self.content: list[str] = []
        self.deltas: list[ToolCallDelta] = []
        self.ended = False
        self.calls: list[tuple[str, str]] = []
        """The complete calls sent: (name, arguments)."""
        self.current: tuple[str, str] | None = None
        self.held: list[ToolCallDelta] = []
        self.closing = ""
        """What closes the current call's arguments sent so far into valid JSON."""
        self.steps = self._run()

    # --- the public side ---------------------------------------------------------------

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if not self.ended:
            self.reader.buffer += text
            self._advance()
        return self._collect()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if not self.ended:
            self.reader.eof = True
            self._advance()
        return self._collect()

    @property
    def called(self) -> bool:
        return bool(self.calls) or self.current is not None

    def _advance(self) -> None:
        try:
            next(self.steps)
        except StopIteration:
            self.ended = True

    def _collect(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self.content), self.deltas
        self.content, self.deltas = [], []
        return content, deltas

    # --- the calls, with repeats held back ----------------------------------------------

    def start_call(self, name: str) -> None:
        self.current = (name, "")
        self.closing = "{}"
        self._send(ToolCallDelta(index=len(self.calls), id=self.new_id(), name=name))

    def add_arguments(self, piece: str, closing: str) -> None:
        assert self.current is not None
        if piece:
            self.current = (self.current[0], self.current[1] + piece)
            self._send(ToolCallDelta(index=len(self.calls), arguments=piece))
        self.closing = closing

    def end_call(self) -> None:
        """The current call is complete (or cut: its arguments are closed)."""
        assert self.current is not None
        if self.closing:
            self.add_arguments(self.closing, "")
        call, self.current = self.current, None
        if call in self.calls:  # a repeat ends the list, unsent
            self.held = []
            raise ListEnded
        self.deltas += self.held
        self.held = []
        self.calls.append(call)
        if not self.parallel:
            raise ListEnded

    def _send(self, delta: ToolCallDelta) -> None:
        name, arguments = self.current
        repeating = any(name == done and done_arguments.startswith(arguments) for done, done_arguments in self.calls)
        if repeating:
            self.held.append(delta)
        else:
            self.deltas += self.held
            self.deltas.append(delta)
            self.held = []

    # --- reading --------------------------------------------------------------------

    def _run(self) -> Generator[None, None, None]:
        reader = self.reader
        start = True  # nothing but whitespace seen yet
        while True:
            buffer = reader.buffer
            found = find_marker(buffer, self.markers)
            if start and self.leading:
                stripped = buffer.lstrip(WHITESPACE)
                if not stripped and not reader.eof:
                    yield
                    continue
                if any(stripped.startswith(lead) for lead in self.leading):
                    found = (len(buffer) - len(stripped), "")
                elif any(lead.startswith(stripped) for lead in self.leading) and not reader.eof:
                    yield
                    continue
            if found is None:
                keep = 0 if reader.eof else partial_marker_length(buffer, self.markers)
                text = reader.take(len(buffer) - keep)
                self.content.append(text)
                start = start and not text.strip(WHITESPACE)
                if reader.eof:
                    return
                yield
                continue
            position, marker = found
            text = reader.take(position)
            if marker:  # whitespace before a leading call is not content
                self.content.append(text)
            reader.record()
            reader.take(len(marker))
            try:
                yield from self.read_calls(marker)
            except (Rejected, JsonInvalid, EOFError):
                if not self.called:  # no call started: what was read is text after all
                    self.content.append("".join(reader.taken))
                    reader.taken = None
                    start = False
                    continue
            except ListEnded:
                pass
            return self._cut()

    def _cut(self) -> None:
        """The list is over: a call still open is closed."""
        if self.current is not None:
            try:
                self.end_call()
            except ListEnded:
                pass

    def read_calls(self, marker: str) -> Reading:
        """Read the list of calls after ``marker``; raise :class:`Rejected` if what follows
        is no call of the request's functions. Returning ends the list."""
        raise NotImplementedError

    def known(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self.functions:
            raise Rejected
        return name

    def read_json_call(self, *, names_first: bool = False) -> Reading:
        """A call written as a JSON object with ``name`` and ``arguments`` (or
        ``parameters``). Arguments before the name are read whole, then sent.
        ``names_first``: the first key must be ``name`` (or ``type``), else it is no call."""
        reader = self.reader
        yield from reader.skip_whitespace()
        yield from reader.expect("{")
        name = None
        early_arguments = None
        first = True
        while True:
            yield from reader.skip_whitespace()
            if (yield from reader.accept("}")):
                break
            if not first:
                yield from reader.expect(",")
            key = json.loads((yield from reader.json_value()))
            yield from reader.skip_whitespace()
            yield from reader.expect(":")
            if names_first and first and key not in ("name", "type"):
                raise Rejected
            first = False
            if key == "name" and name is None:
                name = self.known(json.loads((yield from reader.json_value())))
                self.start_call(name)
                if early_arguments is not None:
                    self.add_arguments(early_arguments, "")
            elif key in ("arguments", "parameters") and name is not None:
                yield from self._json_arguments()
            elif key in ("arguments", "parameters"):
                early_arguments = _arguments_text((yield from reader.json_value()))
            else:
                yield from reader.json_value()
        if name is None:
            raise Rejected
        self.end_call()

    def _json_arguments(self) -> Reading:
        reader = self.reader
        yield from reader.skip_whitespace()
        yield from reader.wait()
        if reader.buffer.startswith('"'):  # arguments written as a JSON string of JSON
            self.add_arguments(_arguments_text((yield from reader.json_value())), "")
        else:
            yield from reader.json_value(self.add_arguments)


def _arguments_text(value: str) -> str:
    """The arguments' JSON text from the value a model wrote (an object, or a string holding one)."""
    parsed = json.loads(value)
    if isinstance(parsed, str):
        try:
            json.loads(parsed)
            return parsed
        except ValueError:
            return value
    return value


class ToolFormat:
    """One way of writing tool calls. Subclasses set the class attributes and the parser."""

    name: ClassVar[str]
    signatures: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """A chat template containing all the texts of one signature writes this format."""
    parser_class: ClassVar[type[ToolCallParser]]
    call_begin: ClassVar[str]
    """Grammars: the text before a call's function name."""
    call_middle: ClassVar[str]
    """Grammars: the text between the name and the arguments."""
    call_end: ClassVar[str]
    """Grammars: the text after the arguments."""
    list_begin: ClassVar[str] = ""
    grammar_list_begin: ClassVar[str] = ""
    """Grammars: what a list starts with (without special-token markers, which a grammar cannot force)."""
    list_separator: ClassVar[str] = "\n"
    list_end: ClassVar[str] = ""
    marker_texts: ClassVar[tuple[str, ...]] = ()
    """Texts of its markers, which a model may have as special tokens (engines show them as text)."""
    json_arguments: ClassVar[bool] = True
    """False: arguments are written as one XML element per parameter (Qwen3-Coder)."""

    @classmethod
    def detect(cls, template: str) -> bool:
        return any(all(text in template for text in signature) for signature in cls.signatures)

    @classmethod
    def new_id(cls) -> str:
        return f"call_{secrets.token_hex(12)}"

    @classmethod
    def parser(cls, setup: "ToolSetup") -> ToolCallParser:
        return cls.parser_class(setup, cls.new_id)

    @classmethod
    def render_call(cls, name: str, arguments: str) -> str:
        """A call as the model writes it (for templates that cannot render past calls)."""
        return f"{cls.call_begin}{name}{cls.call_middle}{arguments}{cls.call_end}"

    @classmethod
    def render_calls(cls, calls: Iterable[tuple[str, str]]) -> str:
        return cls.list_begin + cls.list_separator.join(cls.render_call(*call) for call in calls) + cls.list_end

    @classmethod
    def call_text(cls, name: str) -> tuple[str, str]:
        """Grammars: the text before and after a call's JSON arguments."""
        return f"{cls.call_begin}{name}{cls.call_middle}", cls.call_end


# --- Hermes -------------------------------------------------------------------------


class HermesParser(ToolCallParser):
    markers = ("<tool_call>",)

    def read_calls(self, marker: str) -> Reading:
        while True:
            yield from self.read_json_call()
            if not (yield from self.next_block()):
                return

    def next_block(self) -> Reading:
        """After a block's call: its ``</tool_call>`` (the last block may lack it), then
        whether another block follows."""
        reader = self.reader
        yield from reader.skip_whitespace()
        if reader.eof and not reader.buffer:
            return False
        yield from reader.expect("</tool_call>")
        yield from reader.skip_whitespace()
        return (yield from reader.accept("<tool_call>"))


class Hermes(ToolFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per
    call (Hermes, Qwen 2.5 and 3, SmolLM3, and the format the tool instructions teach)."""

    name = "hermes"
    signatures = (("<tool_call>", "</tool_call>"),)
    marker_texts = ("<tool_call>", "</tool_call>")
    parser_class = HermesParser
    call_begin = '<tool_call>\n{"name": "'
    call_middle = '", "arguments": '
    call_end = "}\n</tool_call>"


# --- Llama 3 ------------------------------------------------------------------------


class Llama3Parser(ToolCallParser):
    markers = ("<|python_tag|>",)
    leading = ('{"name"', '{"type"', "{ ", "{\n")

    def read_calls(self, marker: str) -> Reading:
        reader = self.reader
        while True:
            yield from self.read_json_call(names_first=True)
            yield from reader.skip_whitespace()
            yield from reader.accept(";")
            yield from reader.skip_whitespace()
            if reader.eof and not reader.buffer:
                return
            yield from reader.wait()
            if not reader.buffer.startswith("{"):
                return


class Llama3(ToolFormat):
    """``{"name": ..., "parameters": {...}}`` at the start of the answer, optionally after
    ``<|python_tag|>`` (Llama 3.1, 3.2 and 3.3 with JSON tool calling)."""

    name = "llama3"
    signatures = (("<|python_tag|>",), ("<|start_header_id|>", '"parameters"'), ("<|start_header_id|>", "tools"))
    marker_texts = ("<|python_tag|>",)
    parser_class = Llama3Parser
    call_begin = '{"name": "'
    call_middle = '", "parameters": '
    call_end = "}"
    list_separator = "; "


# --- Mistral ------------------------------------------------------------------------


class MistralParser(ToolCallParser):
    markers = ("[TOOL_CALLS]",)
    leading = ('[{"name"', "[{ ", "[{\n", "[ {", "[\n")

    def read_calls(self, marker: str) -> Reading:
        reader = self.reader
        yield from reader.skip_whitespace()
        yield from reader.wait()
        if not reader.buffer.startswith("["):  # [TOOL_CALLS]name[ARGS]{...}, repeated
            while True:
                name = self.known((yield from reader.until("[ARGS]")).strip())
                self.start_call(name)
                yield from self._json_arguments()
                self.end_call()
                yield from reader.skip_whitespace()
                if not (yield from reader.accept("[TOOL_CALLS]")):
                    return
        yield from reader.expect("[")
        while True:
            yield from self.read_json_call(names_first=not marker)
            yield from reader.skip_whitespace()
            if (yield from reader.accept("]")):
                return
            yield from reader.expect(",")


class Mistral(ToolFormat):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral 7B v0.3, Nemo,
    Small), or ``[TOOL_CALLS]name[ARGS]{...}`` (later Mistral models). Its ids are nine
    letters and digits, as Mistral's templates require."""

    name = "mistral"
    signatures = (("[TOOL_CALLS]",),)
    marker_texts = ("[TOOL_CALLS]", "[ARGS]")
    parser_class = MistralParser
    call_begin = '{"name": "'
    call_middle = '", "arguments": '
    call_end = "}"
    list_begin = "[TOOL_CALLS]["
    grammar_list_begin = "["
    list_separator = ", "
    list_end = "]"

    @classmethod
    def new_id(cls) -> str:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))


# --- Qwen3-Coder ----------------------------------------------------------------------

PARAMETER_END = "\n</parameter>"


class QwenCoderParser(HermesParser):

    def read_calls(self, marker: str) -> Reading:
        reader = self.reader
        while True:
            yield from reader.skip_whitespace()
            yield from reader.expect("<function=")
            name = self.known((yield from reader.until(">")).strip())
            self.start_call(name)
            sent = 0
            while True:
                yield from reader.skip_whitespace()
                if (yield from reader.accept("</function>")):
                    break
                yield from reader.expect("<parameter=")
                key = (yield from reader.until(">")).strip()
                yield from self._parameter(key, "{" if not sent else ", ")
                sent += 1
            if not sent:
                self.add_arguments("{", "}")
            self.end_call()
            if not (yield from self.next_block()):
                return

    def _parameter(self, key: str, lead: str) -> Reading:
        """One parameter's value, sent as a JSON member: a string streams as it is read, a
        value of another type (by the function's schema) is sent once complete."""
        reader = self.reader
        yield from reader.accept("\n")
        head = f"{lead}{json.dumps(key, ensure_ascii=False)}: "
        schema = self.functions[self.current[0]].get("properties", {}).get(key, {})
        if schema.get("type", "string") != "string":
            value = (yield from reader.until("</parameter>")).removesuffix("\n")
            try:
                text = json.dumps(json.loads(value), ensure_ascii=False)
            except ValueError:
                text = json.dumps(value, ensure_ascii=False)
            self.add_arguments(head + text, "}")
            return
        self.add_arguments(head + '"', '"}')
        while True:
            end = reader.buffer.find("</parameter>")
            if end != -1:
                value = reader.take(end).removesuffix("\n")
                reader.take(len("</parameter>"))
                self.add_arguments(json.dumps(value, ensure_ascii=False)[1:-1] + '"', "}")
                return
            keep = partial_marker_length(reader.buffer, (PARAMETER_END,))
            piece = reader.take(len(reader.buffer) - keep)
            if piece:
                self.add_arguments(json.dumps(piece, ensure_ascii=False)[1:-1], '"}')
            if reader.eof:
                raise EOFError
            yield


class QwenCoder(ToolFormat):
    """``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
    </function>\\n</tool_call>`` (Qwen3-Coder). Values of string parameters are raw text,
    others JSON; the parser turns them into JSON arguments by the function's schema."""

    name = "qwen3_coder"
    signatures = (("<function=", "<parameter="),)
    marker_texts = ("<tool_call>", "</tool_call>")
    parser_class = QwenCoderParser
    call_begin = "<tool_call>\n<function="
    call_middle = ">\n"
    call_end = "</function>\n</tool_call>"
    json_arguments = False

    @classmethod
    def render_call(cls, name: str, arguments: str) -> str:
        try:
            values = json.loads(arguments)
        except ValueError:
            values = {}
        parameters = "".join(
            f"<parameter={key}>\n{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}\n</parameter>\n"
            for key, value in (values.items() if isinstance(values, dict) else ())
        )
        return f"{cls.call_begin}{name}{cls.call_middle}{parameters}{cls.call_end}"


TOOL_FORMATS: list[type[ToolFormat]] = [QwenCoder, Mistral, Llama3, Hermes]
"""The registry, most specific first: the first whose signature the template shows is used."""

DEFAULT_TOOL_FORMAT: type[ToolFormat] = Hermes


def tool_format_for(template: str | None) -> type[ToolFormat]:
    """The format a model with this chat template writes calls in (Hermes when none shows)."""
    for tool_format in TOOL_FORMATS:
        if template and tool_format.detect(template):
            return tool_format
    return DEFAULT_TOOL_FORMAT
