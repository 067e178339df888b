"""Logging setup: text or JSON lines on stderr. Nothing here may ever log a secret.

Text lines are one line per message whatever the message holds: peers and clients choose
some of the text we log (a GOAWAY reason, a reset reason, a name), so control characters,
DEL, C1 controls and Unicode line separators in a message are written as escapes
(``\\n``, ``\\x1b``, ``\\u2028``), and nobody can forge a line or colour a terminal.
JSON lines are safe by construction (``json.dumps`` escapes them). A traceback appended
to a message (bugs only) keeps its lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Final

_RESERVED: Final = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_text(text: str) -> str:
    """``text`` with every character that could end or restyle a log line escaped."""
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """The text format: the message escaped by ``escape_text``, so it stays one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_text(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(
            (k, v) for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")
        )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text", site: str | None = None) -> None:
    """Configure the root logger once for a process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{site}] " if site else ""
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)-5s {prefix}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
