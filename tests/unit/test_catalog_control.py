"""The control codec: messages split to fit control frames losing nothing; decode refuses
what is not a message."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlink.catalog.control import (
    CONTROL_LIMIT,
    RenewAnswer,
    RenewRequest,
    Unlink,
    Update,
    decode,
    encode,
)
from meshlink.catalog.records import Endpoint, ExportRecord, Port, ServiceType
from meshlink.catalog.sync import Catalog
from meshlink.errors import CatalogError
from meshlink.proto import MAX_CONTROL


def big_record(i: int) -> ExportRecord:
    return ExportRecord(
        origin="a",
        namespace="ns",
        name=f"s{i}",
        type=ServiceType.HEADLESS,
        ports=(Port(80, "TCP", "http"),),
        created=1.0,
        version=1,
        endpoints=tuple(
            Endpoint((f"10.{i}.{j // 250}.{j % 250 + 1}",), f"pod-{j}") for j in range(300)
        ),
    )


def test_large_snapshot_is_split_and_nothing_is_lost() -> None:
    a = Catalog("a")
    a.set_local([big_record(i) for i in range(40)])
    sent = a.peer_up("b")
    parts = [p for s in sent for p in encode(s.message, limit=64 * 1024)]
    assert all(len(p) <= 64 * 1024 for p in parts)
    assert len(parts) > len(sent)  # the snapshot really was split
    b = Catalog("b")
    b.peer_up("a")
    for p in parts:
        msg = decode(p)
        assert isinstance(msg, Update)
        _, refused = b.receive("a", msg)
        assert refused == []
    assert len(b.services()) == 40
    assert {len(r[0].endpoints) for r in b.services().values()} == {300}


def test_single_oversized_entry_is_dropped_not_sent() -> None:
    entry = {"path": ["a"], "blob": "x" * 100}
    msg = {"t": "update", "add": [entry]}
    assert encode(Update((entry,)), limit=50) == []
    assert encode(Update((entry,)), limit=500) == [json.dumps(msg, separators=(",", ":")).encode()]


def test_the_limit_fits_a_control_frame() -> None:
    assert CONTROL_LIMIT <= MAX_CONTROL


@settings(max_examples=80, deadline=None)
@given(
    adds=st.lists(st.text('ab"é', max_size=40), max_size=30),
    dels=st.lists(st.tuples(*[st.text("xyz", max_size=8)] * 3), max_size=30),
    limit=st.integers(min_value=400, max_value=3000),
)
def test_any_split_keeps_every_item_in_order_within_the_limit(
    adds: list[str], dels: list[tuple[str, str, str]], limit: int
) -> None:
    parts = encode(Update(tuple({"x": a} for a in adds), tuple(dels)), limit=limit)
    assert all(len(p) <= limit for p in parts)
    got = [decode(p) for p in parts]
    assert all(isinstance(m, Update) for m in got)
    assert [a for m in got if isinstance(m, Update) for a in m.add] == [{"x": a} for a in adds]
    assert [k for m in got if isinstance(m, Update) for k in m.delete] == dels


def test_renewal_and_unlink_messages_round_trip() -> None:
    for msg in (RenewRequest("-----BEGIN CSR-----"), RenewAnswer("-----BEGIN CERT-----"), Unlink()):
        (frame,) = encode(msg)
        assert decode(frame) == msg
    assert encode(Unlink()) == [b'{"t":"unlink"}']
    assert encode(RenewRequest("x")) == [b'{"t":"renew","csr":"x"}']
    assert encode(RenewAnswer("y")) == [b'{"t":"renewed","cert":"y"}']


def test_an_empty_update_is_not_sent() -> None:
    assert encode(Update()) == []


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\xff", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"t": "bogus"}', "unknown control message type 'bogus'"),
        (b'{"t": "update", "add": {}}', "must be lists"),
        (b'{"t": "renew"}', "renew without a CSR"),
        (b'{"t": "renew", "csr": "' + b"x" * 20000 + b'"}', "renew without a CSR"),
        (b'{"t": "renewed", "cert": 1}', "renewed without a certificate"),
    ],
)
def test_decode_refuses_what_is_not_a_message(payload: bytes, why: str) -> None:
    with pytest.raises(CatalogError, match=why):
        decode(payload)


def test_malformed_withdrawal_keys_are_skipped() -> None:
    msg = decode(b'{"t": "update", "del": [["a", "b", "c"], ["a"], [1, 2, 3], "x"]}')
    assert msg == Update((), (("a", "b", "c"),))
