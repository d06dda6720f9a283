"""Reading one JSON value as it is generated, a character at a time.

:class:`JsonScanner` checks that the text is JSON, tells where the value ends, and
how much of it may be sent on already: a prefix that can always be closed into valid
JSON by appending :meth:`JsonScanner.closing` (an open string's quote and the open
containers' brackets). A trailing comma, a key still waiting for its value, a number
or literal not yet complete, and a string escape are held back until what follows
makes them closable again. So a client that receives tool-call arguments piece by
piece always holds a prefix of valid JSON, and a call cut short can be closed.
"""

from __future__ import annotations

WHITESPACE = " \t\n\r"
LITERALS = {"t": "true", "f": "false", "n": "null"}
CLOSERS = {"{": "}", "[": "]"}
HEX = frozenset("0123456789abcdefABCDEF")


class JsonInvalid(ValueError):
    """The text is not JSON."""


class JsonScanner:
    """Consumes the characters of one JSON value (leading whitespace included).

    ``feed(text)`` returns how many characters of ``text`` belong to the value; once
    ``done``, the rest is what follows it. A number ends only at the character after
    it: at the end of the text call :meth:`end`.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.state = "value"
        self.length = 0
        self.done = False
        self.in_key = False
        self.literal = ""
        self.number = ""
        self.unicode_left = 0
        self.hold_from: int | None = None
        self.hold_closing = ""
        self.escape_hold = False

    # --- what may go out ------------------------------------------------------------

    @property
    def safe(self) -> int:
        """How many characters read so far can be sent on."""
        return self.length if self.hold_from is None else self.hold_from

    def closing(self) -> str:
        """What makes the first :attr:`safe` characters a complete JSON value."""
        if self.hold_from is not None:
            return self.hold_closing
        return self._closing()

    def _closing(self, escape: bool = False) -> str:
        in_string = self.state in ("string", "escape", "unicode") and not self.in_key
        quote = '"' if in_string or escape else ""
        return quote + "".join(CLOSERS[opener] for opener in reversed(self.stack))

    def _hold(self, escape: bool = False) -> None:
        if self.hold_from is None:
            self.hold_from = self.length
            self.hold_closing = self._closing(escape)
            self.escape_hold = escape

    def _release(self) -> None:
        self.hold_from = None
        self.escape_hold = False

    # --- reading --------------------------------------------------------------------

    def feed(self, text: str) -> int:
        for offset, character in enumerate(text):
            if self.done:
                return offset
            if not self._step(character):  # a number ended: the character is not the value's
                self._value_ended()
                if self.done:
                    return offset
                self._step(character)
            self.length += 1
        return len(text)

    def end(self) -> None:
        """The text ends here: a number in progress ends with it."""
        if self.state == "number" and self._number_complete():
            self._value_ended()
        if not self.done:
            raise JsonInvalid("the JSON value is incomplete")

    def _fail(self, character: str) -> None:
        raise JsonInvalid(f"unexpected {character!r} at character {self.length} of a JSON value")

    def _step(self, c: str) -> bool:
        """Consume one character; False when a number ends before it (it is read again)."""
        state = self.state
        if state == "string":
            if c == '"':
                if self.in_key:
                    self.in_key, self.state = False, "colon"
                else:
                    self._value_ended()
            elif c == "\\":
                self._hold(escape=True)
                self.state = "escape"
            elif c < " ":
                self._fail(c)
        elif state == "escape":
            if c == "u":
                self.state, self.unicode_left = "unicode", 4
            elif c in '"\\/bfnrt':
                self._escaped()
            else:
                self._fail(c)
        elif state == "unicode":
            if c not in HEX:
                self._fail(c)
            self.unicode_left -= 1
            if not self.unicode_left:
                self._escaped()
        elif state == "number":
            if self._number_accepts(c):
                self.number += c
            elif self._number_complete():
                return False
            else:
                self._fail(c)
        elif state == "literal":
            expected = self.literal[len(self.number)]
            if c != expected:
                self._fail(c)
            self.number += c
            if self.number == self.literal:
                self._release()
                self._value_ended()
        elif c in WHITESPACE:
            pass
        elif state in ("value", "item_or_end"):
            if state == "item_or_end" and c == "]":
                self._close()
            else:
                self._start_value(c)
        elif state == "key_or_end" and c == "}":
            self._close()
        elif state in ("key_or_end", "key"):
            if c != '"':
                self._fail(c)
            self._hold()
            self.state, self.in_key = "string", True
        elif state == "colon":
            if c != ":":
                self._fail(c)
            self.state = "value"
        elif state == "after":
            opener = self.stack[-1]
            if c == ",":
                self._hold()
                self.state = "key" if opener == "{" else "value"
            elif c == CLOSERS[opener]:
                self._close()
            else:
                self._fail(c)
        else:
            self._fail(c)
        return True

    def _start_value(self, c: str) -> None:
        if c == '"':
            self._release()
            self.state = "string"
        elif c in "{[":
            self._release()
            self.stack.append(c)
            self.state = "key_or_end" if c == "{" else "item_or_end"
        elif c in LITERALS:
            self._hold()
            self.state, self.literal, self.number = "literal", LITERALS[c], c
        elif c == "-" or c.isdigit():
            self._hold()
            self.state, self.number = "number", c
        else:
            self._fail(c)

    def _escaped(self) -> None:
        self.state = "string"
        if self.escape_hold:
            self._release()

    def _close(self) -> None:
        self.stack.pop()
        self._value_ended()

    def _value_ended(self) -> None:
        if self.state == "number":
            self._release()
        self.number = ""
        if self.stack:
            self.state = "after"
        else:
            self.state = "done"
            self.done = True

    def _number_accepts(self, c: str) -> bool:
        number = self.number
        last = number[-1]
        if c.isdigit():
            return not (number in ("0", "-0"))
        if c == ".":
            return "." not in number and "e" not in number.lower() and last.isdigit()
        if c in "eE":
            return "e" not in number.lower() and last.isdigit()
        if c in "+-":
            return last in "eE"
        return False

    def _number_complete(self) -> bool:
        return self.number[-1].isdigit()
