"""A DNS client that polls one name every 100 ms in a thread for the whole of a fault, and
reports every answer: what an application's resolver would have seen meanwhile."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


@dataclass
class DnsPoller:
    """``with DnsPoller(host, port, name) as p: ...``, then ``p.answers``: one entry per
    query, the sorted A addresses, or ``"NXDOMAIN"``, ``"NODATA"``, another rcode's name,
    or ``"timeout"``."""

    host: str
    port: int
    name: str
    every: float = 0.1
    answers: list[tuple[float, str | tuple[str, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DnsPoller:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def ask(self) -> str | tuple[str, ...]:
        q = dns.message.make_query(self.name, dns.rdatatype.A)
        try:
            r = dns.query.udp(q, self.host, port=self.port, timeout=1)
        except (dns.exception.Timeout, OSError):
            return "timeout"
        if r.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(r.rcode())
        addrs = tuple(sorted(rr.address for rrset in r.answer for rr in rrset))
        return addrs or "NODATA"

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.answers.append((t0, self.ask()))
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t0)))

    def summary(self) -> Counter[str | tuple[str, ...]]:
        return Counter(a for _, a in self.answers)
