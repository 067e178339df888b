"""Pure pieces of the hardening: the new-flow token bucket, and text-log escaping."""

from __future__ import annotations

import logging

import pytest

from meshlink.log import TextFormatter, escape_text
from meshlink.tunnel.ratelimit import TokenBucket


def test_token_bucket_allows_its_burst_then_its_rate() -> None:
    b = TokenBucket(rate=4, burst=3, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(100.125)  # half a token
    assert b.take(100.25)
    assert not b.take(100.25)
    assert [b.take(200.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_token_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0, burst=1, now=0)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text, é and ✓", "plain text, é and ✓"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x1b[31mred\x00\x7f\x85", "\\x1b[31mred\\x00\\x7f\\x85"),
        ("line\u2028sep\u2029para", "line\\u2028sep\\u2029para"),
    ],
)
def test_escape_text(raw: str, escaped: str) -> None:
    assert escape_text(raw) == escaped


def test_text_formatter_keeps_a_record_on_one_line_but_keeps_tracebacks() -> None:
    fmt = TextFormatter("%(levelname)s %(message)s")
    rec = logging.makeLogRecord(
        {"msg": "peer said %s", "args": ("\nFAKE",), "levelname": "INFO", "levelno": 20}
    )
    assert fmt.format(rec) == "INFO peer said \\nFAKE"
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        rec.exc_info = (type(e), e, e.__traceback__)
    assert "\nTraceback" in fmt.format(rec)
