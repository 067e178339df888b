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
