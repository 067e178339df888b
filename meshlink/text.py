"""Text for people: the tables and timestamps the CLI prints (`meshlink status`, `meshlink
token|link|peer list`), written one way."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows (the first one the header) as aligned lines, trailing spaces trimmed."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def timestamp(unix: float) -> str:
    """``2026-01-02 03:04:05Z``; ``-`` for 0 (never)."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if unix else "-"
