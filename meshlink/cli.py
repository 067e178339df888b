"""The command line: parses arguments and hands off to runtime; prints one line per error."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    del argv
    print("meshlink: not implemented yet", file=sys.stderr)
    return 2
