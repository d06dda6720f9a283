"""What an engine does with the text a model generates: stop strings, then tool calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from lllms_core.chat.markers import StopStringFilter
from lllms_core.schemas import CompletionChunk, ToolCallDelta

if TYPE_CHECKING:
    from lllms_core.chat.tools import ToolSetup


class OutputPiece:
    """Content and tool-call deltas to send; false when there is nothing."""

    __slots__ = ("text", "tool_calls")

    def __init__(self, text: str = "", tool_calls: list[ToolCallDelta] | None = None):
        self.text = text
        self.tool_calls = tool_calls or None

    def __bool__(self) -> bool:
        return bool(self.text or self.tool_calls)

    def chunk(self, index: int = 0, logprobs=None) -> CompletionChunk:
        return CompletionChunk(index=index, text=self.text, tool_calls=self.tool_calls, logprobs=logprobs)


class CompletionOutput:
    """One choice's generated text → what to send.

    Stop strings apply to the text as generated (never emitted, also across tokens);
    with tools, the text is then split into content and tool calls by the format's
    parser. ``push(text)`` returns ``(piece, ended)``: once ``ended`` (a stop string, or
    the list of calls is over), generation should stop. ``flush()`` returns what was held
    back when generation ends (and the last text, if any). ``called``: whether the choice
    made a tool call (its finish reason is then ``tool_calls`` rather than ``stop``).
    ``primer``: text the answer starts with that the model did not write (the start of a
    forced call, for an engine without grammars): parsed, never sent as text.
    """

    def __init__(self, stops: Iterable[str] = (), tools: "ToolSetup | None" = None, primer: str = ""):
        self.stops = StopStringFilter(stops)
        self.parser = tools.parser() if tools is not None else None
        self.ended = False
        self.primed: list = self.parser.push(primer)[1] if primer and self.parser is not None else []
        """The deltas the primer gave (a call's id and name), sent with the first piece."""

    def push(self, text: str) -> tuple[OutputPiece, bool]:
        if self.ended:
            return OutputPiece(), True
        text, stopped = self.stops.push(text)
        if self.parser is None:
            self.ended = stopped
            return OutputPiece(text), stopped
        content, deltas = self.parser.push(text)
        deltas, self.primed = self.primed + deltas, []
        if stopped and not self.parser.ended:
            more, more_deltas = self.parser.finish()
            content, deltas = content + more, deltas + more_deltas
        self.ended = stopped or self.parser.ended
        return OutputPiece(content, deltas), self.ended

    def flush(self, text: str = "") -> OutputPiece:
        """The last ``text`` and what was held back, once generation ends."""
        if self.ended:
            return OutputPiece()
        self.ended = True
        text, stopped = self.stops.push(text)
        if not stopped:
            text += self.stops.flush()
        if self.parser is None:
            return OutputPiece(text)
        content, deltas = self.parser.push(text)
        deltas, self.primed = self.primed + deltas, []
        if not self.parser.ended:
            more, more_deltas = self.parser.finish()
            content, deltas = content + more, deltas + more_deltas
        return OutputPiece(content, deltas)

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the choice, if one did."""
        return self.stops.matched

    @property
    def called(self) -> bool:
        return self.parser is not None and self.parser.called

    def finish_reason(self, reason: str) -> str:
        """The choice's finish reason, from the engine's (``stop`` or ``length``): a choice
        that called tools and was not cut ends with ``tool_calls``."""
        return "tool_calls" if self.called and reason == "stop" else reason
