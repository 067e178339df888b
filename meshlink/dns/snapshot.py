"""The DNS snapshot: every name of the clusterset zone and its records, precomputed.

``build_snapshot`` turns the import view (``ImportedService``) into an immutable
``Snapshot`` following the multicluster DNS specification (KEP-1645 ``specification.md``):

- ``dns-version.<zone>`` TXT ``"1.0.0"``; SOA and NS at the apex.
- ClusterSetIP: ``<svc>.<ns>.svc.<zone>`` A/AAAA from ``ips``; ``_<port>._<proto>.<svc>...``
  SRV for each named port; SRV on the bare name, one per distinct port number.
- Headless: the bare name A/AAAA over the ready endpoints of all clusters;
  ``<hostname>.<clusterid>.<svc>...`` A/AAAA per ready endpoint (hostname, else the dashed
  IP); SRV per ready endpoint and named port, and on the bare name per endpoint and
  distinct port number. No ready endpoint: the service has no name at all (NXDOMAIN).
- ``<clusterid>.<svc>.<ns>.svc.<zone>`` never has records. It is an empty non-terminal
  (NODATA) when per-endpoint names sit below it: answering NXDOMAIN there would, by
  RFC 8020, deny the per-endpoint names to resolvers that cut at NXDOMAIN.

The snapshot also owns the packed-reply caches (see ``answer``), so replacing the snapshot
replaces the caches: a reply never mixes two snapshots.

A ``SnapshotBuilder`` makes rebuilding incremental in effect: it keeps each service's
records (its "fragment") from the previous build, so a rebuild after one import changed
costs a merge of the others, not their recomputation; what it keeps is exactly the last
view, so memory follows the view and never thrashes.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from dnslib import AAAA, NS, QTYPE, RD, RR, SOA, SRV, TXT, A, DNSLabel

from meshlink.catalog.records import Endpoint, ServiceType
from meshlink.catalog.view import ImportedService
from meshlink.names import PROTOCOLS, is_dns_label

log = logging.getLogger(__name__)

DNS_SCHEMA_VERSION: Final = "1.0.0"
SRV_PRIORITY: Final = 0
SRV_WEIGHT: Final = 100
_T_A: Final = QTYPE.A
_T_AAAA: Final = QTYPE.AAAA
_T_SRV: Final = QTYPE.SRV
_T_TXT: Final = QTYPE.TXT
_T_SOA: Final = QTYPE.SOA
_T_NS: Final = QTYPE.NS

# Cache budgets per snapshot and transport. Positive entries are only created for names
# that exist (bounded variants: case, EDNS options); negative entries (NXDOMAIN, REFUSED,
# FORMERR...) can be anything a hostile client sends, so their budget is small. A cache
# over budget is emptied (cheap, amortised), never grown.
POSITIVE_CACHE_ENTRIES: Final = 50_000
POSITIVE_CACHE_BYTES: Final = 32 * 1024 * 1024
NEGATIVE_CACHE_ENTRIES: Final = 10_000
NEGATIVE_CACHE_BYTES: Final = 4 * 1024 * 1024

_serials = itertools.count(int(time.time()) & 0x7FFFFFFF)


class ReplyCache:
    """Packed replies without their 2-byte id, keyed by the query without its id.

    A reply is a pure function of (query[2:], snapshot, transport limits), so the id is the
    only thing to patch on a hit. Two bounded dicts: names that exist, and everything else.
    """

    __slots__ = ("neg", "neg_bytes", "pos", "pos_bytes")

    def __init__(self) -> None:
        self.pos: dict[bytes, bytes] = {}
        self.neg: dict[bytes, bytes] = {}
        self.pos_bytes = 0
        self.neg_bytes = 0

    def get(self, key: bytes) -> bytes | None:
        hit = self.pos.get(key)
        if hit is None:
            hit = self.neg.get(key)
        return hit

    def put(self, key: bytes, value: bytes, *, positive: bool) -> None:
        size = len(key) + len(value) + 100  # + dict entry and object headers, roughly
        if positive:
            if len(self.pos) >= POSITIVE_CACHE_ENTRIES or (
                self.pos_bytes + size > POSITIVE_CACHE_BYTES
            ):
                self.pos.clear()
                self.pos_bytes = 0
            self.pos[key] = value
            self.pos_bytes += size
        else:
            if len(self.neg) >= NEGATIVE_CACHE_ENTRIES or (
                self.neg_bytes + size > NEGATIVE_CACHE_BYTES
            ):
                self.neg.clear()
                self.neg_bytes = 0
            self.neg[key] = value
            self.neg_bytes += size

    def __len__(self) -> int:
        return len(self.pos) + len(self.neg)

    @property
    def nbytes(self) -> int:
        return self.pos_bytes + self.neg_bytes


Rdata: TypeAlias = RD
"""dnslib record data (A, AAAA, SRV, TXT, SOA, NS); dnslib ships no type hints."""

Value: TypeAlias = str | tuple[int, str]
"""A record's data, kept as plain values and turned into dnslib rdata only when a reply is
built (on a cache miss): building a 1,000-service snapshot stays in the tens of ms.
A/AAAA/NS/TXT: the text; SRV: (port, target without the trailing dot)."""


def to_rdata(qtype: int, value: Value, soa: Rdata) -> Rdata:
    """The dnslib rdata of one stored value."""
    if qtype == _T_A:
        return A(value)
    if qtype == _T_AAAA:
        return AAAA(value)
    if qtype == _T_SRV:
        assert isinstance(value, tuple)
        return SRV(priority=SRV_PRIORITY, weight=SRV_WEIGHT, port=value[0], target=value[1] + ".")
    if qtype == _T_TXT:
        return TXT(value)
    if qtype == _T_NS:
        return NS(value)
    return soa


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """An immutable view of the zone. ``records`` and ``existing`` are keyed by the
    lower-case name without the trailing dot, as bytes (``b"web.default.svc.clusterset.local"``).
    """

    zone: str
    ttl: int
    serial: int
    records: Mapping[bytes, Mapping[int, tuple[Value, ...]]]
    """name -> qtype -> values. Every owner name of a record."""
    existing: frozenset[bytes]
    """Every name that exists: owners of records and empty non-terminals (NODATA)."""
    soa: Rdata
    soa_rr: RR
    """The apex SOA record, built once: the authority section of every negative answer."""
    zone_labels: tuple[bytes, ...]
    complete: bool = True
    """False while the site has no import view yet (it is starting): a name it does not
    know is then SERVFAIL, not NXDOMAIN, which resolvers would cache (RFC 2308)."""
    _caches: dict[tuple[int, bool], ReplyCache] = field(default_factory=dict, repr=False)

    def cache(self, max_udp: int, tcp: bool) -> ReplyCache:
        """The reply cache for one transport limit (created on first use)."""
        key = (max_udp, tcp)
        c = self._caches.get(key)
        if c is None:
            c = self._caches[key] = ReplyCache()
        return c

    def cache_stats(self) -> tuple[int, int]:
        """(entries, approximate bytes) over every cache of this snapshot."""
        caches = list(self._caches.values())
        return sum(len(c) for c in caches), sum(c.nbytes for c in caches)

    def rdata(self, qtype: int, value: Value) -> Rdata:
        return to_rdata(qtype, value, self.soa)

    @property
    def names(self) -> int:
        return len(self.records)


def dashed_ip(address: str) -> str:
    """The per-endpoint label for an endpoint without hostname: ``10-1-2-3``, ``fd00--1``."""
    version, text = _address(address)
    return text.replace("." if version == 4 else ":", "-")


@functools.lru_cache(maxsize=65536)
def _address(address: str) -> tuple[int, str]:
    """(IP version, canonical text); ValueError if it is not an IP address."""
    ip = ipaddress.ip_address(address)
    return ip.version, ip.compressed


class _Builder:
    def __init__(self, zone: str, ttl: int) -> None:
        self.zone = zone
        self.ttl = ttl
        # name -> qtype -> values (a dict as an ordered set: dedup, insertion order kept).
        self.records: dict[bytes, dict[int, dict[Value, None]]] = {}

    def add(self, name: str, qtype: int, value: Value) -> None:
        by_type = self.records.get(key := name.encode("ascii"))
        if by_type is None:
            by_type = self.records[key] = {}
        values = by_type.get(qtype)
        if values is None:
            values = by_type[qtype] = {}
        values[value] = None

    def add_address(self, name: str, address: str) -> None:
        version, text = _address(address)
        self.add(name, _T_A if version == 4 else _T_AAAA, text)

    def srv(self, name: str, port: int, target: str) -> None:
        self.add(name, _T_SRV, (port, target))


def _ready(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    return [e for e in endpoints if e.ready and e.addresses]


def _invalid(svc: ImportedService) -> str | None:
    """Why ``svc`` cannot be served (producers validate; this keeps a bug there from
    crashing the DNS server), or None."""
    if not (is_dns_label(svc.name) and is_dns_label(svc.namespace)):
        return "name or namespace is not a DNS label"
    for p in svc.ports:
        if p.protocol not in PROTOCOLS or (p.name and not is_dns_label(p.name)):
            return f"port {p.port} has a bad protocol or name"
    for ce in svc.clusters:
        if not is_dns_label(ce.cluster):
            return f"cluster id {ce.cluster!r} is not a DNS label"
        for ep in ce.endpoints:
            if ep.hostname and not is_dns_label(ep.hostname):
                return f"endpoint hostname {ep.hostname!r} is not a DNS label"
    for addr in (*svc.ips, *(a for ce in svc.clusters for e in ce.endpoints for a in e.addresses)):
        try:
            _address(addr)
        except ValueError:
            return f"{addr!r} is not an IP address"
    return None


def _add_service(b: _Builder, svc: ImportedService) -> None:
    base = f"{svc.name}.{svc.namespace}.svc.{b.zone}"
    named = [p for p in svc.ports if p.name]
    # One port number once on the bare name: tcp/42 and udp/42 give one SRV record.
    numbers = sorted({p.port for p in svc.ports})
    if svc.type is ServiceType.HEADLESS:
        targets: list[str] = []
        for ce in svc.clusters:
            for ep in _ready(ce.endpoints):
                host = (ep.hostname or dashed_ip(ep.addresses[0])).lower()
                target = f"{host}.{ce.cluster}.{base}"
                targets.append(target)
                for addr in ep.addresses:
                    b.add_address(target, addr)
                    b.add_address(base, addr)
        for target in dict.fromkeys(targets):
            for p in named:
                b.srv(f"_{p.name}._{p.protocol.lower()}.{base}", p.port, target)
            for n in numbers:
                b.srv(base, n, target)
        return
    for ip in svc.ips:
        b.add_address(base, ip)
    for p in named:
        b.srv(f"_{p.name}._{p.protocol.lower()}.{base}", p.port, base)
    for n in numbers:
        b.srv(base, n, base)
    # A ClusterSetIP service exists even before it has an IP or a port (NODATA, not
    # NXDOMAIN): it is in the view, so it is imported.
    b.records.setdefault(base.encode("ascii"), {})


ByType: TypeAlias = Mapping[int, tuple[Value, ...]]
Fragment: TypeAlias = tuple[tuple[bytes, ByType], ...]
"""One service's names, each with its records by type (possibly none: NODATA). Shared by
every snapshot built while the service is unchanged, so never mutated."""


def _fragment(svc: ImportedService, zone: str) -> Fragment | str:
    """The records of one service, or why it cannot be served."""
    why = _invalid(svc)
    if why is not None:
        return why
    b = _Builder(zone, 0)
    _add_service(b, svc)
    return _frozen(b)


def _frozen(b: _Builder) -> Fragment:
    return tuple(
        (name, {t: tuple(v) for t, v in by_type.items()}) for name, by_type in b.records.items()
    )


def _merged(a: ByType, b: ByType) -> ByType:
    return {t: tuple(dict.fromkeys((*a.get(t, ()), *b.get(t, ())))) for t in {*a, *b}}


FragmentKey: TypeAlias = tuple[ImportedService, str]


class SnapshotBuilder:
    """``build_snapshot`` for a producer that rebuilds as its view changes: fragments of
    services unchanged since the previous build are reused."""

    def __init__(self, *, zone: str = "clusterset.local", ttl: int = 5) -> None:
        self.zone = zone
        self.ttl = ttl
        self._last: dict[FragmentKey, Fragment | str] = {}
        self.reused = 0
        """Fragments taken from the previous build (all builds; for tests and metrics)."""

    def build(self, services: Iterable[ImportedService], *, complete: bool = True) -> Snapshot:
        last, current = self._last, {}
        zone = self.zone.strip(".").lower()

        def fragment(svc: ImportedService, zone: str) -> Fragment | str:
            key = (svc, zone)
            frag = last.get(key)
            if frag is None:
                frag = _fragment(svc, zone)
            else:
                self.reused += 1
            current[key] = frag
            return frag

        snap = _build(services, zone=zone, ttl=self.ttl, fragment=fragment, complete=complete)
        self._last = current
        return snap


def build_snapshot(
    services: Iterable[ImportedService],
    *,
    zone: str = "clusterset.local",
    ttl: int = 5,
    serial: int | None = None,
    ns_addresses: tuple[str, ...] = (),
) -> Snapshot:
    """Precompute every name and record of the zone from the import view.

    ``ns_addresses`` (optional) gives ``ns.dns.<zone>`` (the apex NS target) addresses.
    """
    zone = zone.strip(".").lower()
    return _build(
        services, zone=zone, ttl=ttl, serial=serial, ns_addresses=ns_addresses, fragment=_fragment
    )


def _build(
    services: Iterable[ImportedService],
    *,
    zone: str,
    ttl: int,
    fragment: Callable[[ImportedService, str], Fragment | str],
    serial: int | None = None,
    ns_addresses: tuple[str, ...] = (),
    complete: bool = True,
) -> Snapshot:
    records: dict[bytes, ByType] = {}
    for svc in services:
        frag = fragment(svc, zone)
        if isinstance(frag, str):
            log.warning("dns: not serving %s/%s: %s", svc.namespace, svc.name, frag)
            continue
        for name, by_type in frag:
            have = records.get(name)  # names normally belong to one service
            records[name] = by_type if have is None else _merged(have, by_type)
    mname = f"ns.dns.{zone}."
    soa = SOA(
        mname=mname,
        rname=f"hostmaster.{zone}.",
        times=(serial if serial is not None else next(_serials), 7200, 1800, 86400, ttl),
    )
    apex = _Builder(zone, ttl)
    apex.add(zone, _T_SOA, "")
    apex.add(zone, _T_NS, mname)
    apex.add(f"dns-version.{zone}", _T_TXT, DNS_SCHEMA_VERSION)
    apex.records.setdefault(f"ns.dns.{zone}".encode("ascii"), {})
    for addr in ns_addresses:
        apex.add_address(f"ns.dns.{zone}", addr)
    for name, by_type in _frozen(apex):
        have = records.get(name)
        records[name] = by_type if have is None else _merged(have, by_type)
    zone_key = zone.encode("ascii")
    suffix = b"." + zone_key
    existing: set[bytes] = set()
    for name in records:
        n = name
        while n not in existing and n != zone_key:
            existing.add(n)
            n = n.split(b".", 1)[1]
        existing.add(zone_key)
    assert all(n == zone_key or n.endswith(suffix) for n in existing)
    return Snapshot(
        zone=zone,
        ttl=ttl,
        serial=soa.times[0],
        records=records,
        existing=frozenset(existing),
        soa=soa,
        soa_rr=RR(DNSLabel(zone + "."), _T_SOA, ttl=ttl, rdata=soa),
        zone_labels=tuple(zone_key.split(b".")),
        complete=complete,
    )
