"""The multicluster DNS specification, checkbox by checkbox, against the sans-IO ``answer``.

Queries are built and replies parsed with dnslib; no sockets. The integration tests ask
the same questions of the real server with dig, kdig and dnspython.
"""

from __future__ import annotations

import dataclasses
import importlib
import struct
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSLabel, DNSQuestion, DNSRecord

from meshlink.catalog.records import Endpoint, Port, ServiceType
from meshlink.catalog.view import ClusterEndpoints, ImportedService
from meshlink.dns.answer import answer, compute
from meshlink.dns.snapshot import (
    NEGATIVE_CACHE_ENTRIES,
    Snapshot,
    SnapshotBuilder,
    build_snapshot,
    dashed_ip,
)
from tests.dnsview import clusterset_ip, headless

Z = "clusterset.local"


def services() -> list[ImportedService]:
    return [
        clusterset_ip(
            "web",
            ("10.0.0.1", "fd00::1"),
            (
                Port(80, "TCP", "http"),
                Port(42, "TCP", "x"),
                Port(42, "UDP", "y"),
                Port(8080, "TCP"),
            ),
            ("east", "west"),
        ),
        clusterset_ip("v4only", ("10.0.0.2",), (Port(80),)),
        headless(
            "db",
            (Port(5432, "TCP", "pg"),),
            {
                "east": (
                    Endpoint(("10.1.2.3",)),
                    Endpoint(("10.1.2.4", "fd00::4"), "db-1"),
                    Endpoint(("10.1.2.5",), "db-2", ready=False),
                ),
                "west": (Endpoint(("fd00::1",)),),
            },
        ),
        headless(
            "empty",
            (Port(80, "TCP", "http"),),
            {"east": (Endpoint(("10.1.2.9",), "e-0", ready=False),)},
        ),
    ]


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    return build_snapshot(services())


def query(
    name: str,
    qtype: str = "A",
    *,
    edns: int | None = None,
    rd: bool = True,
    qid: int = 0x1234,
) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    q.header.rd = int(rd)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def ask(snap: Snapshot, name: str, qtype: str = "A", **kw: object) -> DNSRecord:
    max_udp = kw.pop("max_udp", 1232)
    tcp = kw.pop("tcp", False)
    raw = answer(query(name, qtype, **kw), snap, max_udp=max_udp, tcp=tcp)  # type: ignore[arg-type]
    assert raw is not None
    return DNSRecord.parse(raw)


def rdatas(r: DNSRecord, qtype: str) -> list[str]:
    return sorted(str(rr.rdata) for rr in r.rr if rr.rtype == getattr(QTYPE, qtype))


def rcode(r: DNSRecord) -> str:
    return str(RCODE[r.header.rcode])


def assert_soa_authority(r: DNSRecord, ttl: int = 5, zone: str = Z) -> None:
    assert r.rr == []
    assert len(r.auth) == 1
    soa = r.auth[0]
    assert soa.rtype == QTYPE.SOA
    assert str(soa.rname) == zone + "."
    assert soa.ttl == ttl


# --- the spec's checkboxes ----------------------------------------------------------------


def test_dns_version_txt(snap: Snapshot) -> None:
    r = ask(snap, f"dns-version.{Z}", "TXT")
    assert rcode(r) == "NOERROR"
    assert rdatas(r, "TXT") == ['"1.0.0"']
    assert r.header.aa == 1


def test_a_starting_site_answers_servfail_not_nxdomain() -> None:
    """Before its first import view a site does not know what exists: it does not deny a
    name (resolvers cache NXDOMAIN), it fails the query; the zone's own names answer."""
    from meshlink.dns.snapshot import SnapshotBuilder

    starting = SnapshotBuilder(zone=Z).build((), complete=False)
    r = ask(starting, f"web.shop.svc.{Z}")
    assert rcode(r) == "SERVFAIL"
    assert (r.header.aa, r.rr, r.auth) == (0, [], [])
    assert rdatas(ask(starting, f"dns-version.{Z}", "TXT"), "TXT") == ['"1.0.0"']
    assert rcode(ask(starting, "example.com")) == "REFUSED"
    assert rcode(ask(SnapshotBuilder(zone=Z).build(()), f"web.shop.svc.{Z}")) == "NXDOMAIN"


def test_clustersetip_a_and_aaaa(snap: Snapshot) -> None:
    assert rdatas(ask(snap, f"web.default.svc.{Z}", "A"), "A") == ["10.0.0.1"]
    assert rdatas(ask(snap, f"web.default.svc.{Z}", "AAAA"), "AAAA") == ["fd00::1"]


def test_clustersetip_single_family_gives_nodata_for_the_other(snap: Snapshot) -> None:
    r = ask(snap, f"v4only.default.svc.{Z}", "AAAA")
    assert rcode(r) == "NOERROR"
    assert_soa_authority(r)


def test_clustersetip_srv_for_named_ports(snap: Snapshot) -> None:
    r = ask(snap, f"_http._tcp.web.default.svc.{Z}", "SRV")
    assert rdatas(r, "SRV") == [f"0 100 80 web.default.svc.{Z}."]
    assert rdatas(ask(snap, f"_x._tcp.web.default.svc.{Z}", "SRV"), "SRV") == [
        f"0 100 42 web.default.svc.{Z}."
    ]
    assert rdatas(ask(snap, f"_y._udp.web.default.svc.{Z}", "SRV"), "SRV") == [
        f"0 100 42 web.default.svc.{Z}."
    ]
    # The additional section may carry the target's addresses.
    assert sorted(str(a.rdata) for a in r.ar) == ["10.0.0.1", "fd00::1"]


def test_clustersetip_unnamed_port_has_no_srv(snap: Snapshot) -> None:
    # Port 8080 has no name: no _<port>._tcp name for it (the protocol label exists as an
    # empty non-terminal because named ports live below it).
    assert rcode(ask(snap, f"_8080._tcp.web.default.svc.{Z}", "SRV")) == "NXDOMAIN"
    assert rcode(ask(snap, f"_._tcp.web.default.svc.{Z}", "SRV")) == "NXDOMAIN"
    assert rcode(ask(snap, f"_http._udp.web.default.svc.{Z}", "SRV")) == "NXDOMAIN"


def test_clustersetip_srv_on_bare_name_one_per_distinct_port(snap: Snapshot) -> None:
    r = ask(snap, f"web.default.svc.{Z}", "SRV")
    # tcp/42 and udp/42 give one record; the unnamed 8080 is there too.
    assert rdatas(r, "SRV") == [
        f"0 100 42 web.default.svc.{Z}.",
        f"0 100 80 web.default.svc.{Z}.",
        f"0 100 8080 web.default.svc.{Z}.",
    ]


def test_headless_a_aaaa_over_ready_endpoints_of_all_clusters(snap: Snapshot) -> None:
    a = ask(snap, f"db.default.svc.{Z}", "A")
    aaaa = ask(snap, f"db.default.svc.{Z}", "AAAA")
    assert rdatas(a, "A") == ["10.1.2.3", "10.1.2.4"]  # 10.1.2.5 is not ready
    assert rdatas(aaaa, "AAAA") == ["fd00::1", "fd00::4"]  # east and west


def test_headless_dual_stack_a_and_aaaa_cover_the_same_endpoints() -> None:
    eps = tuple(Endpoint((f"10.9.0.{i}", f"fd00:9::{i}"), f"p-{i}") for i in range(1, 6))
    svc = ImportedService(
        "ds", "pods", ServiceType.HEADLESS, (), (Port(80),), (ClusterEndpoints("c1", eps),)
    )
    s = build_snapshot([svc])
    a = rdatas(ask(s, f"pods.ds.svc.{Z}", "A"), "A")
    aaaa = rdatas(ask(s, f"pods.ds.svc.{Z}", "AAAA"), "AAAA")
    assert [x.rsplit(".", 1)[1] for x in a] == [x.rsplit(":", 1)[1] for x in aaaa]
    assert len(a) == 5
    for i in range(1, 6):
        one = ask(s, f"p-{i}.c1.pods.ds.svc.{Z}", "AAAA")
        assert rdatas(one, "AAAA") == [f"fd00:9::{i}"]


def test_headless_without_ready_endpoints_is_nxdomain(snap: Snapshot) -> None:
    for qtype in ("A", "AAAA", "SRV"):
        r = ask(snap, f"empty.default.svc.{Z}", qtype)
        assert rcode(r) == "NXDOMAIN"
        assert_soa_authority(r)
    assert rcode(ask(snap, f"_http._tcp.empty.default.svc.{Z}", "SRV")) == "NXDOMAIN"
    assert rcode(ask(snap, f"e-0.east.empty.default.svc.{Z}", "A")) == "NXDOMAIN"


def test_headless_per_endpoint_names_hostname_else_dashed_ip(snap: Snapshot) -> None:
    one = f"db-1.east.db.default.svc.{Z}"
    assert rdatas(ask(snap, one, "A"), "A") == ["10.1.2.4"]
    assert rdatas(ask(snap, one, "AAAA"), "AAAA") == ["fd00::4"]
    assert rdatas(ask(snap, f"10-1-2-3.east.db.default.svc.{Z}", "A"), "A") == ["10.1.2.3"]
    assert rdatas(ask(snap, f"fd00--1.west.db.default.svc.{Z}", "AAAA"), "AAAA") == ["fd00::1"]
    # Not ready: no name; wrong cluster: no name.
    assert rcode(ask(snap, f"db-2.east.db.default.svc.{Z}", "A")) == "NXDOMAIN"
    assert rcode(ask(snap, f"db-1.west.db.default.svc.{Z}", "A")) == "NXDOMAIN"


def test_dashed_ip_forms() -> None:
    assert dashed_ip("10.1.2.3") == "10-1-2-3"
    assert dashed_ip("fd00::1") == "fd00--1"
    assert dashed_ip("fd00:0:0:0:0:0:0:1") == "fd00--1"
    assert dashed_ip("2001:db8:1:2:3:4:5:6") == "2001-db8-1-2-3-4-5-6"


def test_headless_srv_per_endpoint_and_named_port(snap: Snapshot) -> None:
    r = ask(snap, f"_pg._tcp.db.default.svc.{Z}", "SRV")
    assert rdatas(r, "SRV") == [
        f"0 100 5432 10-1-2-3.east.db.default.svc.{Z}.",
        f"0 100 5432 db-1.east.db.default.svc.{Z}.",
        f"0 100 5432 fd00--1.west.db.default.svc.{Z}.",
    ]
    glue = sorted((str(a.rname), str(a.rdata)) for a in r.ar)
    assert (f"db-1.east.db.default.svc.{Z}.", "fd00::4") in glue
    assert len(glue) == 4


def test_headless_srv_on_bare_name_one_per_endpoint(snap: Snapshot) -> None:
    r = ask(snap, f"db.default.svc.{Z}", "SRV")
    assert len(rdatas(r, "SRV")) == 3
    assert {str(rr.rdata.target) for rr in r.rr} == {
        f"10-1-2-3.east.db.default.svc.{Z}.",
        f"db-1.east.db.default.svc.{Z}.",
        f"fd00--1.west.db.default.svc.{Z}.",
    }


def test_headless_srv_n_endpoints_times_m_named_ports() -> None:
    eps = tuple(Endpoint((f"10.2.0.{i}",), f"h{i}") for i in range(3))
    svc = ImportedService(
        "n",
        "s",
        ServiceType.HEADLESS,
        (),
        (Port(80, "TCP", "http"), Port(443, "TCP", "https"), Port(9, "UDP")),
        (ClusterEndpoints("a", eps), ClusterEndpoints("b", eps[:1])),
    )
    s = build_snapshot([svc])
    assert len(rdatas(ask(s, f"_http._tcp.s.n.svc.{Z}", "SRV"), "SRV")) == 4
    assert len(rdatas(ask(s, f"_https._tcp.s.n.svc.{Z}", "SRV"), "SRV")) == 4
    assert rcode(ask(s, f"_9._udp.s.n.svc.{Z}", "SRV")) == "NXDOMAIN"


def test_ttl_default_is_5_and_configurable() -> None:
    for ttl in (5, 30):
        s = build_snapshot(services(), ttl=ttl) if ttl != 5 else build_snapshot(services())
        for name, qtype in (
            (f"web.default.svc.{Z}", "A"),
            (f"db.default.svc.{Z}", "AAAA"),
            (f"_pg._tcp.db.default.svc.{Z}", "SRV"),
            (f"dns-version.{Z}", "TXT"),
        ):
            r = ask(s, name, qtype)
            assert r.rr
            assert {rr.ttl for rr in [*r.rr, *r.ar]} == {ttl}
        assert_soa_authority(ask(s, f"nope.default.svc.{Z}"), ttl=ttl)


def test_forbidden_clusterid_form_never_resolves(snap: Snapshot) -> None:
    # ClusterSetIP: the name does not exist at all.
    for qtype in ("A", "AAAA", "SRV", "ANY"):
        r = ask(snap, f"east.web.default.svc.{Z}", qtype)
        assert rcode(r) == "NXDOMAIN"
        assert r.rr == []
    # Headless: an empty non-terminal above the per-endpoint names: no records (NODATA,
    # so that resolvers cutting at NXDOMAIN, RFC 8020, still find db-1.east.db...).
    for qtype in ("A", "AAAA", "SRV", "ANY"):
        r = ask(snap, f"east.db.default.svc.{Z}", qtype)
        assert r.rr == []
        assert rcode(r) == "NOERROR"
        assert_soa_authority(r)


def test_unexported_services_and_absent_namespaces_do_not_resolve(snap: Snapshot) -> None:
    # The producer leaves them out of the view; DNS serves exactly the view.
    assert rcode(ask(snap, f"other.default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(ask(snap, f"web.elsewhere.svc.{Z}")) == "NXDOMAIN"
    assert rcode(ask(snap, f"web.default.{Z}")) == "NXDOMAIN"


def test_cluster_local_is_not_ours(snap: Snapshot) -> None:
    r = ask(snap, "web.default.svc.cluster.local")
    assert rcode(r) == "REFUSED"
    assert r.rr == []
    assert r.header.aa == 0


def test_nodata_for_an_existing_name_with_another_type(snap: Snapshot) -> None:
    for name, qtype in (
        (f"web.default.svc.{Z}", "TXT"),
        (f"db.default.svc.{Z}", "MX"),
        (f"dns-version.{Z}", "A"),
        (f"default.svc.{Z}", "A"),  # empty non-terminal
        (f"svc.{Z}", "A"),
        (f"_tcp.web.default.svc.{Z}", "SRV"),
    ):
        r = ask(snap, name, qtype)
        assert rcode(r) == "NOERROR", name
        assert r.header.aa == 1
        assert_soa_authority(r)


def test_nxdomain_with_soa_in_zone_refused_outside(snap: Snapshot) -> None:
    r = ask(snap, f"nothing.here.svc.{Z}")
    assert rcode(r) == "NXDOMAIN"
    assert r.header.aa == 1
    assert_soa_authority(r)
    assert rcode(ask(snap, "example.com")) == "REFUSED"
    assert rcode(ask(snap, "local")) == "REFUSED"
    assert rcode(ask(snap, "xclusterset.local")) == "REFUSED"
    assert rcode(ask(snap, ".")) == "REFUSED"


def test_soa_and_ns_at_the_apex(snap: Snapshot) -> None:
    soa = ask(snap, Z, "SOA")
    assert len(soa.rr) == 1
    assert str(soa.rr[0].rdata.mname) == f"ns.dns.{Z}."
    assert soa.rr[0].rdata.times[4] == 5  # negative caching TTL = the zone TTL
    ns = ask(snap, Z, "NS")
    assert rdatas(ns, "NS") == [f"ns.dns.{Z}."]


def test_configurable_zone() -> None:
    s = build_snapshot(services(), zone="Mesh.Example.")
    assert rdatas(ask(s, "web.default.svc.mesh.example", "A"), "A") == ["10.0.0.1"]
    assert rdatas(ask(s, "dns-version.mesh.example", "TXT"), "TXT") == ['"1.0.0"']
    assert rcode(ask(s, f"web.default.svc.{Z}")) == "REFUSED"
    assert_soa_authority(ask(s, "x.mesh.example"), zone="mesh.example")


def test_names_are_case_insensitive_and_the_question_keeps_its_case(snap: Snapshot) -> None:
    name = "WeB.DeFault.SVC.ClusterSet.LOCAL"
    r = ask(snap, name, "A")
    assert rdatas(r, "A") == ["10.0.0.1"]
    assert r.q.qname.label == tuple(x.encode() for x in name.split("."))
    raw = answer(query(name), snap)
    assert raw is not None
    assert name.encode().split(b".")[0] in raw


def test_any_gives_every_record_of_the_name(snap: Snapshot) -> None:
    r = ask(snap, f"web.default.svc.{Z}", "ANY")
    assert {QTYPE[rr.rtype] for rr in r.rr} == {"A", "AAAA", "SRV"}


# --- errors: NOTIMP, FORMERR, drops ---------------------------------------------------------


def _header(qid: int, flags: int, qd: int, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


def test_unreadable_header_is_dropped(snap: Snapshot) -> None:
    for junk in (b"", b"\x00", b"\x12\x34\x01\x00\x00\x01", b"x" * 11):
        assert answer(junk, snap) is None


def test_responses_are_not_answered(snap: Snapshot) -> None:
    q = bytearray(query(f"web.default.svc.{Z}"))
    q[2] |= 0x80
    assert answer(bytes(q), snap) is None


def test_formerr_when_the_header_is_readable_but_the_rest_is_junk(snap: Snapshot) -> None:
    raw = answer(_header(0xBEEF, 0x0100, 1) + b"\x07garbage", snap)
    assert raw is not None
    r = DNSRecord.parse(raw)
    assert r.header.id == 0xBEEF
    assert rcode(r) == "FORMERR"
    assert r.header.qr == 1
    assert r.header.rd == 1


def test_formerr_for_a_name_longer_than_255_bytes(snap: Snapshot) -> None:
    # dnslib parses it but refuses to pack it: we must not echo it, nor fail.
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x0aclusterset\x05local\x00"
    raw = answer(_header(9, 0x0100, 1) + name + b"\x00\x01\x00\x01", snap)
    assert raw is not None
    r = DNSRecord.parse(raw)
    assert rcode(r) == "FORMERR"
    assert r.header.id == 9


def test_formerr_for_zero_or_several_questions(snap: Snapshot) -> None:
    assert rcode(DNSRecord.parse(answer(_header(1, 0, 0), snap) or b"")) == "FORMERR"
    two = DNSRecord(
        questions=[
            DNSQuestion(DNSLabel(f"web.default.svc.{Z}")),
            DNSQuestion(DNSLabel(f"db.default.svc.{Z}")),
        ]
    )
    raw = answer(bytes(two.pack()), snap)
    assert raw is not None
    assert rcode(DNSRecord.parse(raw)) == "FORMERR"


def test_notimp_for_other_opcodes(snap: Snapshot) -> None:
    for opcode in (1, 2, 4, 5):
        q = bytearray(query(f"web.default.svc.{Z}"))
        q[2] = (q[2] & 0x87) | (opcode << 3)
        raw = answer(bytes(q), snap)
        assert raw is not None
        r = DNSRecord.parse(raw)
        assert rcode(r) == "NOTIMP"
        assert r.header.opcode == opcode


def test_refused_for_other_classes_and_zone_transfers(snap: Snapshot) -> None:
    q = DNSRecord.question(f"web.default.svc.{Z}", "A", "CH")
    r = DNSRecord.parse(answer(bytes(q.pack()), snap) or b"")
    assert rcode(r) == "REFUSED"
    assert rcode(ask(snap, Z, "AXFR")) == "REFUSED"


def test_edns_badvers(snap: Snapshot) -> None:
    q = DNSRecord.question(f"web.default.svc.{Z}")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    r = DNSRecord.parse(answer(bytes(q.pack()), snap) or b"")
    opt = [x for x in r.ar if x.rtype == QTYPE.OPT]
    assert len(opt) == 1
    assert (opt[0].ttl >> 24) == 1  # extended rcode 16 = BADVERS
    assert r.rr == []


# --- EDNS0 and truncation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def big() -> Snapshot:
    """A headless service whose A answer is ~1.6 kB (100 endpoints)."""
    eps = tuple(Endpoint((f"10.3.{i // 250}.{i % 250 + 1}",), f"pod-{i}") for i in range(100))
    svc = ImportedService(
        "big",
        "many",
        ServiceType.HEADLESS,
        (),
        (Port(80, "TCP", "http"),),
        (ClusterEndpoints("c", eps),),
    )
    return build_snapshot([svc])


BIG = f"many.big.svc.{Z}"


def test_reply_carries_opt_only_when_the_query_had_one(snap: Snapshot) -> None:
    with_opt = ask(snap, f"web.default.svc.{Z}", edns=1232)
    opts = [x for x in with_opt.ar if x.rtype == QTYPE.OPT]
    assert len(opts) == 1
    assert opts[0].rclass == 1232
    without = ask(snap, f"web.default.svc.{Z}")
    assert not [x for x in without.ar if x.rtype == QTYPE.OPT]


def test_over_512_without_edns_sets_tc_and_keeps_the_question(big: Snapshot) -> None:
    raw = answer(query(BIG, "A", qid=7), big)
    assert raw is not None
    assert len(raw) <= 512
    r = DNSRecord.parse(raw)
    assert r.header.tc == 1
    assert r.header.id == 7
    assert str(r.q.qname) == BIG + "."
    assert r.q.qtype == QTYPE.A
    assert r.rr == []


def test_edns_size_is_honoured_up_to_the_server_cap(big: Snapshot) -> None:
    # 100 A records need ~1.7 kB: 1232 (our default cap) is not enough, 4096 is.
    r = ask(big, BIG, "A", edns=4096)
    assert r.header.tc == 1
    r = ask(big, BIG, "A", edns=4096, max_udp=4096)
    assert r.header.tc == 0
    assert len(r.rr) == 100
    assert [x.rclass for x in r.ar if x.rtype == QTYPE.OPT] == [4096]
    r = ask(big, BIG, "A", edns=1400, max_udp=4096)
    assert r.header.tc == 1
    assert len(answer(query(BIG, "A", edns=1400), big, max_udp=4096) or b"") <= 1400


def test_edns_size_below_512_is_treated_as_512(snap: Snapshot) -> None:
    r = ask(snap, f"db.default.svc.{Z}", "A", edns=100)
    assert r.header.tc == 0
    assert len(r.rr) == 2


def test_tcp_gets_the_full_answer(big: Snapshot) -> None:
    r = ask(big, BIG, "A", tcp=True)
    assert r.header.tc == 0
    assert len(r.rr) == 100


def test_srv_drops_glue_before_truncating(big: Snapshot) -> None:
    # A limit one byte short of the full reply: additional data goes, answers stay.
    full_size = len(answer(query(f"_http._tcp.{BIG}", "SRV", edns=4096), big, tcp=True) or b"")
    limit = full_size - 1
    r = ask(big, f"_http._tcp.{BIG}", "SRV", edns=limit, max_udp=limit)
    assert r.header.tc == 0
    assert len(r.rr) == 100
    assert [x.rtype for x in r.ar] == [QTYPE.OPT]
    full = ask(big, f"_http._tcp.{BIG}", "SRV", tcp=True)
    assert len([x for x in full.ar if x.rtype == QTYPE.A]) == 100


# --- the packed-reply cache ------------------------------------------------------------------


def test_cache_hit_patches_only_the_id_and_matches_the_uncached_path(snap: Snapshot) -> None:
    s = build_snapshot(services())
    cases = [
        (f"web.default.svc.{Z}", "A", None, True),
        (f"WEB.default.svc.{Z}", "AAAA", 1232, False),
        (f"_pg._tcp.db.default.svc.{Z}", "SRV", 4096, True),
        (f"nope.default.svc.{Z}", "A", None, True),
        ("example.org", "A", None, True),
    ]
    for name, qtype, edns, rd in cases:
        first = answer(query(name, qtype, edns=edns, rd=rd, qid=1), s)
        second = answer(query(name, qtype, edns=edns, rd=rd, qid=0xABCD), s)
        uncached, _ = compute(query(name, qtype, edns=edns, rd=rd, qid=0xABCD), s)
        assert first is not None
        assert second == uncached
        assert second[:2] == b"\xab\xcd"
        assert first[2:] == second[2:]
        assert DNSRecord.parse(second).header.rd == int(rd)
    assert s.cache_stats()[0] == len(cases)


def test_snapshot_swap_never_serves_the_old_cache() -> None:
    old = build_snapshot(services())
    q = query(f"web.default.svc.{Z}")
    assert rdatas(DNSRecord.parse(answer(q, old) or b""), "A") == ["10.0.0.1"]
    moved = [
        ImportedService(s.namespace, s.name, s.type, ("10.0.0.99",), s.ports, s.clusters)
        if s.name == "web"
        else s
        for s in services()
    ]
    new = build_snapshot(moved)
    assert rdatas(DNSRecord.parse(answer(q, new) or b""), "A") == ["10.0.0.99"]
    assert rdatas(DNSRecord.parse(answer(q, old) or b""), "A") == ["10.0.0.1"]
    gone = build_snapshot([s for s in services() if s.name != "web"])
    assert rcode(DNSRecord.parse(answer(q, gone) or b"")) == "NXDOMAIN"


def test_cache_is_bounded_under_random_names() -> None:
    s = build_snapshot(services())
    n = NEGATIVE_CACHE_ENTRIES * 2 + 17
    for i in range(n):
        raw = answer(query(f"r{i}.x{i % 97}.svc.{Z}", qid=i & 0xFFFF), s)
        assert raw is not None
    entries, nbytes = s.cache_stats()
    assert 0 < entries <= NEGATIVE_CACHE_ENTRIES
    assert nbytes < 4 * 1024 * 1024
    # Names that exist are cached apart, so the flood did not evict them.
    answer(query(f"web.default.svc.{Z}"), s)
    for i in range(NEGATIVE_CACHE_ENTRIES + 1):
        answer(query(f"again{i}.svc.{Z}"), s)
    assert s.cache(1232, False).pos


def test_long_queries_are_answered_but_not_cached(snap: Snapshot) -> None:
    s = build_snapshot(services())
    q = DNSRecord.question(f"web.default.svc.{Z}")
    q.add_ar(EDNS0(udp_len=1232, opts=[]))
    raw = bytes(q.pack())
    padded = raw[:10] + b"\x00\x01" + raw[12:-2] + (600).to_bytes(2, "big") + bytes(600)
    r = answer(padded, s)
    assert r is not None
    assert s.cache_stats()[0] == 0


def test_clients_must_use_the_full_name(snap: Snapshot) -> None:
    # clusterset.local is not in pods' search path: short forms and search-path expansions
    # are not ours to answer.
    for name in (
        "web",
        "web.default",
        "web.default.svc",
        f"web.default.svc.{Z}.default.svc.cluster.local",
        f"web.default.svc.{Z}.svc.cluster.local",
    ):
        assert rcode(ask(snap, name)) == "REFUSED", name


def test_a_bad_service_in_the_view_is_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        ImportedService("default", "Bad_Name", ServiceType.CLUSTERSET_IP, ("10.0.0.5",), (), ()),
        ImportedService("default", "badip", ServiceType.CLUSTERSET_IP, ("10.0.0.300",), (), ()),
        ImportedService(
            "default",
            "badhost",
            ServiceType.HEADLESS,
            (),
            (),
            (ClusterEndpoints("c", (Endpoint(("10.0.0.6",), "Not A Label"),)),),
        ),
    ]
    with caplog.at_level("WARNING", logger="meshlink.dns.snapshot"):
        s = build_snapshot([*bad, *services()])
    assert len([r for r in caplog.records if "not serving" in r.getMessage()]) == 3
    assert rdatas(ask(s, f"web.default.svc.{Z}"), "A") == ["10.0.0.1"]
    assert rcode(ask(s, f"badip.default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(ask(s, f"badhost.default.svc.{Z}")) == "NXDOMAIN"


def _plain(s: Snapshot) -> dict[bytes, dict[int, tuple[object, ...]]]:
    return {n: dict(t) for n, t in s.records.items()}


def test_builder_rebuilds_from_the_last_fragments_and_equals_a_fresh_build() -> None:
    fresh = build_snapshot(services())
    builder = SnapshotBuilder(zone=Z, ttl=5)
    first = builder.build(services())
    assert builder.reused == 0
    again = builder.build(services())  # every fragment comes from the previous build
    assert builder.reused == len(services())
    for built in (first, again):
        assert _plain(built) == _plain(fresh)
        assert built.existing == fresh.existing
    # One service changes: only its names change, the others are reused.
    changed = [
        dataclasses.replace(s, ips=("10.0.0.7",)) if s.name == "v4only" else s for s in services()
    ]
    after = _plain(builder.build(changed))
    assert builder.reused == 2 * len(services()) - 1
    v4 = b"v4only.default.svc." + Z.encode()
    assert after[v4][QTYPE.A] == ("10.0.0.7",)
    assert {n: t for n, t in after.items() if n != v4} == {
        n: t for n, t in _plain(fresh).items() if n != v4
    }
    # Only the last view is kept: a service gone from it is computed afresh.
    builder.build(changed[:1])
    builder.build(changed)
    assert builder.reused == 2 * len(services()) - 1 + 1 + 1


def test_two_views_of_one_name_are_merged() -> None:
    # Producers send one ImportedService per service; if a bug sent two, their records
    # are merged (deduplicated), as they were before fragments were cached.
    web = services()[0]
    other = dataclasses.replace(web, ips=("10.0.0.9",))
    recs = _plain(build_snapshot([web, other]))
    name = b"web.default.svc." + Z.encode()
    assert recs[name][QTYPE.A] == ("10.0.0.1", "10.0.0.9")
    assert recs[name][QTYPE.AAAA] == ("fd00::1",)


def test_bad_ports_and_cluster_ids_are_skipped_too(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        clusterset_ip("badport", ("10.0.0.7",), (Port(80, "HTTP"),)),
        clusterset_ip("badcluster", ("10.0.0.8",), (Port(80),), ("Not_A_Label",)),
    ]
    with caplog.at_level("WARNING", logger="meshlink.dns.snapshot"):
        s = build_snapshot([*bad, *services()])
    lines = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
    assert any("port 80 has a bad protocol or name" in line for line in lines)
    assert any("cluster id 'Not_A_Label' is not a DNS label" in line for line in lines)
    assert rcode(ask(s, f"badport.default.svc.{Z}")) == "NXDOMAIN"


def test_the_apex_name_server_has_its_addresses() -> None:
    s = build_snapshot(services(), ns_addresses=("10.96.0.53",))
    assert rdatas(ask(s, f"ns.dns.{Z}"), "A") == ["10.96.0.53"]
    assert s.names > len(services())


@pytest.mark.parametrize(
    "build",
    [
        lambda q: q.add_ar(EDNS0(udp_len=1232)) or q.add_ar(EDNS0(udp_len=1232)),  # two OPTs
        lambda q: setattr(q.q, "qtype", QTYPE.OPT),  # a question for OPT
    ],
)
def test_formerr_for_two_opt_records_or_an_opt_question(snap: Snapshot, build: Any) -> None:
    q = DNSRecord.question(f"web.default.svc.{Z}", "A")
    build(q)
    raw = answer(bytearray(q.pack()), snap)  # any bytes-like query
    assert raw is not None
    assert RCODE[DNSRecord.parse(raw).header.rcode] == "FORMERR"


def test_a_bug_while_answering_is_a_servfail_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snap = build_snapshot(services())  # its own: the shared one's cache may hold the reply
    mod = importlib.import_module("meshlink.dns.answer")  # the package exports answer()

    def broken(*_a: object, **_k: object) -> tuple[bytes | None, bool]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(mod, "compute", broken)
    raw = answer(query(f"web.default.svc.{Z}", qid=7), snap)
    assert raw is not None
    reply = DNSRecord.parse(raw)
    assert (reply.header.id, RCODE[reply.header.rcode]) == (7, "SERVFAIL")


def test_a_full_positive_cache_starts_afresh() -> None:
    from meshlink.dns.snapshot import POSITIVE_CACHE_ENTRIES, ReplyCache

    c = ReplyCache()
    for i in range(POSITIVE_CACHE_ENTRIES):
        c.put(i.to_bytes(4, "big"), b"r", positive=True)
    c.put(b"one more", b"r", positive=True)
    assert len(c.pos) == 1
    assert c.get(b"one more") == b"r"
