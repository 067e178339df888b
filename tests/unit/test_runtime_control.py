"""Catalog messages are split to fit control frames, losing nothing."""

import json

from meshlink.catalog.records import Endpoint, ExportRecord, Port, ServiceType
from meshlink.catalog.sync import Catalog
from meshlink.runtime import encode_control


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
    parts = [p for s in sent for p in encode_control(s.message, limit=64 * 1024)]
    assert all(len(p) <= 64 * 1024 for p in parts)
    assert len(parts) > len(sent)  # the snapshot really was split
    b = Catalog("b")
    b.peer_up("a")
    for p in parts:
        _, refused = b.receive("a", json.loads(p))
        assert refused == []
    assert len(b.services()) == 40
    assert {len(r[0].endpoints) for r in b.services().values()} == {300}


def test_single_oversized_entry_is_dropped_not_sent() -> None:
    msg = {"t": "update", "add": [{"path": ["a"], "blob": "x" * 100}]}
    assert encode_control(msg, limit=50) == []
    assert encode_control(msg, limit=500) == [json.dumps(msg, separators=(",", ":")).encode()]
