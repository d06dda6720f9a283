"""JSON schemas and tool calls as GBNF grammars (llama.cpp's grammar format, which
xgrammar also reads): one converter, so every engine enforces a schema the same way.

What a grammar enforces:

- ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf`` (as "any of"),
  ``allOf`` (merged into one schema: properties and ``required`` united, bounds
  tightened, ``enum`` intersected; a merge it cannot make is a 400),
  ``$ref`` to ``#``, ``#/$defs/…`` or ``#/definitions/…`` (recursion included);
- strings: ``minLength``, ``maxLength``, ``pattern`` (regular expressions without
  look-arounds or back-references), ``format`` ``date``, ``time``, ``date-time``, ``uuid``;
- integers and numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``,
  ``exclusiveMaximum`` (a bounded number is written without an exponent);
- arrays: ``items``, ``prefixItems``, ``minItems``, ``maxItems``;
- objects: ``properties`` (in their order), ``required``, ``additionalProperties``
  (unset: no other properties when ``properties`` are given, any otherwise).

Not enforced (accepted and ignored): ``multipleOf``, ``uniqueItems``, ``minProperties``,
``maxProperties``, ``patternProperties``, ``propertyNames``, ``not``, ``if``/``then``/
``else``, ``dependentRequired``, ``contains`` and other formats. Numbers have at most 16
digits before and after the point, as in llama.cpp. A schema no JSON value matches
(``minimum`` above ``maximum``, an empty ``enum``, a required property that
``additionalProperties: false`` forbids…) is a 400 that says why.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from lllms_core.errors import InvalidRequestError

if TYPE_CHECKING:
    from lllms_core.chat.tools import ToolSetup

MAX_DIGITS = 16
"""Digits of a number's integer part, and of its fraction, at most."""

PRIMITIVES = {
    "space": '" "?',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "integer": f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}})',
    "number": f'integer ("." [0-9]{{1,{MAX_DIGITS}}})? ([eE] [-+]? [0-9]{{1,{MAX_DIGITS}}})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? space "}"',
    "array": '"[" space (value ("," space value)*)? space "]"',
}
PRIMITIVE_NEEDS = {
    "string": ("char",),
    "number": ("integer",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("space", "string", "value"),
    "array": ("space", "value"),
}
FORMATS = {
    "date": r'[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1])',
    "time": r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": r'[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}
FORMATS["date-time"] = f"{FORMATS['date']} \"T\" {FORMATS['time']}"
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class Unsatisfiable(Exception):
    """No JSON value matches (the message says why)."""


def literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = []
    for character in text:
        if character in '"\\':
            escaped.append("\\" + character)
        elif character == "\n":
            escaped.append("\\n")
        elif character == "\r":
            escaped.append("\\r")
        elif character == "\t":
            escaped.append("\\t")
        elif ord(character) < 0x20 or character == "\x7f":
            escaped.append(f"\\x{ord(character):02X}")
        else:
            escaped.append(character)
    return '"' + "".join(escaped) + '"'


def _json_literal(value: Any) -> str:
    return literal(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")))


def _alternatives(options: list[str]) -> str:
    unique = list(dict.fromkeys(options))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


# --- integer and decimal ranges ---------------------------------------------------


def _digits(count: int) -> str:
    return "" if count <= 0 else ("[0-9]" if count == 1 else f"[0-9]{{{count}}}")


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length between ``low`` and ``high`` (inclusive)."""
    if low == high:
        return literal(low) if low else ""
    first_low, first_high = int(low[0]), int(high[0])
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        digit = literal(low[0]) if first_low == first_high else f"[{first_low}-{first_high}]"
        return " ".join(filter(None, [digit, _digits(rest)]))
    if first_low == first_high:
        return " ".join(filter(None, [literal(low[0]), _same_length(low[1:], high[1:])]))
    options = [" ".join(filter(None, [literal(low[0]), _same_length(low[1:], "9" * rest)]))]
    if first_high - first_low > 1:
        digit = str(first_low + 1) if first_high - first_low == 2 else f"[{first_low + 1}-{first_high - 1}]"
        options.append(" ".join(filter(None, [digit if digit.startswith("[") else literal(digit), _digits(rest)])))
    options.append(" ".join(filter(None, [literal(high[0]), _same_length("0" * rest, high[1:])])))
    return "(" + " | ".join(options) + ")"


def _natural_range(low: int, high: int | None) -> str:
    """Decimal numerals (no leading zeros) of the integers from ``low`` (≥ 0) to ``high``
    (None: up to :data:`MAX_DIGITS` digits)."""
    low_text = str(low)
    top = MAX_DIGITS if high is None else len(str(high))
    options = []
    for length in range(len(low_text), top + 1):
        start = low_text if length == len(low_text) else "1" + "0" * (length - 1)
        end = str(high) if high is not None and length == top else "9" * length
        if high is None and length > len(low_text):  # every longer length at once
            options.append(f"[1-9] [0-9]{{{length - 1},{MAX_DIGITS - 1}}}" if length < MAX_DIGITS else f"[1-9] {_digits(length - 1)}")
            break
        options.append(_same_length(start, end))
    return _alternatives(options)


def _fraction(low: str | None, high: str | None, low_strict: bool, high_strict: bool, room: int = MAX_DIGITS):
    """Fraction digit strings ``d`` (at most ``room``) with ``0.low ≤ 0.d ≤ 0.high`` (``<``
    where strict). ``low``/``high`` are digit strings without trailing zeros (``""`` is
    zero), None for no bound (0 inclusive, 1 exclusive). Returns ``(expression for the
    non-empty ones or None, whether the empty one is allowed)``."""
    if low == "" and not low_strict:
        low = None
    empty = low is None and not (high == "" and high_strict)
    if room == 0:
        return None, empty
    if low is None and high is None:
        return f"[0-9]{{1,{room}}}", True
    if low is None and high == "":  # at most zero: zeros
        return (None if high_strict else f'"0"{{1,{room}}}'), empty
    if low == "" and high is None:  # above zero: a non-zero digit comes (the cap is loose here)
        return f'"0"{{0,{room - 1}}} [1-9] [0-9]{{0,{room - 1}}}', False
    first_low = int(low[0]) if low else 0
    first_high = 9 if high is None else (int(high[0]) if high else 0)
    branches: list[tuple[int, str | None, bool]] = []
    for digit in range(first_low, first_high + 1):
        if low is None or digit > first_low:
            next_low, next_low_strict = None, False
        elif low == "":
            next_low, next_low_strict = "", True
        else:
            next_low, next_low_strict = low[1:], low_strict
        if high is None or digit < first_high:
            next_high, next_high_strict = None, False
        elif high == "":
            next_high, next_high_strict = "", high_strict
        else:
            next_high, next_high_strict = high[1:], high_strict
        rest, rest_empty = _fraction(next_low, next_high, next_low_strict, next_high_strict, room - 1)
        if rest is not None or rest_empty:
            branches.append((digit, rest, rest_empty))
    options = []
    for group in _runs(branches):
        digits = literal(str(group[0][0])) if len(group) == 1 else f"[{group[0][0]}-{group[-1][0]}]"
        _, rest, rest_empty = group[0]
        if rest is None:
            options.append(digits)
        elif rest_empty:
            options.append(f"{digits} ({rest})?")
        else:
            options.append(f"{digits} {rest}")
    return (_alternatives(options) if options else None), empty


def _runs(branches: list[tuple[int, str | None, bool]]) -> list[list[tuple[int, str | None, bool]]]:
    """Consecutive digits with the same continuation, grouped (one character class each)."""
    groups: list[list[tuple[int, str | None, bool]]] = []
    for branch in branches:
        if groups and groups[-1][-1][0] + 1 == branch[0] and groups[-1][-1][1:] == branch[1:]:
            groups[-1].append(branch)
        else:
            groups.append([branch])
    return groups


def _decimal_parts(value: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative decimal."""
    whole = int(value)
    fraction = format(value - whole, "f").partition(".")[2].rstrip("0")
    return whole, fraction


def _unsigned_range(low: Decimal, high: Decimal | None, low_strict: bool, high_strict: bool, integer: bool) -> str | None:
    """Numerals of non-negative numbers from ``low`` to ``high`` (None: unbounded)."""
    if integer:
        first = math.floor(low) + 1 if low_strict or low != math.floor(low) else int(low)
        last = None if high is None else (math.ceil(high) - 1 if high_strict or high != math.ceil(high) else int(high))
        if last is not None and first > last:
            return None
        if first >= 10**MAX_DIGITS:
            raise Unsatisfiable(f"a minimum of {low} needs more than {MAX_DIGITS} digits")
        return _natural_range(first, last if last is None or last < 10**MAX_DIGITS else None)
    if high is not None and high >= 10**MAX_DIGITS:
        high, high_strict = None, False
    if low >= 10**MAX_DIGITS:
        raise Unsatisfiable(f"a minimum of {low} needs more than {MAX_DIGITS} digits")
    low_whole, low_fraction = _decimal_parts(low)
    options = []

    def with_fraction(whole: str, fraction: tuple[str | None, bool]) -> None:
        digits, empty = fraction
        if digits is None:
            if empty:
                options.append(whole)
        elif empty:
            options.append(f'{whole} ("." {digits})?')
        else:
            options.append(f'{whole} "." {digits}')

    if high is None:
        with_fraction(literal(str(low_whole)), _fraction(low_fraction, None, low_strict, False))
        if low_whole + 1 < 10**MAX_DIGITS:
            with_fraction(_natural_range(low_whole + 1, None), _fraction(None, None, False, False))
        return _alternatives(options) if options else None
    high_whole, high_fraction = _decimal_parts(high)
    if low_whole == high_whole:
        with_fraction(literal(str(low_whole)), _fraction(low_fraction, high_fraction, low_strict, high_strict))
    else:
        with_fraction(literal(str(low_whole)), _fraction(low_fraction, None, low_strict, False))
        if high_whole - low_whole > 1:
            with_fraction(_natural_range(low_whole + 1, high_whole - 1), _fraction(None, None, False, False))
        with_fraction(literal(str(high_whole)), _fraction(None, high_fraction, False, high_strict))
    return _alternatives(options) if options else None


def _bound(schema: dict, name: str, strict_name: str) -> tuple[Decimal | None, bool]:
    """A bound and whether it is strict (draft 2020 numbers, or draft 4's boolean form)."""
    bound, strict = schema.get(name), False
    exclusive = schema.get(strict_name)
    if isinstance(exclusive, bool):
        strict = exclusive and bound is not None
    elif isinstance(exclusive, (int, float)) and not isinstance(exclusive, bool):
        if bound is None or (exclusive >= bound if name == "minimum" else exclusive <= bound):
            bound, strict = exclusive, True
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
        raise Unsatisfiable(f"{name} must be a number")
    return (Decimal(repr(bound)) if bound is not None else None), strict


def number_range(schema: dict, integer: bool) -> str | None:
    """The numerals a bounded ``integer``/``number`` schema allows, or None when it has no bound."""
    low, low_strict = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_strict = _bound(schema, "maximum", "exclusiveMaximum")
    if low is None and high is None:
        return None
    if low is not None and high is not None and (low > high or (low == high and (low_strict or high_strict))):
        raise Unsatisfiable(f"no number is at least {low} and at most {high}")
    options = []
    if low is None or low < 0:  # negative numbers: "-" and their magnitude (zero goes unsigned)
        if high is not None and high < 0:
            magnitude_low, magnitude_low_strict = -high, high_strict
        else:
            magnitude_low, magnitude_low_strict = Decimal(0), True
        magnitude = _unsigned_range(
            magnitude_low, None if low is None else -low, magnitude_low_strict, low is not None and low_strict, integer
        )
        if magnitude is not None:
            options.append(f'"-" {magnitude}')
    if high is None or high > 0 or (high == 0 and not high_strict):
        start, start_strict = (low, low_strict) if low is not None and low >= 0 else (Decimal(0), False)
        unsigned = _unsigned_range(start, high, start_strict, high_strict, integer)
        if unsigned is not None:
            options.append(unsigned)
    if not options:
        raise Unsatisfiable(f"no {'integer' if integer else 'number'} lies in the range")
    return _alternatives(options)


# --- regular expressions (string patterns) --------------------------------------------

CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " "}
NEGATED_ESCAPES = {"D": "0-9", "W": "a-zA-Z0-9_", "S": " \\t\\n\\r"}
ANY_CHARACTER = r'[^"\\\x7F\x00-\x1F]'


class _Pattern:
    """A regular expression (ECMA-262 subset) → a GBNF expression for the JSON string's text.
    Characters that JSON escapes (quote, backslash, control characters) are written escaped."""

    def __init__(self, pattern: str):
        self.text = pattern
        self.position = 0

    def fail(self, what: str) -> Unsatisfiable:
        return Unsatisfiable(f"the pattern {self.text!r} uses {what}, which a grammar cannot express")

    def convert(self) -> str:
        anchored_start = self.text.startswith("^")
        if anchored_start:
            self.position = 1
        body = self.alternation()
        if self.position < len(self.text):
            raise self.fail(f"an unbalanced {self.text[self.position]!r}")
        anchored_end = body.endswith(" $") or body == "$"
        body = body.removesuffix(" $").removesuffix("$").strip()
        any_text = f"{ANY_CHARACTER}*"
        parts = ([] if anchored_start else [any_text]) + ([f"({body})"] if body else []) + ([] if anchored_end else [any_text])
        return " ".join(parts) if parts else '""'

    def alternation(self) -> str:
        options = [self.sequence()]
        while self.peek() == "|":
            self.position += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else "(" + " | ".join(option or '""' for option in options) + ")"

    def peek(self) -> str:
        return self.text[self.position] if self.position < len(self.text) else ""

    def sequence(self) -> str:
        items: list[str] = []
        while self.position < len(self.text) and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(item for item in items if item)

    def atom(self) -> str:
        character = self.text[self.position]
        self.position += 1
        if character == "(":
            if self.text.startswith("?:", self.position):
                self.position += 2
            elif self.peek() == "?":
                raise self.fail("a look-around or named group")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.position += 1
            return f"({inner})" if inner else ""
        if character == "[":
            return self.character_class()
        if character == ".":
            return ANY_CHARACTER
        if character == "$":
            if self.position != len(self.text):
                raise self.fail("'$' before the end")
            return "$"
        if character == "^":
            raise self.fail("'^' inside the pattern")
        if character == "\\":
            return self.escape()
        if character in "*+?{":
            raise self.fail(f"a quantifier {character!r} with nothing before it")
        return _json_text_literal(character)

    def escape(self) -> str:
        character = self.text[self.position] if self.position < len(self.text) else ""
        self.position += 1
        if character == "s":  # JSON writes tabs and newlines escaped
            return '([ ] | "\\t" | "\\n" | "\\r")'
        if character in CLASS_ESCAPES:
            return f"[{CLASS_ESCAPES[character]}]"
        if character in NEGATED_ESCAPES:
            return f'[^{NEGATED_ESCAPES[character]}"\\\\\\x7F\\x00-\\x1F]'
        if character.isdigit() or character in "bBk":
            raise self.fail(f"\\{character}")
        if character in "ntrfv":
            return _json_text_literal({"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}[character])
        if character == "u":
            code = self.text[self.position : self.position + 4]
            self.position += 4
            return _json_text_literal(chr(int(code, 16)))
        return _json_text_literal(character)

    def character_class(self) -> str:
        negated = self.peek() == "^"
        if negated:
            self.position += 1
        parts = []
        first = True
        while self.position < len(self.text) and (self.peek() != "]" or first):
            first = False
            character = self.text[self.position]
            self.position += 1
            if character == "\\":
                escaped = self.text[self.position]
                self.position += 1
                if escaped in CLASS_ESCAPES:
                    parts.append(CLASS_ESCAPES[escaped])
                    continue
                character = {"n": "\n", "t": "\t", "r": "\r"}.get(escaped, escaped)
            if self.peek() == "-" and self.position + 1 < len(self.text) and self.text[self.position + 1] != "]":
                end = self.text[self.position + 1]
                self.position += 2
                if end == "\\":
                    end = self.text[self.position]
                    self.position += 1
                parts.append(f"{_class_char(character)}-{_class_char(end)}")
            else:
                parts.append(_class_char(character))
        if self.peek() != "]":
            raise self.fail("an unclosed character class")
        self.position += 1
        body = "".join(parts)
        if negated:
            return f'[^{body}"\\\\\\x7F\\x00-\\x1F]'
        # a quote or backslash in the class is written escaped in JSON
        plain = body
        for c in '"\\':
            plain = plain.replace(_class_char(c), "")
        options = ([f"[{plain}]"] if plain else []) + [literal("\\" + c) for c in '"\\' if _class_char(c) in body]
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def quantified(self, atom: str) -> str:
        character = self.peek()
        if not atom or atom == "$":
            return atom
        if character in "*+?":
            self.position += 1
            if self.peek() == "?":  # lazy: the same language
                self.position += 1
            return f"{atom}{character}"
        if character == "{":
            match = re.match(r"\{(\d*)(,?)(\d*)\}", self.text[self.position :])
            if not match:
                return atom
            self.position += match.end()
            if self.peek() == "?":
                self.position += 1
            low, comma, high = match.groups()
            low = low or "0"
            return f"{atom}{{{low}}}" if not comma else f"{atom}{{{low},{high}}}"
        return atom


def _class_char(character: str) -> str:
    if character in "]\\^-":
        return "\\" + character
    if ord(character) < 0x20:
        return f"\\x{ord(character):02X}"
    return character


def _json_text_literal(character: str) -> str:
    """A character of a string's value as JSON writes it."""
    return literal(json.dumps(character, ensure_ascii=False)[1:-1])


# --- schemas -----------------------------------------------------------------------


class GrammarBuilder:
    """Builds one GBNF grammar; ``schema_rule`` adds what a schema needs and names its rule."""

    def __init__(self, root_schema: Any = None):
        self.root_schema = root_schema
        self.rules: dict[str, str] = {}
        self.names_by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        """Add a rule (a rule with the same body is reused); returns the rule's name."""
        if body in self.names_by_body:
            return self.names_by_body[body]
        name = self._free_name(name)
        self.rules[name] = body
        self.names_by_body[body] = name
        return name

    def _free_name(self, hint: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-") or "value"
        name, number = base, 1
        while name in self.rules or (name in PRIMITIVES and self.rules.get(name) != PRIMITIVES[name]):
            number += 1
            name = f"{base}-{number}"
        return name

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for needed in PRIMITIVE_NEEDS.get(name, ()):
                self.primitive(needed)
        return name

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    # --- visiting ------------------------------------------------------------------

    def schema_rule(self, schema: Any, hint: str) -> str:
        """A rule name (or short expression) for the JSON values ``schema`` allows."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise Unsatisfiable(f"the schema at {hint!r} is false: no value matches it")
        if not isinstance(schema, dict):
            raise Unsatisfiable(f"the schema at {hint!r} is not an object")
        if "$ref" in schema:
            extra = {key: value for key, value in schema.items() if key not in ("$ref", "$defs", "definitions")}
            target = self._ref_rule(schema["$ref"])
            if not _constraining(extra):
                return target
            return self.schema_rule({"allOf": [self.resolve(schema["$ref"]), extra]}, hint)
        if "allOf" in schema:
            merged = {key: value for key, value in schema.items() if key != "allOf"}
            for part in schema["allOf"]:
                merged = merge_schemas(merged, self._inline(part), hint)
            return self.schema_rule(merged, hint)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                base = {key: value for key, value in schema.items() if key != keyword}
                options, reasons = [], []
                for number, option in enumerate(schema[keyword]):
                    try:
                        combined = merge_schemas(base, self._inline(option), hint) if _constraining(base) else option
                        options.append(self.schema_rule(combined, f"{hint}|{number}"))
                    except Unsatisfiable as error:
                        reasons.append(str(error))
                if not options:
                    raise Unsatisfiable(f"no option of {keyword} at {hint!r} can match: " + "; ".join(reasons))
                return self.add(hint, " | ".join(dict.fromkeys(options)))
        if "const" in schema:
            return self.add(hint, _json_literal(schema["const"]))
        if "enum" in schema:
            values = [value for value in schema["enum"] if _has_type(value, schema.get("type"))]
            if not values:
                raise Unsatisfiable(f"the enum at {hint!r} has no value" + (" of its type" if schema["enum"] else ""))
            return self.add(hint, " | ".join(_json_literal(value) for value in values))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise Unsatisfiable(f"the schema at {hint!r} allows no type")
            options = [self.schema_rule({**schema, "type": one}, f"{hint}|{one}") for one in kind]
            return self.add(hint, " | ".join(dict.fromkeys(options)))
        if kind is None:
            kind = _implied_type(schema)
            if kind is None:
                return self.primitive("value")
        if kind not in TYPES:
            raise Unsatisfiable(f"unknown type {kind!r} at {hint!r}")
        return getattr(self, f"_{kind}")(schema, hint)

    def _inline(self, schema: Any) -> Any:
        if isinstance(schema, dict) and "$ref" in schema:
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            return merge_schemas(self.resolve(schema["$ref"]), rest, schema["$ref"]) if rest else self.resolve(schema["$ref"])
        return schema

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise Unsatisfiable(f"only references inside the schema are followed, not {ref!r}")
        target = self.root_schema
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise Unsatisfiable(f"the reference {ref!r} points to nothing in the schema")
        return target

    def _ref_rule(self, ref: Any) -> str:
        if isinstance(ref, str) and ref in self.refs:
            return self.refs[ref]
        target = self.resolve(ref)
        name = self._free_name("ref-" + (ref.rsplit("/", 1)[-1] if ref != "#" else "root"))
        self.refs[ref] = name
        self.rules[name] = ""  # reserved: a recursive reference finds the name
        body = self.schema_rule(target, name)
        if body == name:
            raise Unsatisfiable(f"the reference {ref!r} only refers to itself")
        self.rules[name] = body
        return name

    # --- one rule per type -----------------------------------------------------------

    def _null(self, schema: dict, hint: str) -> str:
        return self.primitive("null")

    def _boolean(self, schema: dict, hint: str) -> str:
        return self.primitive("boolean")

    def _integer(self, schema: dict, hint: str) -> str:
        bounded = number_range(schema, integer=True)
        return self.primitive("integer") if bounded is None else self.add(hint, bounded)

    def _number(self, schema: dict, hint: str) -> str:
        bounded = number_range(schema, integer=False)
        return self.primitive("number") if bounded is None else self.add(hint, bounded)

    def _string(self, schema: dict, hint: str) -> str:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if high is not None and low > high:
            raise Unsatisfiable(f"minLength {low} exceeds maxLength {high} at {hint!r}")
        if "pattern" in schema:
            return self.add(hint, f'"\\"" {_Pattern(schema["pattern"]).convert()} "\\""')
        if schema.get("format") in FORMATS:
            return self.add(hint, f'"\\"" {FORMATS[schema["format"]]} "\\""')
        if low == 0 and high is None:
            return self.primitive("string")
        self.primitive("char")
        repeat = f"{{{low},{'' if high is None else high}}}"
        return self.add(hint, f'"\\"" char{repeat} "\\""')

    def _array(self, schema: dict, hint: str) -> str:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4 tuples
            prefix, items = items, schema.get("additionalItems", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high is not None and low > high:
            raise Unsatisfiable(f"minItems {low} exceeds maxItems {high} at {hint!r}")
        positions = []  # the prefix items' rules, as far as they can be satisfied
        for number, item in enumerate(prefix or []):
            if high is not None and number >= high:
                break
            try:
                positions.append(self.schema_rule(item, f"{hint}[{number}]"))
            except Unsatisfiable:
                if number < low:
                    raise
                high = number
                break
        more_low = max(low - len(positions), 0)
        more_high = None if high is None else high - len(positions)
        item_rule = None
        if items is not False and more_high != 0:
            try:
                item_rule = self.schema_rule(items, f"{hint}[]")
            except Unsatisfiable:
                if more_low:
                    raise
        if item_rule is None and more_low:
            raise Unsatisfiable(f"the array at {hint!r} needs {low} items but allows {len(positions)}")
        space = self.primitive("space")
        separator = f'"," {space}'
        # nested from the end: an item may be there only if all before it are
        rest = ""
        if item_rule is not None:
            repeat = f"{{{more_low},{'' if more_high is None else more_high}}}"
            rest = f"({separator} {item_rule}){repeat}" if repeat != "{0,}" else f"({separator} {item_rule})*"
        first_rest = ""
        if not positions and item_rule is not None:
            if more_low:
                tail = f"{{{more_low - 1},{'' if more_high is None else more_high - 1}}}"
                first_rest = f"{item_rule} ({separator} {item_rule}){tail}"
            else:
                tail = "*" if more_high is None else f"{{0,{more_high - 1}}}"
                first_rest = f"({item_rule} ({separator} {item_rule}){tail})?"
        for number in reversed(range(len(positions))):
            lead = "" if number == 0 else f"{separator} "
            part = f"{lead}{positions[number]} {rest}".strip()
            rest = part if number < low else f"({part})?"
            if number and rest:
                rest = self.add(f"{hint}-from-{number}", rest)
        body = rest if positions else first_rest
        return self.add(hint, " ".join(f'"[" {space} {body} {space} "]"'.split()))

    def _object(self, schema: dict, hint: str) -> str:
        properties = schema.get("properties", {})
        required = list(dict.fromkeys(schema.get("required", [])))
        additional = schema.get("additionalProperties", None if properties else True)
        if not properties and not required and additional is True:
            return self.primitive("object")
        space = self.primitive("space")
        members = []
        for name, property_schema in properties.items():
            try:
                value = self.schema_rule(property_schema, f"{hint}.{name}")
            except Unsatisfiable:
                if name in required:
                    raise
                continue
            members.append((self.add(f"{hint}-{name}-kv", f'{_json_literal(name)} ":" {space} {value}'), name in required))
        for name in required:
            if name in properties:
                continue
            if additional is False or additional is None:
                raise Unsatisfiable(f"the object at {hint!r} requires {name!r}, which its properties do not allow")
            value = self.schema_rule(additional if isinstance(additional, dict) else True, f"{hint}.{name}")
            members.append((self.add(f"{hint}-{name}-kv", f'{_json_literal(name)} ":" {space} {value}'), True))
        extra = None
        if additional not in (None, False):
            value = self.schema_rule(additional if isinstance(additional, dict) else True, f"{hint}.*")
            extra = self.add(f"{hint}-additional-kv", f'{self.primitive("string")} ":" {space} {value}')
        body = self._members(members, extra, hint)
        return self.add(hint, " ".join(f'"{{" {space} {body} {space} "}}"'.split()))

    def _members(self, members: list[tuple[str, bool]], extra: str | None, hint: str) -> str:
        """An object's members in order, each ``(rule, required)``; optional ones may be
        left out, then any number of ``extra`` ones. Where a comma goes depends on whether
        a member came before, so this is built from the end with two expressions: the
        members from here on after one came before (``after``) and before any (``first``)."""
        separator = f'"," {self.primitive("space")}'
        after = f"({separator} {extra})*" if extra else ""
        first = f"({extra} {after})?" if extra else ""
        for number in reversed(range(len(members))):
            rule, required = members[number]
            with_before = f"{separator} {rule} {after}".strip()
            without_before = f"{rule} {after}".strip()
            if required:
                after, first = with_before, without_before
            else:
                after = f"({with_before} | {after})" if after else f"({with_before})?"
                first = f"({without_before} | {first})" if first else f"({without_before})?"
            if number and not members[number - 1][1]:  # an optional member before uses each twice
                after = self.add(f"{hint}-after-{number}", after)
                first = self.add(f"{hint}-first-{number}", first)
        return first


def _constraining(schema: dict) -> bool:
    return any(key not in ("title", "description", "default", "examples", "$comment", "$schema", "$id") for key in schema)


def _implied_type(schema: dict) -> str | None:
    if any(key in schema for key in ("properties", "additionalProperties", "required")):
        return "object"
    if any(key in schema for key in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(key in schema for key in ("minLength", "maxLength", "pattern", "format")):
        return "string"
    if any(key in schema for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _has_type(value: Any, kind: Any) -> bool:
    if kind is None:
        return True
    kinds = kind if isinstance(kind, list) else [kind]
    checks = {
        "null": value is None,
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }
    return any(checks.get(one, False) for one in kinds)


def _types(schema: dict) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    return set(kind if isinstance(kind, list) else [kind])


def merge_schemas(first: Any, second: Any, hint: str) -> dict:
    """One schema that both match (``allOf``): properties and ``required`` united, bounds
    tightened, types and ``enum`` intersected. Raises :class:`Unsatisfiable` when nothing
    can match both, or for a combination a grammar cannot express."""
    if first is True or first is None:
        first = {}
    if second is True:
        second = {}
    if first is False or second is False:
        raise Unsatisfiable(f"allOf at {hint!r} includes false")
    if not isinstance(first, dict) or not isinstance(second, dict):
        raise Unsatisfiable(f"allOf at {hint!r} holds something that is not a schema")
    merged = dict(first)
    for key, value in second.items():
        if key not in merged:
            merged[key] = value
            continue
        mine = merged[key]
        if key == "type":
            ours, theirs = _types(first) or set(TYPES), _types(second) or set(TYPES)
            both = ours & theirs
            if "number" in ours and "integer" in theirs or "integer" in ours and "number" in theirs:
                both.add("integer")
            if not both:
                raise Unsatisfiable(f"allOf at {hint!r} asks for types {sorted(ours)} and {sorted(theirs)} at once")
            merged[key] = sorted(both) if len(both) > 1 else both.pop()
        elif key == "properties":
            merged[key] = {
                name: merge_schemas(mine[name], value[name], f"{hint}.{name}") if name in mine and name in value
                else (mine.get(name) if name in mine else value[name])
                for name in {**mine, **value}
            }  # fmt: skip
        elif key == "required":
            merged[key] = list(dict.fromkeys([*mine, *value]))
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            merged[key] = max(mine, value) if not isinstance(mine, bool) else mine or value
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            merged[key] = min(mine, value) if not isinstance(mine, bool) else mine or value
        elif key == "enum":
            common = [item for item in mine if item in value]
            if not common:
                raise Unsatisfiable(f"allOf at {hint!r} has enums with no value in common")
            merged[key] = common
        elif key == "const":
            if mine != value:
                raise Unsatisfiable(f"allOf at {hint!r} asks for two different constants")
        elif key in ("items", "additionalProperties") and isinstance(mine, dict) and isinstance(value, dict):
            merged[key] = merge_schemas(mine, value, f"{hint}.{key}")
        elif key in ("items", "additionalProperties") and (mine is False or value is False):
            merged[key] = False
        elif key in ("title", "description", "default", "examples", "$comment"):
            continue
        elif mine != value:
            raise Unsatisfiable(f"allOf at {hint!r} combines two different {key!r}, which a grammar cannot express")
    if "const" in merged and "enum" in merged and merged["const"] not in merged["enum"]:
        raise Unsatisfiable(f"allOf at {hint!r}: the constant is not in the enum")
    return merged


def _refuse(error: Unsatisfiable, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"the JSON schema cannot be satisfied or expressed: {error}", param=param)


def json_schema_gbnf(schema: Any, *, param: str = "response_format") -> str:
    """A grammar whose sentences are the JSON texts ``schema`` allows (a 400 naming
    ``param`` for a schema no value matches)."""
    builder = GrammarBuilder(schema)
    try:
        return builder.text(builder.schema_rule(schema, "$"))
    except Unsatisfiable as error:
        raise _refuse(error, param) from None
    except (RecursionError, ValueError, TypeError, KeyError, IndexError) as error:
        raise InvalidRequestError(f"the JSON schema is not valid: {type(error).__name__}: {error}", param=param) from None


def tool_call_gbnf(setup: "ToolSetup", *, after: str = "") -> str:
    """A grammar forcing calls of the setup's forced functions (all of them when none is
    forced) in its format, with arguments matching each function's parameters: one call,
    or with ``parallel`` one or more. ``after``: text already written (an auto-mode
    trigger), left out of the grammar's start."""
    tool_format = setup.format
    builder = GrammarBuilder()
    names = setup.forced if setup.forced is not None else tuple(setup.functions)
    calls = []
    first_calls = []
    try:
        for number, name in enumerate(names):
            schema = setup.functions[name]
            builder.root_schema = schema
            builder.refs = {}
            if tool_format.json_arguments:
                arguments = builder.schema_rule(schema, f"{name}.arguments")
            else:
                arguments = _xml_parameters(builder, schema, name)
            begin, end = tool_format.call_text(name)
            call = builder.add(f"call-{number}", f"{literal(begin)} {arguments} {literal(end)}")
            calls.append(call)
            if after:
                if not begin.startswith(after):
                    raise Unsatisfiable(f"the call format does not start with {after!r}")
                rest = begin[len(after) :]
                first_calls.append(builder.add(f"first-call-{number}", f"{literal(rest) if rest else ''} {arguments} {literal(end)}".strip()))
    except Unsatisfiable as error:
        raise InvalidRequestError(f"the parameters of a tool cannot be satisfied or expressed: {error}", param="tools") from None
    call_rule = builder.add("call", " | ".join(calls))
    first_rule = builder.add("first-call", " | ".join(first_calls)) if after else call_rule
    list_begin = "" if after else tool_format.grammar_list_begin
    more = f"({literal(tool_format.list_separator)} {call_rule})*" if setup.parallel else ""
    root = " ".join(part for part in [literal(list_begin) if list_begin else "", first_rule, more,
                                      literal(tool_format.list_end) if tool_format.list_end else ""] if part)  # fmt: skip
    return builder.text(root)


def _xml_parameters(builder: GrammarBuilder, schema: dict, name: str) -> str:
    """Qwen3-Coder's parameters: ``<parameter=KEY>\nVALUE\n</parameter>\n`` per property;
    a string value is raw text (without ``<``), others JSON."""
    pieces = []
    required = set(schema.get("required", []))
    for key, property_schema in schema.get("properties", {}).items():
        property_schema = property_schema if isinstance(property_schema, dict) else {}
        if property_schema.get("type", "string") != "string":
            value = builder.schema_rule(property_schema, f"{name}.{key}")
        elif "enum" in property_schema or "const" in property_schema:
            options = property_schema.get("enum", [property_schema.get("const")])
            value = builder.add(f"{name}.{key}", " | ".join(literal(str(option)) for option in options))
        else:
            value = builder.add("xml-text", "[^<]*")
        opening, closing = literal(f"<parameter={key}>\n"), literal("\n</parameter>\n")
        rule = builder.add(f"{name}-{key}-parameter", f"{opening} {value} {closing}")
        pieces.append(rule if key in required else f"{rule}?")
    return " ".join(pieces) if pieces else '""'
