"""Logging setup: one ``key=value`` line per record on stderr (logfmt), quiet by default.

``ts=2026-11-25T03:35:06.120Z level=warning logger=lllms.pool msg="instance failed to load" model=m1``

Fields passed with ``extra={...}`` are added as keys, so a log line can be filtered
by model or request without parsing its message.
"""

from __future__ import annotations

import logging
import sys
import time

# attributes every LogRecord has; anything else on a record came from ``extra``
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _value(value: object) -> str:
    text = str(value)
    if text and not any(char in text for char in ' ="\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {
            "ts": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class _LllmsHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_logging(level: str | int = "warning") -> None:
    """Log records at ``level`` and above (a name such as ``"info"`` or a number) to
    stderr as logfmt lines. Calling it again changes the level."""
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"unknown log level {level!r} (use debug, info, warning or error)")
        level = number
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LllmsHandler)]:
        root.removeHandler(handler)
    handler = _LllmsHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level)
