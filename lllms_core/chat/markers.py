"""Holding back text that may be the start of a marker (a stop string, ``<tool_call>``...).

Generated text arrives a token at a time, and a marker may span tokens: text that
could still become a marker is held back until the next piece tells. This is the
one place that knows how much to hold; the stop-string filter and the tool-call
parsers use it.
"""

from __future__ import annotations

from typing import Iterable


def partial_marker_length(text: str, markers: Iterable[str]) -> int:
    """How many characters at the end of ``text`` may be the start of one of ``markers``
    (the longest such tail; a whole marker does not count)."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest


def find_marker(text: str, markers: Iterable[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest of ``markers`` in ``text`` from ``start``: (position, marker), or None.
    At one position the longest marker wins."""
    found: tuple[int, str] | None = None
    for marker in markers:
        position = text.find(marker, start)
        if position != -1 and (found is None or (position, -len(marker)) < (found[0], -len(found[1]))):
            found = (position, marker)
    return found


class StopStringFilter:
    """Holds back text that may be the start of a stop string, so stop strings are
    never emitted, also when they span several tokens.

    ``push(text)`` returns ``(text_to_emit, stopped)``; after a stop, generation ends.
    ``flush()`` returns what was held back when generation ends without a stop.
    ``matched`` is the stop string found, once one is.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        found = find_marker(self.pending, self.stops)
        if found is not None:
            emitted, self.pending = self.pending[: found[0]], ""
            self.matched = found[1]
            return emitted, True
        keep = partial_marker_length(self.pending, self.stops)
        cut = len(self.pending) - keep
        emitted, self.pending = self.pending[:cut], self.pending[cut:]
        return emitted, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
