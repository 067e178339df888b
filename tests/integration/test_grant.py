"""The grant endpoint on loopback: a real GrantServer over TLS 1.3 and `redeem` from other
sites, success and every refusal with its own exception and message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web
from cryptography import x509

from meshlink import links, pki
from meshlink.errors import (
    GrantUnreachable,
    LinkRevoked,
    SiteIdClash,
    TokenExpired,
    TokenMalformed,
    TokenPinMismatch,
    TokenUnknown,
    TokenUsedUp,
)
from meshlink.links.tokens import b64url_encode
from meshlink.pki.tls import PinnedSSLSocket
from tests.sites import free_port

pytestmark = pytest.mark.timeout(60)

GATEWAY_EPS = ["127.0.0.1:7443", "[::1]:7443"]


@dataclass
class Issuer:
    identity: pki.SiteIdentity
    server: links.GrantServer
    grant: links.RunningGrant
    bodies: list[bytes] = field(default_factory=list)
    clock_offset: float = 0.0

    def token(self, **kw: object) -> str:
        return links.create_token(self.identity, self.grant.address, **kw)  # type: ignore[arg-type]


async def start_issuer(tmp_path: Path, site_id: str = "site-a") -> Issuer:
    ident = pki.SiteIdentity.load_or_create(tmp_path / site_id, site_id)
    holder: list[Issuer] = []
    bodies: list[bytes] = []

    @web.middleware
    async def capture(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            bodies.append(await request.read())
        except web.HTTPRequestEntityTooLarge:
            bodies.append(b"<too large>")
        return await handler(request)

    server = links.GrantServer(
        ident, ident.state_dir, GATEWAY_EPS, clock=lambda: time.time() + holder[0].clock_offset
    )
    grant = await links.start_grant_server(server, "127.0.0.1", 0, middlewares=[capture])
    issuer = Issuer(ident, server, grant, bodies)
    holder.append(issuer)
    return issuer


@pytest.fixture
async def issuer(tmp_path: Path) -> AsyncIterator[Issuer]:
    iss = await start_issuer(tmp_path)
    try:
        yield iss
    finally:
        await iss.grant.close()


def site(tmp_path: Path, name: str, folder: str | None = None) -> pki.SiteIdentity:
    return pki.SiteIdentity.load_or_create(tmp_path / (folder or name), name)


def rewrite(token: str, **change: object) -> str:
    return links.encode_token(replace(links.decode_token(token), **change))  # type: ignore[arg-type]


async def test_redeem_success(
    issuer: Issuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    b = site(tmp_path, "site-b")
    token = issuer.token()
    rec = await links.redeem(b, b.state_dir, token)

    # the link record and its certificate
    assert rec.name == "site-a"
    assert rec.peer_site == "site-a"
    assert rec.endpoints == tuple(GATEWAY_EPS)
    assert links.LINKS.list(b.state_dir) == [rec]
    assert links.LINKS.load(b.state_dir, "site-a") == rec
    assert stat.S_IMODE((b.state_dir / "links" / "site-a.json").stat().st_mode) == 0o600
    cert = pki.load_cert(Path(rec.cert_path))
    assert pki.site_id_of(cert) == "site-b"
    assert pki.public_keys_equal(cert.public_key(), b.gateway.key.public_key())  # type: ignore[arg-type]
    assert pki.is_issued_by(cert, issuer.identity.ca.cert)
    assert pki.ca_pin(pki.cert_from_pem(rec.peer_ca_pem)) == issuer.identity.pin
    life = cert.not_valid_after_utc - pki.utcnow()
    assert timedelta(hours=23) < life <= timedelta(hours=24)

    # the issuer's side
    peers = links.PEERS.list(issuer.identity.state_dir)
    assert [p.site for p in peers] == ["site-b"]
    assert peers[0].ca_pem == b.ca_pem.decode()
    assert peers[0].token_id == links.decode_token(token).id
    assert links.is_peer_allowed(issuer.identity.state_dir, "site-b")

    # what went over the wire: a CSR and certificates (the CA, the gateway's), never a
    # private key
    assert len(issuer.bodies) == 1
    sent = issuer.bodies[0]
    assert b"PRIVATE KEY" not in sent
    req = json.loads(sent)
    assert set(req) == {"token_id", "secret", "site", "ca_pem", "csr_pem", "gateway_pem"}
    assert pki.cert_from_pem(req["gateway_pem"]) == b.gateway.cert
    assert "BEGIN CERTIFICATE REQUEST" in req["csr_pem"]
    # and neither the token nor its secret reached a log line
    assert links.decode_token(token).secret not in caplog.text
    assert token not in caplog.text


async def test_used_up(issuer: Issuer, tmp_path: Path) -> None:
    token = issuer.token()
    b, c = site(tmp_path, "site-b"), site(tmp_path, "site-c")
    await links.redeem(b, b.state_dir, token)
    with pytest.raises(TokenUsedUp, match=r"site site-a refused the token: .*already used"):
        await links.redeem(c, c.state_dir, token)
    assert links.LINKS.list(c.state_dir) == []
    assert not links.is_peer_allowed(issuer.identity.state_dir, "site-c")


async def test_multi_use_token(issuer: Issuer, tmp_path: Path) -> None:
    token = issuer.token(uses=2)
    for name in ("site-b", "site-c"):
        s = site(tmp_path, name)
        await links.redeem(s, s.state_dir, token)
    d = site(tmp_path, "site-d")
    with pytest.raises(TokenUsedUp):
        await links.redeem(d, d.state_dir, token)
    assert [p.site for p in links.PEERS.list(issuer.identity.state_dir)] == ["site-b", "site-c"]


async def test_concurrent_redemptions_use_a_token_once(issuer: Issuer, tmp_path: Path) -> None:
    token = issuer.token()
    sites = [site(tmp_path, f"site-{i}") for i in range(5)]
    results = await asyncio.gather(
        *(links.redeem(s, s.state_dir, token) for s in sites), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, links.LinkRecord)]
    used = [r for r in results if isinstance(r, TokenUsedUp)]
    assert len(ok) == 1
    assert len(used) == 4
    assert len(links.PEERS.list(issuer.identity.state_dir)) == 1


async def test_expired_at_issuer(issuer: Issuer, tmp_path: Path) -> None:
    token = issuer.token(expiry=timedelta(minutes=1))
    issuer.clock_offset = 3600  # the issuer's clock is the authority
    b = site(tmp_path, "site-b")
    with pytest.raises(TokenExpired, match="site site-a refused the token: the token expired at"):
        await links.redeem(b, b.state_dir, token)
    assert links.LINKS.list(b.state_dir) == []


async def test_expired_locally_never_connects(issuer: Issuer, tmp_path: Path) -> None:
    token = links.create_token(
        issuer.identity, issuer.grant.address, expiry=timedelta(minutes=1), now=time.time() - 120
    )
    b = site(tmp_path, "site-b")
    with pytest.raises(TokenExpired, match=r"the token expired at .*ask site site-a for a new one"):
        await links.redeem(b, b.state_dir, token)
    assert issuer.bodies == []


async def test_unknown_token(issuer: Issuer, tmp_path: Path) -> None:
    token = rewrite(issuer.token(), id="f" * 16)
    b = site(tmp_path, "site-b")
    with pytest.raises(TokenUnknown, match=r"site site-a refused the token: .*no such token"):
        await links.redeem(b, b.state_dir, token)


async def test_wrong_secret_is_unknown(issuer: Issuer, tmp_path: Path) -> None:
    good = issuer.token()
    bad = rewrite(good, secret=b64url_encode(b"guess" * 8))
    unknown = rewrite(good, id="e" * 16)
    b = site(tmp_path, "site-b")
    with pytest.raises(TokenUnknown) as wrong_secret:
        await links.redeem(b, b.state_dir, bad)
    with pytest.raises(TokenUnknown) as unknown_id:
        await links.redeem(b, b.state_dir, unknown)
    assert str(wrong_secret.value) == str(unknown_id.value)  # nothing says the id exists
    rec = await links.redeem(b, b.state_dir, good)  # the real token is still good
    assert rec.peer_site == "site-a"


async def test_wrong_pin(issuer: Issuer, tmp_path: Path) -> None:
    other_pin = pki.ca_pin(pki.create_ca("elsewhere").cert)
    token = rewrite(issuer.token(), pin=other_pin)
    b = site(tmp_path, "site-b")
    with pytest.raises(TokenPinMismatch, match=rf"{issuer.grant.address} is not the site") as e:
        await links.redeem(b, b.state_dir, token)
    assert issuer.identity.pin in str(e.value)
    assert other_pin in str(e.value)
    assert issuer.bodies == []  # the handshake failed: not a byte of the request was sent


async def test_malformed_token(issuer: Issuer, tmp_path: Path) -> None:
    b = site(tmp_path, "site-b")
    token = issuer.token()
    with pytest.raises(TokenMalformed, match=r"malformed token: .*not base64url"):
        await links.redeem(b, b.state_dir, token[:-1] + "*")
    with pytest.raises(TokenMalformed, match="does not start with"):
        await links.redeem(b, b.state_dir, "not-a-token")
    assert issuer.bodies == []


async def test_site_id_clash_at_issuer(issuer: Issuer, tmp_path: Path) -> None:
    token = issuer.token(uses=2)
    b = site(tmp_path, "site-b")
    await links.redeem(b, b.state_dir, token)
    twin = site(tmp_path, "site-b", folder="twin-b")
    with pytest.raises(
        SiteIdClash, match="a site with id 'site-b' and another CA is already linked to site-a"
    ):
        await links.redeem(twin, twin.state_dir, token)
    rec = links.TOKENS.load(issuer.identity.state_dir, links.decode_token(token).id)
    assert rec is not None
    assert rec.uses_left == 1  # a refusal consumes no use


async def test_reauthenticate_over_https_without_a_token(issuer: Issuer, tmp_path: Path) -> None:
    """A redeemer whose link certificate is gone (expired, here deleted) gets a fresh one
    from the grant endpoint recorded in its link, with its gateway certificate and a CSR:
    no token, no secret, no private key on the wire. Once revoked it is told so."""
    b = site(tmp_path, "site-b")
    rec = await links.redeem(b, b.state_dir, issuer.token())
    assert rec.grant == issuer.grant.address
    links.link_cert_path(b.state_dir, rec.name).unlink()
    cert = await links.reauthenticate(b, b.state_dir, rec)
    assert pki.load_cert(links.link_cert_path(b.state_dir, rec.name)) == cert
    assert pki.is_issued_by(cert, issuer.identity.ca.cert)
    sent = issuer.bodies[-1]
    assert b"PRIVATE KEY" not in sent
    assert set(json.loads(sent)) == {"site", "gateway_pem", "csr_pem"}
    links.revoke_peer(issuer.identity.state_dir, "site-b")
    with pytest.raises(
        LinkRevoked, match="refused to re-authenticate this site: site 'site-b' is not linked"
    ):
        await links.reauthenticate(b, b.state_dir, rec)


async def test_site_id_clash_with_issuer_id(issuer: Issuer, tmp_path: Path) -> None:
    same = site(tmp_path, "site-a", folder="not-a")
    with pytest.raises(SiteIdClash, match="issued by this very site"):
        await links.redeem(same, same.state_dir, issuer.token())


async def test_site_id_clash_local_link_exists(issuer: Issuer, tmp_path: Path) -> None:
    b = site(tmp_path, "site-b")
    await links.redeem(b, b.state_dir, issuer.token())
    with pytest.raises(SiteIdClash, match="a link named 'site-a' already exists"):
        await links.redeem(b, b.state_dir, issuer.token())
    with pytest.raises(SiteIdClash, match="already linked to site site-a"):
        await links.redeem(b, b.state_dir, issuer.token(), name="again")
    assert len(issuer.bodies) == 1


async def test_unreachable(issuer: Issuer, tmp_path: Path) -> None:
    port = free_port()  # free: nobody listens there
    token = rewrite(issuer.token(), grant=f"127.0.0.1:{port}")
    b = site(tmp_path, "site-b")
    with pytest.raises(GrantUnreachable, match=rf"at 127\.0\.0\.1:{port}: .*refused") as e:
        await links.redeem(b, b.state_dir, token)
    assert "site site-a" in str(e.value)


async def test_not_answering_times_out(issuer: Issuer, tmp_path: Path) -> None:
    # a listener that accepts TCP but never speaks TLS
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        token = rewrite(issuer.token(), grant=f"127.0.0.1:{port}")
        b = site(tmp_path, "site-b")
        with pytest.raises(GrantUnreachable, match=rf"127\.0\.0\.1:{port} did not answer within"):
            await links.redeem(b, b.state_dir, token, timeout=0.5)
    finally:
        srv.close()
        await srv.wait_closed()


async def raw_post(issuer: Issuer, body: bytes) -> tuple[int, dict[str, object]]:
    conn = aiohttp.TCPConnector(ssl=pki.pinned_client_context(issuer.identity.pin))
    async with (
        aiohttp.ClientSession(connector=conn) as s,
        s.post(
            f"https://{issuer.grant.address}{links.REDEEM_PATH}",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, await r.json()


async def test_raw_refusals_have_codes(issuer: Issuer, tmp_path: Path) -> None:
    status, data = await raw_post(issuer, b"{not json")
    assert (status, data["error"]) == (400, "malformed_request")
    assert data["message"] == "the request body is not JSON"
    status, data = await raw_post(issuer, b'{"token_id": "x"}')
    assert (status, data["error"]) == (400, "malformed_request")
    status, data = await raw_post(issuer, b"x" * (70 * 1024))
    assert (status, data["error"]) == (400, "malformed_request")
    # a CSR for another site than the one claimed
    b = site(tmp_path, "site-b")
    tok = links.decode_token(issuer.token())
    body = {
        "token_id": tok.id,
        "secret": tok.secret,
        "site": "site-b",
        "ca_pem": b.ca_pem.decode(),
        "csr_pem": pki.csr_to_pem(pki.make_csr("site-c", b.gateway.key)).decode(),
    }
    status, data = await raw_post(issuer, json.dumps(body).encode())
    assert (status, data["error"]) == (422, "bad_csr")
    assert "only request a certificate for its own id" in str(data["message"])


def test_pinned_redeem_under_uvloop(tmp_path: Path) -> None:
    """The pin check also runs inside uvloop's TLS implementation."""

    async def main() -> None:
        iss = await start_issuer(tmp_path)
        try:
            b = site(tmp_path, "site-b")
            bad = rewrite(iss.token(), pin=pki.ca_pin(b.ca.cert))
            with pytest.raises(TokenPinMismatch):
                await links.redeem(b, b.state_dir, bad)
            assert iss.bodies == []
            rec = await links.redeem(b, b.state_dir, iss.token())
            assert rec.peer_site == "site-a"
        finally:
            await iss.grant.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_pinned_context_with_blocking_sockets(tmp_path: Path) -> None:
    """``wrap_socket`` (not asyncio) enforces the pin too."""
    a = site(tmp_path, "site-a")
    server_ctx = pki.grant_server_context(a.gateway_chain_path, a.gateway_key_path)

    def serve(sock: socket.socket) -> None:
        with (
            contextlib.suppress(ssl.SSLError, OSError),
            server_ctx.wrap_socket(sock, server_side=True) as tls,
        ):
            tls.sendall(b"hello")
        sock.close()

    for pin, ok in ((a.pin, True), (pki.ca_pin(pki.create_ca("other").cert), False)):
        c, s = socket.socketpair()
        c.settimeout(5)
        s.settimeout(5)
        t = threading.Thread(target=serve, args=(s,))
        t.start()
        try:
            ctx = pki.pinned_client_context(pin)
            if ok:
                with ctx.wrap_socket(c) as tls:
                    assert isinstance(tls, PinnedSSLSocket)
                    assert tls.pinned_ca == a.ca.cert
                    assert tls.recv(5) == b"hello"
            else:
                with pytest.raises(pki.CaPinMismatch, match="the token expects"):
                    ctx.wrap_socket(c)
        finally:
            c.close()
            t.join(5)
        assert not t.is_alive()


async def served_leaf(grant: links.RunningGrant) -> x509.Certificate:
    """The leaf certificate a real TLS client is shown by the grant endpoint right now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(grant.host, grant.port, ssl=ctx), timeout=5
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def renewal_is_served(tmp_path: Path) -> None:
    """A gateway certificate that is due (10 minutes of its 35 left) is re-issued by the
    runtime's hourly ``load_or_create``; the running grant endpoint serves the new one at the
    next handshake, rebuilding its TLS context once, and a pinned redeem still works."""
    old = pki.SiteIdentity.load_or_create(
        tmp_path / "site-a",
        "site-a",
        gateway_lifetime=timedelta(minutes=30),
        now=pki.utcnow() - timedelta(minutes=20),
    )
    server = links.GrantServer(old, old.state_dir, GATEWAY_EPS)
    grant = await links.start_grant_server(server, "127.0.0.1", 0)
    try:
        assert await served_leaf(grant) == old.gateway.cert
        assert await served_leaf(grant) == old.gateway.cert
        assert grant.tls.rebuilds == 0  # unchanged files: no rebuild per handshake

        renewed = pki.SiteIdentity.load_or_create(old.state_dir, "site-a")  # as the runtime
        assert renewed.gateway.cert != old.gateway.cert
        assert renewed.gateway.cert.not_valid_after_utc > old.gateway.cert.not_valid_after_utc

        assert await served_leaf(grant) == renewed.gateway.cert
        assert await served_leaf(grant) == renewed.gateway.cert
        assert grant.tls.rebuilds == 1

        b = site(tmp_path, "site-b")
        rec = await links.redeem(b, b.state_dir, links.create_token(old, grant.address))
        assert rec.peer_site == "site-a"
    finally:
        await grant.close()


async def test_renewed_gateway_certificate_is_served(tmp_path: Path) -> None:
    await renewal_is_served(tmp_path)


def test_renewed_gateway_certificate_is_served_under_uvloop(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(renewal_is_served(tmp_path))


async def test_damaged_certificate_file_keeps_the_last_good_one(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    ident = issuer.identity
    caplog.set_level(logging.ERROR, logger="meshlink.pki.tls")
    pki.atomic_write(ident.gateway_chain_path, b"not a certificate\n", 0o644)
    for _ in range(3):
        assert await served_leaf(issuer.grant) == ident.gateway.cert
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert "serving the previous certificate until it is fixed" in errors[0].getMessage()
    assert issuer.grant.tls.rebuilds == 0

    # a renewal that writes good files again (here: a new SAN asked for) is picked up
    renewed = pki.SiteIdentity.load_or_create(
        ident.state_dir, "site-a", gateway_sans={"dns": ["grant.site-a.example"]}
    )
    assert renewed.gateway.cert != ident.gateway.cert
    assert await served_leaf(issuer.grant) == renewed.gateway.cert
    assert issuer.grant.tls.rebuilds == 1
