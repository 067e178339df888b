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
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from dnslib import AAAA, NS, QTYPE, RD, SOA, SRV, TXT, A

from meshlink.catalog.records import Endpoint, ServiceType
from meshlink.catalog.view import ImportedService

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


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """An immutable view of the zone. ``records`` and ``existing`` are keyed by the
    lower-case name without the trailing dot, as bytes (``b"web.default.svc.clusterset.local"``).
    """

    zone: str
    ttl: int
    serial: int
    records: Mapping[bytes, Mapping[int, tuple[Rdata, ...]]]
    """name -> qtype -> rdata. Every owner name of a record."""
    existing: frozenset[bytes]
    """Every name that exists: owners of records and empty non-terminals (NODATA)."""
    soa: Rdata
    zone_labels: tuple[bytes, ...]
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

    @property
    def names(self) -> int:
        return len(self.records)


def dashed_ip(address: str) -> str:
    """The per-endpoint label for an endpoint without hostname: ``10-1-2-3``, ``fd00--1``."""
    ip = ipaddress.ip_address(address)
    sep = "." if ip.version == 4 else ":"
    return ip.compressed.replace(sep, "-")


class _Builder:
    def __init__(self, zone: str, ttl: int) -> None:
        self.zone = zone
        self.ttl = ttl
        # name -> qtype -> dedup key -> rdata (dicts keep insertion order).
        self.records: dict[bytes, dict[int, dict[object, Rdata]]] = {}

    def add(self, name: str, qtype: int, key: object, make: Callable[[], Rdata]) -> None:
        rrs = self.records.setdefault(name.lower().encode("ascii"), {}).setdefault(qtype, {})
        if key not in rrs:
            rrs[key] = make()

    def add_address(self, name: str, address: str) -> None:
        ip = ipaddress.ip_address(address)
        text = str(ip)
        if ip.version == 4:
            self.add(name, _T_A, text, lambda: A(text))
        else:
            self.add(name, _T_AAAA, text, lambda: AAAA(text))

    def srv(self, name: str, port: int, target: str) -> None:
        self.add(
            name,
            _T_SRV,
            (port, target),
            lambda: SRV(priority=SRV_PRIORITY, weight=SRV_WEIGHT, port=port, target=target + "."),
        )


def _ready(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    return [e for e in endpoints if e.ready and e.addresses]


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
    b = _Builder(zone, ttl)
    for svc in services:
        _add_service(b, svc)
    mname = f"ns.dns.{zone}."
    soa = SOA(
        mname=mname,
        rname=f"hostmaster.{zone}.",
        times=(serial if serial is not None else next(_serials), 7200, 1800, 86400, ttl),
    )
    b.add(zone, _T_SOA, "soa", lambda: soa)
    b.add(zone, _T_NS, mname, lambda: NS(mname))
    b.add(f"dns-version.{zone}", _T_TXT, "v", lambda: TXT(DNS_SCHEMA_VERSION))
    b.records.setdefault(f"ns.dns.{zone}".encode("ascii"), {})
    for addr in ns_addresses:
        b.add_address(f"ns.dns.{zone}", addr)
    zone_key = zone.encode("ascii")
    suffix = b"." + zone_key
    existing: set[bytes] = set()
    for name in b.records:
        n = name
        while n not in existing and n != zone_key:
            existing.add(n)
            n = n.split(b".", 1)[1]
        existing.add(zone_key)
    assert all(n == zone_key or n.endswith(suffix) for n in existing)
    records = {
        name: {t: tuple(v.values()) for t, v in by_type.items()}
        for name, by_type in b.records.items()
    }
    return Snapshot(
        zone=zone,
        ttl=ttl,
        serial=soa.times[0],
        records=records,
        existing=frozenset(existing),
        soa=soa,
        zone_labels=tuple(zone_key.split(b".")),
    )
