"""The link certificate checks shared by redemption and renewal (``links.certcheck``): each
check, its one message, and that both callers refuse with it and store nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshlink import links, pki
from meshlink.errors import PkiError, TokenError
from meshlink.links.certcheck import check_link_cert
from meshlink.links.records import LINKS
from meshlink.links.redeem import _accept

DAY = timedelta(days=1)


@pytest.fixture
def sites(tmp_path: Path) -> tuple[pki.SiteIdentity, pki.SiteIdentity]:
    """Site a (the issuer) and site b (the redeemer, whose link certificates a signs)."""
    a = pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")
    b = pki.SiteIdentity.load_or_create(tmp_path / "b", "site-b")
    return a, b


Maker = Callable[[pki.SiteIdentity, pki.SiteIdentity], x509.Certificate]

BAD: dict[str, tuple[Maker, str]] = {
    "other site": (
        lambda a, b: pki.issue_cert(a.ca, "site-c", b.gateway.key.public_key(), lifetime=DAY),
        r"the link certificate from site site-a is for site 'site-c', not for this site "
        r"\(site-b\)",
    ),
    "other key": (
        lambda a, b: pki.issue_cert(a.ca, "site-b", pki.new_key().public_key(), lifetime=DAY),
        "the link certificate from site site-a is for another key than this site's gateway key",
    ),
    "other CA": (
        lambda a, b: pki.issue_cert(
            pki.create_ca("site-a"), "site-b", b.gateway.key.public_key(), lifetime=DAY
        ),
        "the link certificate from site site-a is not signed by that site's CA",
    ),
    "expired": (
        lambda a, b: pki.issue_cert(
            a.ca, "site-b", b.gateway.key.public_key(), lifetime=DAY, now=pki.utcnow() - 2 * DAY
        ),
        r"the link certificate from site site-a expired at \d{4}-\d\d-\d\d \d\d:\d\dZ",
    ),
    "not yet valid": (
        lambda a, b: pki.issue_cert(
            a.ca, "site-b", b.gateway.key.public_key(), lifetime=DAY, now=pki.utcnow() + DAY
        ),
        r"the link certificate from site site-a is not valid before ",
    ),
}


def good_cert(a: pki.SiteIdentity, b: pki.SiteIdentity) -> x509.Certificate:
    return pki.sign_csr(
        a.ca, pki.make_csr("site-b", b.gateway.key), expected_site_id="site-b", lifetime=DAY
    )


def test_good_certificate_passes(sites: tuple[pki.SiteIdentity, pki.SiteIdentity]) -> None:
    a, b = sites
    check_link_cert(b, good_cert(a, b), a.ca.cert, "site-a")


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_check_has_one_message(
    sites: tuple[pki.SiteIdentity, pki.SiteIdentity], case: str
) -> None:
    a, b = sites
    make, message = BAD[case]
    with pytest.raises(PkiError, match=f"^{message}"):
        check_link_cert(b, make(a, b), a.ca.cert, "site-a")


@pytest.mark.parametrize("case", sorted(BAD))
def test_redeem_answer_refused_with_the_shared_message(
    sites: tuple[pki.SiteIdentity, pki.SiteIdentity], case: str
) -> None:
    a, b = sites
    make, message = BAD[case]
    answer = {
        "site": "site-a",
        "ca_pem": a.ca_pem.decode(),
        "cert_pem": pki.cert_to_pem(make(a, b)).decode(),
        "endpoints": ["127.0.0.1:7443"],
    }
    with pytest.raises(TokenError, match=f"^site site-a's grant answer is unusable: {message}"):
        _accept(b, b.state_dir, "site-a", "site-a", a.pin, answer)
    assert links.LINKS.list(b.state_dir) == []
    assert not links.link_cert_path(b.state_dir, "site-a").exists()


@pytest.mark.parametrize("case", sorted(BAD))
def test_renewal_refused_with_the_shared_message(
    sites: tuple[pki.SiteIdentity, pki.SiteIdentity], case: str
) -> None:
    a, b = sites
    make, message = BAD[case]
    cert_path = links.link_cert_path(b.state_dir, "site-a")
    pki.ensure_dir(cert_path.parent)
    current = good_cert(a, b)
    pki.write_cert(cert_path, current)
    LINKS.write(
        b.state_dir,
        links.LinkRecord(
            name="site-a",
            peer_site="site-a",
            peer_ca_pem=a.ca_pem.decode(),
            endpoints=("127.0.0.1:7443",),
            cert_path=str(cert_path),
            created=time.time(),
        ),
    )
    bad = pki.cert_to_pem(make(a, b)).decode()
    renewed = message.replace("the link certificate", "the renewed link certificate", 1)
    with pytest.raises(PkiError, match=f"^{renewed}"):
        links.store_renewed_cert(b, b.state_dir, "site-a", bad)
    assert pki.load_cert(cert_path) == current  # nothing stored
    # and a good one is stored
    fresh = good_cert(a, b)
    assert links.store_renewed_cert(b, b.state_dir, "site-a", pki.cert_to_pem(fresh).decode())
    assert pki.load_cert(cert_path) == fresh
