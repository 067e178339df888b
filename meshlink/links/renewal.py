"""Renewal of link client certificates over a live link (the pure pieces; the runtime carries
the messages).

The redeemer's client certificate lives 24 hours. When ``link_renewal_due`` (less than a
third of its life left), the redeemer sends ``renewal_csr(identity)`` over the link; the
issuer answers ``sign_renewal(...)`` for a peer that is still allowed; the redeemer checks and
stores the answer with ``store_renewed_cert`` and builds a new client context for new
connections. Keys never change and never travel.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509

from meshlink.links.certcheck import check_link_cert
from meshlink.links.issuer import sign_renewal
from meshlink.links.records import RecordNotFound, link_cert_path, load_link
from meshlink.pki import (
    SiteIdentity,
    cert_from_pem,
    csr_to_pem,
    load_cert,
    make_csr,
    renewal_due,
    write_cert,
)

__all__ = [
    "link_renewal_due",
    "renewal_csr",
    "renewal_due",
    "sign_renewal",
    "store_renewed_cert",
]


def renewal_csr(identity: SiteIdentity) -> str:
    """The CSR (PEM text) a redeemer sends to renew its link certificate."""
    return csr_to_pem(make_csr(identity.site_id, identity.gateway.key)).decode()


def link_renewal_due(state_dir: Path, name: str, now: datetime | None = None) -> bool:
    """True if the link's client certificate has less than a third of its life left."""
    return renewal_due(load_cert(link_cert_path(state_dir, name)), now)


def store_renewed_cert(
    identity: SiteIdentity, state_dir: Path, name: str, cert_pem: str
) -> x509.Certificate:
    """Check a renewed certificate (our site, our key, the peer's CA, valid now) and store it."""
    rec = load_link(state_dir, name)
    if rec is None:
        raise RecordNotFound(f"no link named {name!r} to store a renewed certificate for")
    cert = cert_from_pem(cert_pem, "the renewed link certificate")
    ca = cert_from_pem(rec.peer_ca_pem, f"the CA of site {rec.peer_site}")
    check_link_cert(identity, cert, ca, rec.peer_site, "the renewed link certificate")
    write_cert(link_cert_path(state_dir, name), cert)
    return cert
