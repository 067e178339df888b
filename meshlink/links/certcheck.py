"""The checks a link certificate signed by a peer must pass before it is stored: the one
place for them and their words, used when a token is redeemed (``redeem``) and when the
certificate is renewed over the link (``renewal``)."""

from __future__ import annotations

from cryptography import x509

from meshlink.errors import PkiError
from meshlink.pki import SiteIdentity, check_valid_now, is_issued_by, public_keys_equal, site_id_of


def check_link_cert(
    identity: SiteIdentity,
    cert: x509.Certificate,
    ca: x509.Certificate,
    peer_site: str,
    what: str = "the link certificate",
) -> None:
    """Raise PkiError unless ``cert`` names this site, holds this site's gateway key, is
    signed by ``ca`` (the CA of ``peer_site``) and is valid now. ``what`` names the
    certificate in the message (``<what> from site <peer> ...``)."""
    what = f"{what} from site {peer_site}"
    named = site_id_of(cert)
    if named != identity.site_id:
        raise PkiError(f"{what} is for site {named!r}, not for this site ({identity.site_id})")
    if not public_keys_equal(cert.public_key(), identity.gateway.key.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{what} is for another key than this site's gateway key")
    if not is_issued_by(cert, ca):
        raise PkiError(f"{what} is not signed by that site's CA")
    check_valid_now(cert, what)


def check_site_proof(
    ca: x509.Certificate,
    gateway_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    site: str,
) -> None:
    """Raise PkiError unless ``gateway_cert`` and ``csr`` prove that their sender holds the
    gateway key of ``site`` as certified by ``ca`` (the CA pinned when that site first
    redeemed a token): the certificate names ``site``, ``ca`` signed it, it is valid now,
    and the CSR is for the same key (its own signature, checked when it is signed, proves
    the sender holds that key). Nothing secret travels: a captured proof only ever yields
    a certificate for the key of the site that made it."""
    named = site_id_of(gateway_cert)
    if named != site:
        raise PkiError(f"the gateway certificate sent is for site {named!r}, not {site!r}")
    if not is_issued_by(gateway_cert, ca):
        raise PkiError(
            f"the gateway certificate sent is not signed by the CA site {site} linked with"
        )
    check_valid_now(gateway_cert, f"the gateway certificate of site {site}")
    if not public_keys_equal(csr.public_key(), gateway_cert.public_key()):  # type: ignore[arg-type]
        raise PkiError("the CSR is for another key than the gateway certificate sent")
