"""The issuing side of a link: creating tokens and deciding a redemption (no network I/O).

``decide_redeem`` is the whole grant decision as a function of the files in the state
directory and one request body; ``grant.py`` only carries it over HTTPS. Checks, in order:
malformed request; unknown token id or wrong secret (the same answer for both, and the
secret's hash is compared in constant time even for unknown ids, so a caller without the
secret learns nothing about an id); expired; used up; site id clash; bad CA or CSR. The
secret is checked before expiry and uses on purpose: otherwise "expired" or "used up" would
tell a caller without the secret that the id exists. A use is consumed only when a
certificate is signed.

A site id that is already a peer here is a clash, unless the redeemer is that same site
linking again (after it deleted its link while the two could not talk): it sends the CA we
pinned for it and proves it holds that site's gateway key (``check_site_proof``), and its
peer record is replaced. Any other site with that id is refused.

``decide_reauth`` re-authenticates a current peer without a token, after its link
certificate expired (its issuer was away longer than the certificate's life): the peer
proves its site identity with its gateway certificate, signed by the CA pinned at
redemption, and a CSR for the same key, and gets a fresh link certificate. No private key
and no secret crosses the wire, and a revoked or unlinked peer (no peer record) is refused:
it needs a new token.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlink.errors import (
    LinkRevoked,
    MeshlinkError,
    PkiError,
    SiteIdClash,
    TokenError,
    TokenExpired,
    TokenMalformed,
    TokenUnknown,
    TokenUsedUp,
)
from meshlink.links.certcheck import check_site_proof
from meshlink.links.records import (
    PEERS,
    TOKENS,
    PeerRecord,
    TokenRecord,
    find_link_to,
    is_peer_allowed,
    prune_tokens,
    secret_hash,
)
from meshlink.links.tokens import (
    Token,
    encode_token,
    is_token_id,
    new_secret,
    new_token_id,
)
from meshlink.names import split_hostport
from meshlink.pki import (
    LINK_CERT_LIFETIME,
    SiteIdentity,
    cert_from_pem,
    cert_to_pem,
    csr_from_pem,
    is_site_id,
    sign_csr,
    site_id_of,
)
from meshlink.store import FreshReads, StateLike, as_store

log = logging.getLogger(__name__)

MAX_TOKEN_EXPIRY: Final = timedelta(days=30)
MAX_TOKEN_USES: Final = 1000


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    status: int
    error: type[TokenError]


REFUSALS: Final[Mapping[str, Refusal]] = {
    r.code: r
    for r in (
        Refusal("malformed_request", 400, TokenMalformed),
        Refusal("unknown_token", 404, TokenUnknown),
        Refusal("token_expired", 410, TokenExpired),
        Refusal("token_used_up", 403, TokenUsedUp),
        Refusal("site_id_clash", 409, SiteIdClash),
        Refusal("bad_csr", 422, TokenError),
        Refusal("not_a_peer", 401, LinkRevoked),
    )
}
"""Every way the grant endpoint refuses: JSON ``error`` code, HTTP status, redeemer's error."""


class GrantRefused(MeshlinkError):
    """A redemption was refused; ``code`` is a key of REFUSALS."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.status = REFUSALS[code].status


def _ts(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def create_token(
    identity: SiteIdentity,
    grant_address: str,
    *,
    expiry: timedelta = timedelta(minutes=15),
    uses: int = 1,
    now: float | None = None,
) -> str:
    """Make a token for ``identity``'s site, store its hash, and return the token text."""
    if not timedelta(seconds=1) <= expiry <= MAX_TOKEN_EXPIRY:
        raise TokenError(f"token expiry {expiry} must be between 1 second and 30 days")
    if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
        raise TokenError(f"token uses {uses!r} must be between 1 and {MAX_TOKEN_USES}")
    try:
        split_hostport(grant_address, strict=True)
    except ValueError as e:
        raise TokenError(f"grant address: {e}; set grant.advertise in the site config") from None
    now = time.time() if now is None else now
    state = identity.state
    prune_tokens(state, now=now)
    token = Token(
        id=new_token_id(),
        secret=new_secret(),
        grant=grant_address,
        pin=identity.pin,
        site=identity.site_id,
        exp=int(now + expiry.total_seconds()),
    )
    text = encode_token(token)
    TOKENS.write(
        state,
        TokenRecord(
            id=token.id,
            secret_sha256=secret_hash(token.secret),
            uses=uses,
            uses_left=uses,
            expires=token.exp,
            created=int(now),
        ),
    )
    log.info("token %s created (%d use(s), expires %s)", token.id, uses, _ts(token.exp))
    return text


_FIELDS: Final = ("token_id", "secret", "site", "ca_pem", "csr_pem")
_DUMMY_HASH: Final = "0" * 64


def _parse_request(body: object) -> dict[str, str]:
    if not isinstance(body, dict):
        raise GrantRefused("malformed_request", "the request body must be a JSON object")
    out = {}
    for name in _FIELDS:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise GrantRefused("malformed_request", f"the request lacks the text field {name!r}")
        out[name] = value
    if not is_site_id(out["site"]):
        raise GrantRefused("malformed_request", f"the site id {out['site']!r} is not a DNS label")
    return out


def _check_peer_ca(ca_pem: str, site: str) -> x509.Certificate:
    try:
        ca = cert_from_pem(ca_pem, "the CA certificate")
        owner = site_id_of(ca)
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (PkiError, x509.ExtensionNotFound, ValueError) as e:
        raise GrantRefused(
            "bad_csr", f"the redeeming site's CA certificate is unusable: {e}"
        ) from None
    if not is_ca or owner != site:
        raise GrantRefused(
            "bad_csr", f"the CA certificate sent is not a meshlink CA for site {site!r}"
        )
    return ca


def decide_redeem(
    identity: SiteIdentity,
    state: StateLike,
    body: object,
    *,
    endpoints: Sequence[str],
    cert_lifetime: timedelta = LINK_CERT_LIFETIME,
    now: float | None = None,
) -> dict[str, Any]:
    """Decide one redemption against the records in ``state``.

    Returns the success answer, or raises GrantRefused. Safe against other replicas of the
    site deciding at the same time: the token's use is taken by an optimistic write of its
    record, which sees any use taken meanwhile.
    """
    now = time.time() if now is None else now
    state = FreshReads(as_store(state))  # a token made on another replica a moment ago counts
    req = _parse_request(body)
    tid = req["token_id"]
    rec = TOKENS.load(state, tid) if is_token_id(tid) else None
    # Constant-time comparison, made even when the id is unknown.
    ok = hmac.compare_digest(secret_hash(req["secret"]), rec.secret_sha256 if rec else _DUMMY_HASH)
    if rec is None or not ok:
        raise GrantRefused(
            "unknown_token",
            f"site {identity.site_id} has no such token (never issued, revoked, or its "
            "secret was changed): ask its operator for a new token",
        )
    _check_usable(identity, rec, now)
    site = req["site"]
    if site == identity.site_id:
        raise GrantRefused(
            "site_id_clash",
            f"the redeeming site has the issuer's own site id {site!r}: "
            "every site needs its own id",
        )
    relink = is_peer_allowed(state, site)
    if relink:
        _check_same_site(identity, state, site, req["ca_pem"], req["csr_pem"], body)
    if find_link_to(state, site) is not None:
        raise GrantRefused(
            "site_id_clash",
            f"site {identity.site_id} already has a link to {site!r} (it redeemed a token of "
            "yours): one link per pair of sites is enough",
        )
    ca = _check_peer_ca(req["ca_pem"], site)
    try:
        csr = csr_from_pem(req["csr_pem"])
        cert = sign_csr(identity.ca, csr, expected_site_id=site, lifetime=cert_lifetime)
    except PkiError as e:
        raise GrantRefused("bad_csr", str(e)) from None
    _take_use(identity, state, tid, rec.secret_sha256, now)
    PEERS.write(
        state,
        PeerRecord(
            site=site,
            ca_pem=cert_to_pem(ca).decode(),
            linked_at=now,
            token_id=rec.id,
            cert_not_after=cert.not_valid_after_utc.timestamp(),
        ),
    )
    if relink:
        log.info("site %s linked again with token %s (same CA, same gateway key)", site, rec.id)
    else:
        log.info("site %s linked with token %s", site, rec.id)
    return {
        "site": identity.site_id,
        "ca_pem": identity.ca_pem.decode(),
        "cert_pem": cert_to_pem(cert).decode(),
        "endpoints": list(endpoints),
    }


def _check_usable(identity: SiteIdentity, rec: TokenRecord, now: float) -> None:
    if now >= rec.expires:
        raise GrantRefused(
            "token_expired",
            f"the token expired at {_ts(rec.expires)}: ask site {identity.site_id} "
            "for a new one (`meshlink token create`)",
        )
    if rec.uses_left <= 0:
        raise GrantRefused(
            "token_used_up",
            f"the token was already used ({rec.uses} use(s) allowed): ask site "
            f"{identity.site_id} for a new one (`meshlink token create --uses N`)",
        )


def _take_use(
    identity: SiteIdentity, state: StateLike, tid: str, secret_sha256: str, now: float
) -> None:
    """Take one use of the token, as last written (another replica may have taken the last
    one, or the token may have been revoked, since it was read)."""

    def take(current: TokenRecord | None) -> TokenRecord:
        if current is None or current.secret_sha256 != secret_sha256:
            raise GrantRefused(
                "unknown_token",
                f"site {identity.site_id} has no such token (revoked meanwhile): ask its "
                "operator for a new token",
            )
        _check_usable(identity, current, now)
        return replace(current, uses_left=current.uses_left - 1)

    TOKENS.update(state, tid, take)


def _check_same_site(
    identity: SiteIdentity, state: StateLike, site: str, ca_pem: str, csr_pem: str, body: object
) -> None:
    """A redeemer whose site id is already a peer here may link again only as that same
    site: the CA pinned for it, and proof that it holds that site's gateway key."""
    known = PEERS.load(state, site)
    clash = (
        f"a site with id {site!r} and another CA is already linked to {identity.site_id}: "
        f"revoke it there first (`meshlink peer revoke {site}`) or give the new site "
        "another id"
    )
    try:
        same_ca = known is not None and cert_from_pem(known.ca_pem).public_bytes(
            serialization.Encoding.DER
        ) == cert_from_pem(ca_pem).public_bytes(serialization.Encoding.DER)
    except PkiError:
        same_ca = False
    if not same_ca:
        raise GrantRefused("site_id_clash", clash)
    assert known is not None
    gateway_pem = body.get("gateway_pem") if isinstance(body, dict) else None
    if not isinstance(gateway_pem, str):
        raise GrantRefused(
            "site_id_clash",
            f"site {site!r} is already linked to {identity.site_id}; to link it again, "
            "redeem with a meshlink that sends its gateway certificate (0.1.0 or later)",
        )
    _prove(known, gateway_pem, csr_pem)


def _prove(peer: PeerRecord, gateway_pem: str, csr_pem: str) -> x509.CertificateSigningRequest:
    """The CSR of a peer that proved it is ``peer.site`` (else GrantRefused)."""
    try:
        csr = csr_from_pem(csr_pem)
        check_site_proof(
            cert_from_pem(peer.ca_pem, f"the CA of site {peer.site}"),
            cert_from_pem(gateway_pem, "the gateway certificate"),
            csr,
            peer.site,
        )
    except (PkiError, ValueError, TypeError) as e:
        raise GrantRefused("bad_csr", f"site {peer.site} did not prove its identity: {e}") from None
    return csr


def decide_reauth(
    identity: SiteIdentity,
    state: StateLike,
    body: object,
    *,
    cert_lifetime: timedelta = LINK_CERT_LIFETIME,
) -> dict[str, Any]:
    """Re-authenticate a current peer (see the module docstring): the success answer
    ``{site, cert_pem}``, or GrantRefused."""
    fields = {}
    for name in ("site", "gateway_pem", "csr_pem"):
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise GrantRefused("malformed_request", f"the request lacks the text field {name!r}")
        fields[name] = value
    site = fields["site"]
    state = FreshReads(as_store(state))  # a revoke made on another replica a moment ago counts
    peer = PEERS.load(state, site) if is_site_id(site) else None
    if peer is None:
        raise GrantRefused(
            "not_a_peer",
            f"site {site!r} is not linked to {identity.site_id} any more (its link was revoked "
            f"or deleted there): ask {identity.site_id} for a new token",
        )
    csr = _prove(peer, fields["gateway_pem"], fields["csr_pem"])
    try:
        cert = sign_csr(identity.ca, csr, expected_site_id=site, lifetime=cert_lifetime)
    except PkiError as e:
        raise GrantRefused("bad_csr", str(e)) from None
    _signed_until(state, site, cert)
    log.info(
        "site %s re-authenticated with its gateway certificate: new link certificate until %s",
        site,
        _ts(cert.not_valid_after_utc.timestamp()),
    )
    return {"site": identity.site_id, "cert_pem": cert_to_pem(cert).decode()}


def sign_renewal(
    identity: SiteIdentity,
    state: StateLike,
    peer_site: str,
    csr_pem: str,
    *,
    lifetime: timedelta = LINK_CERT_LIFETIME,
) -> str:
    """Issuer side of renewal over a live link: a fresh client certificate for a current peer."""
    peer = PEERS.load(state, peer_site) if is_site_id(peer_site) else None
    if peer is None:
        raise PkiError(f"site {peer_site!r} is not a peer (revoked?): its renewal is refused")
    cert = sign_csr(
        identity.ca, csr_from_pem(csr_pem), expected_site_id=peer_site, lifetime=lifetime
    )
    _signed_until(state, peer_site, cert)
    log.info("renewed the link certificate of site %s", peer_site)
    return cert_to_pem(cert).decode()


def _signed_until(state: StateLike, site: str, cert: x509.Certificate) -> None:
    """Record when the last link certificate signed for ``site`` expires (unless the peer
    was revoked meanwhile: a revocation is never undone by a renewal)."""
    until = cert.not_valid_after_utc.timestamp()
    PEERS.update(state, site, lambda p: None if p is None else replace(p, cert_not_after=until))
