"""TLS contexts for links and for the grant endpoint, and peer authorization after a handshake.

Link contexts (``server_context``, ``client_context``): TLS 1.3 only, certificates required
both ways, ``VERIFY_X509_STRICT``, ALPN ``meshlink/1``. OpenSSL checks DNS names, not URI
SANs, so the client does not check a host name: the caller authorizes the peer's SPIFFE site
id after the handshake (``authorize_peer``). Rotate certificates by building new contexts.

Grant contexts: the redeemer of a token has no certificate yet and does not know the
issuer's CA, only its pin. ``grant_server_context`` serves the gateway certificate followed
by the CA certificate and asks for no client certificate. ``pinned_client_context(pin)``
returns a context whose TLS objects run the pin check inside ``do_handshake``: once OpenSSL
has finished the handshake (which proves the server holds the leaf's key), the chain the
server sent is read, a CA certificate in it whose SubjectPublicKeyInfo hashes to the pin is
looked for (every one with the pin is tried: a re-signed CA shares its old copy's key), and
the leaf must be signed by such a CA and both be within their validity. Otherwise the
handshake raises ``CaPinMismatch`` (an ``ssl.SSLCertVerificationError``), so asyncio, uvloop
and aiohttp fail the connection before a single byte of application data (the token secret)
is written. The verified CA is then available as ``ssl_object.pinned_ca``.

``ReloadingServerContext`` serves certificate files that are rewritten while the server runs
(the gateway certificate renewed by ``SiteIdentity.load_or_create``): each handshake moves
to a context rebuilt when the files changed, found by ``stat``.
"""

from __future__ import annotations

import _ssl
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509

from meshlink.errors import PeerNotAuthorized, PkiError
from meshlink.pki.certs import (
    ca_pin,
    check_valid_now,
    is_issued_by,
    is_pin,
    peer_site_id,
    pins_equal,
    utcnow,
)
from meshlink.pki.files import check_key_file

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

ALPN_LINK: Final = "meshlink/1"
ALPN_GRANT: Final = "http/1.1"


class CaPinMismatch(ssl.SSLCertVerificationError):
    """The grant endpoint's chain holds no CA matching the pin (or the leaf is not its)."""

    def __init__(self, message: str, *, expected: str, seen: Sequence[str]):
        super().__init__(message)
        self.expected = expected
        self.seen = tuple(seen)

    def __str__(self) -> str:
        return str(self.args[0])


class AlertingSSLObject(ssl.SSLObject):
    """A server-side TLS object whose refusals reach the client as TLS alerts.

    When ``do_handshake`` raises, asyncio and uvloop close the transport at once, and the
    alert OpenSSL wrote into the outgoing buffer (protocol_version to a TLS 1.2 client,
    certificate_required to a client without a certificate, ...) is never sent: the
    client sees "unexpected eof". So the first refusal is reported as "want read": the
    event loop sends what is buffered (the alert) and waits for the client, which, told
    why, closes (or the handshake timeout ends it); a later call raises the refusal.
    ``refused`` is called once with it (subclasses log it)."""

    _refusal: ssl.SSLError | None = None

    def refused(self, error: ssl.SSLError) -> None:
        """Called once, with the error that ends the handshake."""

    def do_handshake(self) -> None:
        if self._refusal is not None:
            raise self._refusal
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            self._refusal = e
            self.refused(e)
            raise ssl.SSLWantReadError("the handshake failed; its alert is being sent") from e


def _tls13_only(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3


def _load_chain(ctx: ssl.SSLContext, cert_path: StrPath, key_path: StrPath) -> None:
    check_key_file(Path(key_path))
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except FileNotFoundError as e:
        raise PkiError(f"cannot load TLS certificate: {e.filename} does not exist") from None
    except (ssl.SSLError, OSError) as e:
        raise PkiError(
            f"cannot load TLS certificate {cert_path} with key {key_path}: {e}"
        ) from None


def _trust(ctx: ssl.SSLContext, pems: Sequence[bytes]) -> None:
    if not pems:
        raise PkiError("no CA certificate to trust: a link context needs at least one")
    for pem in pems:
        try:
            ctx.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            raise PkiError(f"a trusted CA certificate is not valid PEM: {e}") from None


def server_context(
    cert_path: StrPath, key_path: StrPath, trusted_ca_pems: Sequence[bytes]
) -> ssl.SSLContext:
    """Link listener: our gateway certificate; clients must present one from a trusted CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = AlertingSSLObject
    _tls13_only(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    _load_chain(ctx, cert_path, key_path)
    _trust(ctx, trusted_ca_pems)
    ctx.set_alpn_protocols([ALPN_LINK])
    return ctx


def client_context(cert_path: StrPath, key_path: StrPath, trusted_ca_pem: bytes) -> ssl.SSLContext:
    """Link dialer: our client certificate; the server must chain to ``trusted_ca_pem``.

    No host name check: authorize the peer's site id with ``authorize_peer`` after connecting.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _tls13_only(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    _load_chain(ctx, cert_path, key_path)
    _trust(ctx, [trusted_ca_pem])
    ctx.set_alpn_protocols([ALPN_LINK])
    return ctx


def grant_server_context(chain_path: StrPath, key_path: StrPath) -> ssl.SSLContext:
    """Grant endpoint: serves ``chain_path`` (gateway cert then CA cert), no client cert asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = AlertingSSLObject
    _tls13_only(ctx)
    ctx.verify_mode = ssl.CERT_NONE
    _load_chain(ctx, chain_path, key_path)
    ctx.set_alpn_protocols([ALPN_GRANT])
    return ctx


def _stamp(paths: Sequence[StrPath]) -> tuple[tuple[int, int, int, int, int], ...]:
    """What changes when a file is rewritten (atomic renames give a new inode, too)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class ReloadingServerContext:
    """A server context that follows certificate files rewritten on disk (renewal).

    ``context`` is built by ``build()`` at once (its errors are the caller's, at start). Its
    SNI callback, which OpenSSL runs for every ClientHello (with or without a server name),
    stats the ``watch`` files and moves the handshake to a context built afresh when any of
    them changed since the last build; otherwise to the last one built, so an unchanged
    certificate costs a few ``stat`` calls per handshake, not a PEM parse. If a rebuild fails
    (a renewal caught between two file writes, a damaged file) the last good context goes on
    serving, the error is logged once, and the next handshake tries again.
    """

    def __init__(self, build: Callable[[], ssl.SSLContext], watch: Sequence[StrPath]):
        self._build = build
        self._watch = tuple(watch)
        stamp = _stamp(self._watch)  # before the build: a write in between is seen later
        self.context = self.current = build()
        self.context.sni_callback = self._pick
        self._stamp = stamp
        self._failed: object = None
        self.rebuilds = 0

    def refresh(self) -> ssl.SSLContext:
        """The context for a handshake starting now (rebuilt if a watched file changed)."""
        try:
            stamp = _stamp(self._watch)
        except OSError as e:
            self._fail(("stat", str(e)), f"cannot read a certificate file: {e}")
            return self.current
        if stamp == self._stamp:
            return self.current
        try:
            ctx = self._build()
        except (PkiError, OSError, ssl.SSLError, ValueError) as e:
            self._fail(stamp, str(e))
            return self.current
        self.current, self._stamp, self._failed = ctx, stamp, None
        self.rebuilds += 1
        log.info("TLS certificate files changed: new handshakes use them")
        return ctx

    def _fail(self, key: object, message: str) -> None:
        if key != self._failed:
            log.error("%s; serving the previous certificate until it is fixed", message)
            self._failed = key

    def _pick(self, obj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        obj.context = self.refresh()


def _candidate_failure(
    leaf: x509.Certificate, cand: x509.Certificate, now: datetime
) -> tuple[int, str] | None:
    """Why ``cand`` (whose pin matches) cannot vouch for ``leaf``: (how far the checks got,
    what failed), or None if it can. The checks run in a fixed order, so a higher number
    means a candidate that came closer to being the right one."""
    try:
        is_ca = cand.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return 0, "the certificate with that pin is not a CA certificate"
    if not is_issued_by(leaf, cand):
        return 1, "the endpoint's certificate is not signed by that CA"
    try:
        check_valid_now(cand, "that CA certificate", now)
    except PkiError as e:
        return 2, str(e)
    try:
        check_valid_now(leaf, "the endpoint's certificate", now)
    except PkiError as e:
        return 3, str(e)
    return None


def verify_pinned_chain(chain_der: Sequence[bytes], expected_pin: str) -> x509.Certificate:
    """Return a CA in ``chain_der`` (leaf first) whose pin is ``expected_pin``, that signed
    the leaf, and that is valid now (with the leaf); raise CaPinMismatch otherwise.

    Every certificate with the pin is tried, in chain order: a CA re-signed with the same
    key (a new validity) shares the pin with its old copy, and either may come first. If
    none will do, the refusal names the check that failed for the candidate that passed
    the most checks. Pure: usable without a connection."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        raise CaPinMismatch(
            "the grant endpoint sent a certificate that cannot be parsed",
            expected=expected_pin,
            seen=(),
        ) from None
    if not chain:
        raise CaPinMismatch(
            "the grant endpoint sent no certificate", expected=expected_pin, seen=()
        )
    leaf, rest = chain[0], chain[1:]
    seen = [ca_pin(c) for c in rest]
    now = utcnow()
    failures: list[tuple[int, str]] = []
    for cand, pin in zip(rest, seen, strict=True):
        if not pins_equal(pin, expected_pin):
            continue
        failure = _candidate_failure(leaf, cand, now)
        if failure is None:
            return cand
        failures.append(failure)
    if failures:
        # max() keeps the first of equals: the earliest candidate that got furthest.
        _, reason = max(failures, key=lambda f: f[0])
        if len(failures) > 1:
            reason += f" ({len(failures)} certificates have that pin, none is usable)"
        raise CaPinMismatch(
            f"the grant endpoint's CA matches the token's pin but {reason}",
            expected=expected_pin,
            seen=seen,
        )
    raise CaPinMismatch(
        f"the grant endpoint's CA pin is {', '.join(seen) or 'absent (no CA in its chain)'}, "
        f"the token expects {expected_pin}",
        expected=expected_pin,
        seen=seen,
    )


def _unverified_chain_der(obj: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    public = getattr(obj, "get_unverified_chain", None)  # Python >= 3.13
    if public is not None:
        return [bytes(c) for c in public()]
    # Python 3.11/3.12 have the method only on the private _ssl object.
    raw: Any = getattr(obj, "_sslobj", None)
    chain = raw.get_unverified_chain() if raw is not None else None
    return [c.public_bytes(_ssl.ENCODING_DER) for c in (chain or [])]


def _pin_of_context(obj: ssl.SSLObject | ssl.SSLSocket) -> str:
    pin = getattr(obj.context, "expected_pin", None)
    if not isinstance(pin, str):  # pragma: no cover - only built by pinned_client_context
        raise CaPinMismatch("no pin configured", expected="", seen=())
    return pin


class PinnedSSLObject(ssl.SSLObject):
    """An SSLObject that checks the CA pin as the last step of its handshake."""

    pinned_ca: x509.Certificate | None = None

    def do_handshake(self) -> None:
        super().do_handshake()
        self.pinned_ca = verify_pinned_chain(_unverified_chain_der(self), _pin_of_context(self))


class PinnedSSLSocket(ssl.SSLSocket):
    """The same check for blocking sockets (``wrap_socket``)."""

    pinned_ca: x509.Certificate | None = None

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        self.pinned_ca = verify_pinned_chain(_unverified_chain_der(self), _pin_of_context(self))


class PinnedClientContext(ssl.SSLContext):
    """Client context for the grant endpoint: accepts the server only if its CA has the pin."""

    expected_pin: str
    sslobject_class = PinnedSSLObject
    sslsocket_class = PinnedSSLSocket


def pinned_client_context(expected_pin: str) -> ssl.SSLContext:
    """A TLS 1.3 client context that accepts the grant server only if its CA matches the pin.

    OpenSSL cannot verify against a CA it does not have, so verification is done by the
    context's SSL objects at the end of the handshake (see the module docstring).
    """
    if not is_pin(expected_pin):
        raise PkiError(f"{expected_pin!r} is not a CA pin: expected sha256:<64 hex digits>")
    ctx = PinnedClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.expected_pin = expected_pin
    _tls13_only(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # replaced by the pin check in PinnedSSLObject
    ctx.set_alpn_protocols([ALPN_GRANT])
    return ctx


def authorize_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected_site: str | None = None
) -> str:
    """After a link handshake: the peer's site id, checked against ``expected_site`` if given.

    Also requires the ``meshlink/1`` ALPN protocol. Raises PeerNotAuthorized.
    """
    if ssl_object is None:
        raise PeerNotAuthorized("the connection is not TLS")
    alpn = ssl_object.selected_alpn_protocol()
    if alpn != ALPN_LINK:
        raise PeerNotAuthorized(f"the peer did not negotiate ALPN {ALPN_LINK} (got {alpn!r})")
    site = peer_site_id(ssl_object.getpeercert())
    if expected_site is not None and site != expected_site:
        raise PeerNotAuthorized(
            f"the peer's certificate is for site {site!r}, expected {expected_site!r}"
        )
    return site
