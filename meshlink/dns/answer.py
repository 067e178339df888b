"""Answering a DNS query from a snapshot: sans-IO, bytes in, bytes out.

``answer(query, snapshot, max_udp=..., tcp=...)`` returns the packed reply, or None when the
packet must be dropped (header unreadable, or it is itself a response). The reply is a pure
function of the query without its id, the snapshot and the transport limits, so replies are
cached per snapshot keyed by ``query[2:]``: a hit costs one dict lookup and patching the id.

Rules (RFC 1035, 2181, 6891, 8020 and the multicluster DNS specification):
- opcode other than QUERY: NOTIMP; not exactly one question, or junk after the header:
  FORMERR; an EDNS version other than 0: BADVERS.
- out of zone (or a class other than IN/ANY, or a zone transfer): REFUSED.
- a name with records of the asked type: the records (SRV targets' addresses as additional
  data); an existing name without them: NODATA (NOERROR, SOA in authority); any other name
  in the zone: NXDOMAIN with SOA. Authoritative (AA) inside the zone. While the snapshot
  is not ``complete`` (the site is starting and has no import view yet), a name it does not
  know is SERVFAIL instead: resolvers cache an NXDOMAIN (RFC 2308), not a SERVFAIL.
- the reply fits the client's limit: 512 bytes without EDNS0, the advertised payload size
  (at least 512, at most ``max_udp``) with it, 65535 over TCP. Too big: additional data is
  dropped first; still too big: TC set, the question (and OPT) kept, no answers.
"""

from __future__ import annotations

import logging
import struct
from typing import Final

from dnslib import EDNS0, QTYPE, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from meshlink.dns.snapshot import Snapshot, Value

log = logging.getLogger(__name__)

MIN_UDP: Final = 512
TCP_LIMIT: Final = 65535
MAX_CACHED_QUERY: Final = 512
"""Longer queries are answered but never cached (legit queries are far shorter)."""

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
BADVERS_EXT: Final = 1  # extended rcode 16 = (1 << 4) | 0

_QR: Final = 0x8000
_AA: Final = 0x0400
_TC: Final = 0x0200
_RD: Final = 0x0100
_CD: Final = 0x0010
_OPT: Final = QTYPE.OPT
_ANY: Final = QTYPE.ANY
_REFUSED_TYPES: Final = frozenset({QTYPE.AXFR, QTYPE.IXFR, 253, 254})  # + MAILB, MAILA
_CLASS_IN: Final = 1
_CLASS_ANY: Final = 255
_HEADER: Final = struct.Struct("!HHHHHH")


def answer(
    query: bytes, snapshot: Snapshot, *, max_udp: int = 1232, tcp: bool = False
) -> bytes | None:
    """The packed reply to ``query``, or None to drop it. Never raises on any input."""
    if type(query) is not bytes:
        query = bytes(query)  # bytearray/memoryview: the cache needs a hashable key
    cache = snapshot.cache(max_udp, tcp)
    key = query[2:]
    hit = cache.get(key)
    if hit is not None:
        return query[:2] + hit
    try:
        reply, positive = compute(query, snapshot, max_udp=max_udp, tcp=tcp)
    except Exception:  # a name dnslib parsed but cannot pack, or a bug: not a crash
        log.debug("cannot answer query %r", query[:64], exc_info=True)
        qid, flags = _HEADER.unpack_from(query)[:2]
        return _header_only(qid, _QR | (flags & (0x7800 | _RD | _CD)) | SERVFAIL)
    if reply is not None and len(query) <= MAX_CACHED_QUERY:
        cache.put(key, reply[2:], positive=positive)
    return reply


def compute(
    query: bytes, snapshot: Snapshot, *, max_udp: int = 1232, tcp: bool = False
) -> tuple[bytes | None, bool]:
    """Answer without the cache: (reply or None, whether the name exists)."""
    if len(query) < 12:
        return None, False
    qid, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & _QR:
        return None, False  # a response: answering it could start a loop
    opcode = (flags >> 11) & 0xF
    base = _QR | (opcode << 11) | (flags & (_RD | _CD))
    if opcode != 0:
        return _header_only(qid, base | NOTIMP), False
    if qdcount != 1:
        return _header_only(qid, base | FORMERR), False
    try:
        rec = DNSRecord.parse(query)
    except Exception:  # any parser failure is the sender's malformed packet
        log.debug("malformed query %r", query[:64])
        return _header_only(qid, base | FORMERR), False
    opts = [r for r in rec.ar if r.rtype == _OPT]
    if len(opts) > 1 or (opts and opts[0].rname.label != ()):
        return _header_only(qid, base | FORMERR), False
    q = rec.q
    if sum(len(label) + 1 for label in q.qname.label) + 1 > 255:
        return _header_only(qid, base | FORMERR), False  # RFC 1035 2.3.4: names <= 255
    edns = bool(opts)
    if tcp:
        limit = TCP_LIMIT
    elif edns:
        limit = max(MIN_UDP, min(opts[0].rclass, max_udp))
    else:
        limit = MIN_UDP
    if edns and (opts[0].ttl >> 16) & 0xFF != 0:
        return _pack(qid, base, q, [], [], [], edns, max_udp, ext_rcode=BADVERS_EXT), False
    if q.qtype == _OPT:
        return _header_only(qid, base | FORMERR), False

    labels = tuple(label.lower() for label in q.qname.label)
    zone = snapshot.zone_labels
    if (
        labels[len(labels) - len(zone) :] != zone
        or q.qclass not in (_CLASS_IN, _CLASS_ANY)
        or q.qtype in _REFUSED_TYPES
    ):
        return _pack(qid, base | REFUSED, q, [], [], [], edns, max_udp), False

    name = None if any(b"." in label for label in labels) else b".".join(labels)
    by_type = snapshot.records.get(name) if name is not None else None
    ttl = snapshot.ttl
    if by_type is not None:
        if q.qtype == _ANY:
            found = [(t, v) for t, values in by_type.items() for v in values]
        else:
            found = [(q.qtype, v) for v in by_type.get(q.qtype, ())]
        if found:
            answers = [RR(q.qname, t, ttl=ttl, rdata=snapshot.rdata(t, v)) for t, v in found]
            extra = _glue(snapshot, found)
            return _fit(qid, base | _AA, q, answers, extra, edns, max_udp, limit), True
    if name is None or name not in snapshot.existing:
        if not snapshot.complete:  # starting: do not deny what is not known yet
            return _pack(qid, base | SERVFAIL, q, [], [], [], edns, max_udp), False
        rcode = NXDOMAIN
    else:
        rcode = NOERROR
    reply = _pack(qid, base | _AA | rcode, q, [], [snapshot.soa_rr], [], edns, max_udp)
    return _truncate_if(reply, qid, base | _AA | rcode, q, edns, max_udp, limit), rcode == NOERROR


def _glue(snapshot: Snapshot, found: list[tuple[int, Value]]) -> list[RR]:
    """Addresses of SRV targets that live in the zone (optional additional data)."""
    out: list[RR] = []
    seen: set[str] = set()
    for t, value in found:
        if t != QTYPE.SRV or not isinstance(value, tuple):
            continue
        target = value[1]
        if target in seen:
            continue
        seen.add(target)
        by_type = snapshot.records.get(target.encode("ascii"))
        if not by_type:
            continue
        owner = DNSLabel(target + ".")
        for at in (QTYPE.A, QTYPE.AAAA):
            out.extend(
                RR(owner, at, ttl=snapshot.ttl, rdata=snapshot.rdata(at, v))
                for v in by_type.get(at, ())
            )
    return out


def _header_only(qid: int, bitmap: int) -> bytes:
    return _HEADER.pack(qid, bitmap, 0, 0, 0, 0)


def _pack(
    qid: int,
    bitmap: int,
    q: DNSQuestion,
    answers: list[RR],
    auth: list[RR],
    extra: list[RR],
    edns: bool,
    max_udp: int,
    ext_rcode: int = 0,
) -> bytes:
    rec = DNSRecord(
        DNSHeader(id=qid, bitmap=bitmap), questions=[q], rr=answers, auth=auth, ar=list(extra)
    )
    if edns:
        rec.add_ar(EDNS0(udp_len=max_udp, ext_rcode=ext_rcode))
    return bytes(rec.pack())


def _fit(
    qid: int,
    bitmap: int,
    q: DNSQuestion,
    answers: list[RR],
    extra: list[RR],
    edns: bool,
    max_udp: int,
    limit: int,
) -> bytes:
    reply = _pack(qid, bitmap, q, answers, [], extra, edns, max_udp)
    if len(reply) > limit and extra:
        # Additional data is optional: drop it before truncating (RFC 2181 9).
        reply = _pack(qid, bitmap, q, answers, [], [], edns, max_udp)
    return _truncate_if(reply, qid, bitmap, q, edns, max_udp, limit)


def _truncate_if(
    reply: bytes, qid: int, bitmap: int, q: DNSQuestion, edns: bool, max_udp: int, limit: int
) -> bytes:
    if len(reply) <= limit:
        return reply
    # dnslib's truncate() drops the question; clients match replies on it, so keep it.
    return _pack(qid, bitmap | _TC, q, [], [], [], edns, max_udp)
