"""The redeeming side of a link: turn a token into a link record, and re-authenticate a
link whose certificate expired.

``redeem`` connects to the grant address in the token with ``pinned_client_context`` (the
TLS handshake fails unless the server's CA matches the token's pin, before the secret is
sent), posts a CSR made from our gateway key (never the key) and our gateway certificate
(which lets the issuer recognise this very site linking again), checks everything in the
answer, and writes ``links/<name>.json`` and ``links/<name>.crt``. Every failure is one
TokenError subclass with a line naming the cause.

``reauthenticate`` posts, to the grant endpoint recorded in the link and pinned to the
peer's CA recorded there, our gateway certificate and a CSR for its key (no token: the
gateway certificate, signed by our CA that the issuer pinned at redemption, is the proof;
``issuer.decide_reauth``), and stores the fresh link certificate it gets.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Final

import aiohttp
from cryptography import x509

from meshlink.config import HostPort
from meshlink.errors import (
    GrantUnreachable,
    PkiError,
    SiteIdClash,
    TokenError,
    TokenExpired,
    TokenPinMismatch,
)
from meshlink.links.certcheck import check_link_cert
from meshlink.links.grant import REAUTH_PATH, REDEEM_PATH
from meshlink.links.issuer import REFUSALS, _ts
from meshlink.links.records import (
    LINKS,
    LinkRecord,
    check_name,
    find_link_to,
    is_peer_allowed,
    link_cert_path,
    write_link,
)
from meshlink.links.renewal import store_renewed_cert
from meshlink.links.tokens import decode_token
from meshlink.names import split_hostport
from meshlink.pki import (
    CaPinMismatch,
    SiteIdentity,
    ca_pin,
    cert_from_pem,
    cert_to_pem,
    csr_to_pem,
    make_csr,
    pinned_client_context,
)
from meshlink.store import StateLike

log = logging.getLogger(__name__)

MAX_ANSWER: Final = 256 * 1024


def _clean(text: object, limit: int = 400) -> str:
    """A remote message made safe to print on one line."""
    s = "".join(c if c.isprintable() else " " for c in str(text))
    return s[:limit]


def _local_checks(identity: SiteIdentity, state: StateLike, site: str, name: str) -> None:
    if site == identity.site_id:
        raise SiteIdClash(
            f"this token was issued by this very site ({site}): run `meshlink link create` "
            "on the other site"
        )
    existing = LINKS.load(state, name)
    if existing is not None:
        raise SiteIdClash(
            f"a link named {name!r} already exists (to site {existing.peer_site}): "
            f"delete it first (`meshlink link delete {name}`) or choose another --name"
        )
    other = find_link_to(state, site)
    if other is not None:
        raise SiteIdClash(f"this site is already linked to site {site} (link {other.name!r})")
    if is_peer_allowed(state, site):
        raise SiteIdClash(
            f"site {site} is already linked to this site (it redeemed a token of ours): "
            "one link per pair of sites is enough"
        )


def _refused(site: str, status: int, data: Any, what: str = "the token") -> TokenError:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        code, message = data["error"], _clean(data.get("message", ""))
        refusal = REFUSALS.get(code)
        cls = refusal.error if refusal else TokenError
        return cls(f"site {site} refused {what}: {message or code}")
    return TokenError(
        f"the grant endpoint answered HTTP {status} without a meshlink answer: "
        "is the token's grant address really a meshlink grant endpoint?"
    )


async def _post(
    address: str,
    site: str,
    pin: str,
    body: dict[str, str],
    timeout: float,  # noqa: ASYNC109
    path: str = REDEEM_PATH,
) -> tuple[int, Any]:
    url = f"https://{address}{path}"
    connector = aiohttp.TCPConnector(ssl=pinned_client_context(pin), force_close=True)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as session,
            session.post(url, json=body) as resp,
        ):
            raw = await resp.content.read(MAX_ANSWER)
            status = resp.status
    except aiohttp.ClientConnectorCertificateError as e:
        cause = e.certificate_error
        detail = str(cause) if isinstance(cause, CaPinMismatch) else _clean(cause)
        raise TokenPinMismatch(
            f"the grant endpoint at {address} is not the site the token was made by "
            f"({detail}); nothing was sent to it"
        ) from None
    except aiohttp.ClientConnectorError as e:
        err = e.os_error
        reason = os.strerror(err.errno) if err.errno else _clean(err) or type(err).__name__
        raise GrantUnreachable(
            f"cannot reach the grant endpoint of site {site} at {address}: {reason}"
        ) from None
    except TimeoutError:
        raise GrantUnreachable(
            f"the grant endpoint of site {site} at {address} did not answer within {timeout:g} s"
        ) from None
    except aiohttp.ClientError as e:
        raise GrantUnreachable(
            f"the grant endpoint of site {site} at {address} failed: "
            f"{_clean(e) or type(e).__name__}"
        ) from None
    try:
        return status, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return status, None


async def redeem(
    identity: SiteIdentity,
    state: StateLike,
    token_text: str,
    *,
    name: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (the whole exchange, passed to aiohttp)
) -> LinkRecord:
    """Redeem a token of another site and record the link (named after that site by default)."""
    token = decode_token(token_text)
    name = check_name(name or token.site, "link name")
    _local_checks(identity, state, token.site, name)
    if time.time() >= token.exp:
        raise TokenExpired(
            f"the token expired at {_ts(token.exp)}: ask site {token.site} for a new one"
        )
    address = str(HostPort(*split_hostport(token.grant, strict=True)))
    body = {
        "token_id": token.id,
        "secret": token.secret,
        "site": identity.site_id,
        "ca_pem": identity.ca_pem.decode(),
        "csr_pem": csr_to_pem(make_csr(identity.site_id, identity.gateway.key)).decode(),
        "gateway_pem": cert_to_pem(identity.gateway.cert).decode(),
    }
    status, data = await _post(address, token.site, token.pin, body, timeout)
    if status != 200:
        raise _refused(token.site, status, data)
    return _accept(identity, state, name, token.site, token.pin, data, address)


async def reauthenticate(
    identity: SiteIdentity,
    state: StateLike,
    rec: LinkRecord,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (the whole exchange, passed to aiohttp)
) -> x509.Certificate:
    """Get a fresh link certificate for ``rec`` from its issuer without a token (see the
    module docstring) and store it; TokenError (LinkRevoked when the issuer no longer has
    us as a peer) with one line otherwise."""
    if not rec.grant:
        raise TokenError(
            f"link {rec.name} records no grant address (it was made before meshlink 0.1.0): "
            f"re-link it with a new token from site {rec.peer_site}"
        )
    try:
        pin = ca_pin(cert_from_pem(rec.peer_ca_pem, f"the CA of site {rec.peer_site}"))
    except PkiError as e:
        raise TokenError(f"link {rec.name}: {e}") from None
    body = {
        "site": identity.site_id,
        "gateway_pem": cert_to_pem(identity.gateway.cert).decode(),
        "csr_pem": csr_to_pem(make_csr(identity.site_id, identity.gateway.key)).decode(),
    }
    status, data = await _post(rec.grant, rec.peer_site, pin, body, timeout, REAUTH_PATH)
    if status != 200:
        raise _refused(rec.peer_site, status, data, "to re-authenticate this site")
    if not isinstance(data, dict) or not isinstance(data.get("cert_pem"), str):
        raise TokenError(f"site {rec.peer_site}'s grant endpoint answered without a certificate")
    try:
        return store_renewed_cert(
            identity, state, rec.name, data["cert_pem"], "the re-issued link certificate"
        )
    except PkiError as e:
        raise TokenError(f"site {rec.peer_site}'s answer is unusable: {e}") from None


def _accept(
    identity: SiteIdentity,
    state: StateLike,
    name: str,
    site: str,
    pin: str,
    data: Any,
    grant: str = "",
) -> LinkRecord:
    """Check the grant answer and write the link; any doubt is a TokenError."""
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) for k in ("site", "ca_pem", "cert_pem")
    ):
        raise TokenError(f"site {site}'s grant endpoint sent an answer without site, CA or cert")
    if data["site"] != site:
        raise TokenError(
            f"the grant endpoint answered for site {_clean(data['site'], 64)!r}, "
            f"but the token is from {site!r}"
        )
    try:
        ca = cert_from_pem(data["ca_pem"], "the issuer's CA certificate")
        if ca_pin(ca) != pin:
            raise TokenPinMismatch(
                f"site {site} answered with a CA whose pin {ca_pin(ca)} is not the token's {pin}"
            )
        cert = cert_from_pem(data["cert_pem"], "the link certificate")
        check_link_cert(identity, cert, ca, site)
    except PkiError as e:
        raise TokenError(f"site {site}'s grant answer is unusable: {e}") from None
    endpoints = data.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise TokenError(f"site {site} sent no gateway endpoints to dial")
    for ep in endpoints:
        try:
            split_hostport(ep if isinstance(ep, str) else "", strict=True)
        except ValueError:
            raise TokenError(
                f"site {site} sent a gateway endpoint that is not host:port: {_clean(ep, 80)!r}"
            ) from None
    cert_path = link_cert_path(state, name)
    rec = LinkRecord(
        name=name,
        peer_site=site,
        peer_ca_pem=cert_to_pem(ca).decode(),
        endpoints=tuple(endpoints),
        cert_path=str(cert_path),
        created=time.time(),
        grant=grant,
    )
    write_link(state, rec, cert_to_pem(cert))
    log.info("linked to site %s as %r (endpoints %s)", site, name, ", ".join(endpoints))
    return rec
