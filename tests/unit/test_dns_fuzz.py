"""Hypothesis against ``answer``: random bytes and mutated valid queries never raise, and
every reply parses (or the packet is dropped)."""

from __future__ import annotations

from dnslib import EDNS0, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlink.catalog.records import Endpoint, Port
from meshlink.dns.answer import answer, compute
from meshlink.dns.snapshot import build_snapshot
from tests.dnsview import clusterset_ip, headless

SNAP = build_snapshot(
    [
        clusterset_ip(
            "web", ("10.0.0.1", "fd00::1"), (Port(80, "TCP", "http"), Port(53, "UDP", "dns"))
        ),
        headless(
            "db",
            (Port(5432, "TCP", "pg"),),
            {"east": (Endpoint((f"10.1.0.{i}",), f"db-{i}") for i in range(1, 40))},
        ),
    ]
)

NAMES = [
    "web.default.svc.clusterset.local",
    "db.default.svc.clusterset.local",
    "_pg._tcp.db.default.svc.clusterset.local",
    "db-1.east.db.default.svc.clusterset.local",
    "dns-version.clusterset.local",
    "clusterset.local",
    "nope.clusterset.local",
    "example.com",
]
TYPES = ["A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "MX"]


def _valid(name: str, qtype: str, edns: int | None) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def _check(packet: bytes) -> None:
    for tcp in (False, True):
        reply = answer(packet, SNAP, tcp=tcp)
        if reply is None:
            assert compute(packet, SNAP, tcp=tcp)[0] is None
            continue
        assert reply[:2] == packet[:2]
        assert reply[2] & 0x80  # QR
        DNSRecord.parse(reply)
        if not tcp:
            assert len(reply) <= 1232


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(packet: bytes) -> None:
    _check(packet)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    qtype=st.sampled_from(TYPES),
    edns=st.none() | st.integers(0, 65535),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 120),
    tail=st.binary(max_size=20),
)
def test_mutated_valid_queries_never_raise(
    name: str,
    qtype: str,
    edns: int | None,
    edits: list[tuple[int, int]],
    cut: int | None,
    tail: bytes,
) -> None:
    packet = bytearray(_valid(name, qtype, edns))
    for pos, value in edits:
        if pos < len(packet):
            packet[pos] = value
    data = bytes(packet[:cut] if cut is not None else packet) + tail
    _check(data)


@settings(max_examples=300, deadline=None)
@given(header=st.binary(min_size=12, max_size=12), rest=st.binary(max_size=64))
def test_a_readable_header_always_gets_an_answer_unless_it_is_a_response(
    header: bytes, rest: bytes
) -> None:
    reply = answer(header + rest, SNAP)
    if header[2] & 0x80:
        assert reply is None
    else:
        assert reply is not None
        assert reply[:2] == header[:2]


@settings(max_examples=800, deadline=None)
@given(
    labels=st.lists(st.binary(min_size=1, max_size=63), max_size=8),
    in_zone=st.booleans(),
    qtype=st.integers(0, 65535),
    qclass=st.sampled_from([1, 3, 254, 255]) | st.integers(0, 65535),
    flags=st.integers(0, 0x7FFF),
)
def test_random_wire_names_never_raise(
    labels: list[bytes], in_zone: bool, qtype: int, qclass: int, flags: int
) -> None:
    if in_zone:
        labels = [*labels, b"clusterset", b"local"]
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    packet = (0x4242).to_bytes(2, "big") + flags.to_bytes(2, "big") + b"\x00\x01" + bytes(6)
    packet += name + qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big")
    _check(packet)
    reply = answer(packet, SNAP)
    assert reply is not None
    assert DNSRecord.parse(reply).header.rcode != 2  # never SERVFAIL: we know every case
