"""Renewal of link client certificates over a live link: the pieces, and ``Renewals``, the
state machine of one site (the runtime's control channel carries its messages).

The redeemer's client certificate lives 24 hours. When ``link_renewal_due`` (less than a
third of its life left), the redeemer sends ``renewal_csr(identity)`` over the link (a
``RenewRequest``); the issuer answers ``sign_renewal(...)`` (a ``RenewAnswer``) for a peer
that is still allowed; the redeemer checks and stores the answer with
``store_renewed_cert`` and builds a new client context for new connections. Keys never
change and never travel. A request left unanswered is asked again after ``RETRY_AFTER``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509

from meshlink.catalog.control import RenewAnswer, RenewRequest
from meshlink.errors import CatalogError
from meshlink.links.certcheck import check_link_cert
from meshlink.links.issuer import sign_renewal
from meshlink.links.records import (
    LINKS,
    LinkRecord,
    RecordNotFound,
    find_link_to,
    link_cert,
    write_link_cert,
)
from meshlink.pki import (
    LINK_CERT_LIFETIME,
    SiteIdentity,
    cert_from_pem,
    cert_to_pem,
    csr_to_pem,
    make_csr,
    renewal_due,
)
from meshlink.store import StateLike

log = logging.getLogger(__name__)

RETRY_AFTER: Final = 600.0
"""Seconds after which an unanswered renewal request is sent again."""

__all__ = [
    "RETRY_AFTER",
    "Renewals",
    "link_renewal_due",
    "renewal_csr",
    "renewal_due",
    "sign_renewal",
    "store_renewed_cert",
]


def renewal_csr(identity: SiteIdentity) -> str:
    """The CSR (PEM text) a redeemer sends to renew its link certificate."""
    return csr_to_pem(make_csr(identity.site_id, identity.gateway.key)).decode()


def link_renewal_due(state: StateLike, name: str, now: datetime | None = None) -> bool:
    """True if the link's client certificate has less than a third of its life left (or
    there is none)."""
    pem = link_cert(state, name)
    if pem is None:
        return True
    return renewal_due(cert_from_pem(pem, f"the certificate of link {name}"), now)


def store_renewed_cert(
    identity: SiteIdentity,
    state: StateLike,
    name: str,
    cert_pem: str,
    what: str = "the renewed link certificate",
) -> x509.Certificate:
    """Check a renewed certificate (our site, our key, the peer's CA, valid now) and store it."""
    rec = LINKS.load(state, name)
    if rec is None:
        raise RecordNotFound(f"no link named {name!r} to store a renewed certificate for")
    cert = cert_from_pem(cert_pem, what)
    ca = cert_from_pem(rec.peer_ca_pem, f"the CA of site {rec.peer_site}")
    check_link_cert(identity, cert, ca, rec.peer_site, what)
    write_link_cert(state, name, cert_to_pem(cert))
    return cert


class Renewals:
    """One site's renewals, both sides: the requests it should send for the links it dialled
    (``due``, then ``asked`` once sent), the answers it gives its peers (``answer``), and
    the answers it receives (``store``). No I/O but the state directory's files."""

    def __init__(
        self,
        state: StateLike,
        *,
        lifetime: timedelta = LINK_CERT_LIFETIME,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.lifetime = lifetime
        self.retry_after = retry_after
        self._clock = clock
        self._pending: dict[str, float] = {}
        """Peer site -> when we asked it (monotonic seconds)."""

    def due(self, records: Sequence[LinkRecord], live: Collection[str]) -> list[LinkRecord]:
        """The links whose certificate should be renewed now: the peer is live, no request
        is pending (or it went unanswered for ``retry_after``), a third of its life left."""
        now = self._clock()
        return [
            rec
            for rec in records
            if rec.peer_site in live
            and now - self._pending.get(rec.peer_site, -self.retry_after) >= self.retry_after
            and link_renewal_due(self.state, rec.name)
        ]

    def request(self, identity: SiteIdentity) -> RenewRequest:
        return RenewRequest(renewal_csr(identity))

    def asked(self, peer_site: str) -> None:
        """A request went out to ``peer_site``: none again until answered or overdue."""
        self._pending[peer_site] = self._clock()
        log.info("asked %s to renew our link certificate", peer_site)

    def answer(self, identity: SiteIdentity, peer_site: str, req: RenewRequest) -> RenewAnswer:
        """Issuer side: sign the peer's new link certificate (PkiError if it is no peer)."""
        cert = sign_renewal(identity, self.state, peer_site, req.csr, lifetime=self.lifetime)
        log.info("renewed the link certificate of peer %s", peer_site)
        return RenewAnswer(cert)

    def store(self, identity: SiteIdentity, peer_site: str, ans: RenewAnswer) -> None:
        """Redeemer side: check and store the certificate ``peer_site`` renewed."""
        rec = find_link_to(self.state, peer_site)
        if rec is None:
            raise CatalogError(f"unexpected renewed certificate from {peer_site}")
        store_renewed_cert(identity, self.state, rec.name, ans.cert)
        self._pending.pop(peer_site, None)
        log.info("link certificate for %s renewed", peer_site)
