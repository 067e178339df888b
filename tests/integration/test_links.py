"""After a real redemption on loopback: the two sites' gateway contexts complete a TLS 1.3
mutual handshake over real sockets, and a client with a certificate from another CA, with
no certificate, or forcing TLS 1.2 is refused, with a clear failure on both sides. Also the
CLI command functions and certificate renewal over the records."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshlink import links, pki
from meshlink.config import HostPort, SiteConfig
from meshlink.errors import CatalogError, ConfigError, PeerNotAuthorized, PkiError

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pair:
    a: pki.SiteIdentity
    b: pki.SiteIdentity
    link: links.LinkRecord  # b's link to a


@pytest.fixture
async def pair(tmp_path: Path) -> Pair:
    a = pki.SiteIdentity.load_or_create(tmp_path / "a", "site-a")
    b = pki.SiteIdentity.load_or_create(tmp_path / "b", "site-b")
    grant = await links.start_grant_server(
        links.GrantServer(a, a.state_dir, ["127.0.0.1:1"]), "127.0.0.1", 0
    )
    try:
        rec = await links.redeem(b, b.state_dir, links.create_token(a, grant.address))
    finally:
        await grant.close()
    return Pair(a, b, rec)


@dataclass
class Outcome:
    site: str | None = None
    error: BaseException | None = None


class Listener:
    """A TCP listener whose TLS handshakes are awaited by the test's own code
    (``connect_accepted_socket``), so a failed handshake on the server side reaches the
    test as an exception instead of a log line: the refusal itself (the server's TLS
    objects record it; the handshake then ends when the client, sent the alert, hangs up)."""

    def __init__(self, ctx: ssl.SSLContext, state_dir: Path):
        refusals: list[ssl.SSLError] = []

        class Recording(pki.AlertingSSLObject):
            def refused(self, error: ssl.SSLError) -> None:
                refusals.append(error)

        ctx.sslobject_class = Recording
        self.refusals = refusals
        self.ctx = ctx
        self.state_dir = state_dir
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.sock = socket.socket()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._handle(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: proto, conn, ssl=self.ctx, ssl_handshake_timeout=5
            )
        except (ssl.SSLError, OSError) as e:
            conn.close()
            await self.outcomes.put(Outcome(error=self.refusals.pop() if self.refusals else e))
            return
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        try:
            site = pki.authorize_peer(writer.get_extra_info("ssl_object"))
            if not links.is_peer_allowed(self.state_dir, site):
                raise PeerNotAuthorized(f"site {site} is not a peer")
            data = await asyncio.wait_for(reader.readexactly(4), 5)
            writer.write(b"pong" if data == b"ping" else b"????")
            await writer.drain()
            await self.outcomes.put(Outcome(site=site))
        except (ssl.SSLError, OSError, PeerNotAuthorized, asyncio.IncompleteReadError) as e:
            await self.outcomes.put(Outcome(error=e))
        finally:
            writer.close()

    async def __aenter__(self) -> tuple[Listener, int]:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.accepter = asyncio.create_task(self._accept())
        return self, int(self.sock.getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        for t in (self.accepter, *self.tasks):
            t.cancel()
        await asyncio.gather(self.accepter, *self.tasks, return_exceptions=True)
        self.sock.close()


async def ping(port: int, ctx: ssl.SSLContext) -> tuple[str, bytes]:
    """Dial with ``ctx``, check the server is site-a, send ping; return (site, reply)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="site-a"), 5
    )
    try:
        site = pki.authorize_peer(writer.get_extra_info("ssl_object"), "site-a")
        writer.write(b"ping")
        await writer.drain()
        return site, await asyncio.wait_for(reader.read(4), 5)
    finally:
        writer.close()


async def test_mtls_between_linked_sites(pair: Pair) -> None:
    server_ctx = links.gateway_server_context(pair.a)
    async with Listener(server_ctx, pair.a.state_dir) as (lst, port):
        site, reply = await ping(port, links.link_client_context(pair.b, pair.link))
        out = await asyncio.wait_for(lst.outcomes.get(), 5)
    assert site == "site-a"
    assert reply == b"pong"
    assert out.error is None
    assert out.site == "site-b"


async def test_revoked_peer_refused_after_handshake(pair: Pair) -> None:
    links.revoke_peer(pair.a.state_dir, "site-b")
    async with Listener(links.gateway_server_context(pair.a), pair.a.state_dir) as (lst, port):
        _site, reply = await ping(port, links.link_client_context(pair.b, pair.link))
        out = await asyncio.wait_for(lst.outcomes.get(), 5)
    assert reply == b""  # closed without an answer
    assert isinstance(out.error, PeerNotAuthorized)
    assert "site site-b is not a peer" in str(out.error)


async def client_failure(port: int, ctx: ssl.SSLContext) -> tuple[str, BaseException | bytes]:
    """Where and how the client fails: ("connect", error) when the handshake fails, or
    ("read", error or bytes read) when it completes but the server then refuses."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="site-a"), 5
        )
    except (ssl.SSLError, OSError) as e:
        return "connect", e
    try:
        writer.write(b"ping")
        await writer.drain()
        return "read", await asyncio.wait_for(reader.read(4), 5)
    except (ssl.SSLError, OSError) as e:
        return "read", e
    finally:
        writer.close()


def refused_after_handshake(seen: tuple[str, BaseException | bytes], alert: str) -> bool:
    """TLS 1.3: the client finishes its handshake before the server checks its certificate,
    so a refusal shows up at its first read, as the server's alert (not a bare EOF)."""
    stage, what = seen
    return stage == "read" and isinstance(what, ssl.SSLError) and f"alert {alert}" in str(what)


async def dial_gateway_of_a(
    pair: Pair, ctx: ssl.SSLContext
) -> tuple[Outcome, tuple[str, BaseException | bytes]]:
    """Dial site-a's link listener with ``ctx``: what the listener saw, what the client saw."""
    async with Listener(links.gateway_server_context(pair.a), pair.a.state_dir) as (lst, port):
        seen = await client_failure(port, ctx)
        out = await asyncio.wait_for(lst.outcomes.get(), 5)
    return out, seen


async def test_client_cert_from_other_ca_refused(pair: Pair) -> None:
    # site-b presents its own gateway certificate, signed by its own CA, not by site-a's
    ctx = pki.client_context(pair.b.gateway_cert_path, pair.b.gateway_key_path, pair.a.ca_pem)
    out, seen = await dial_gateway_of_a(pair, ctx)
    assert isinstance(out.error, ssl.SSLError)
    assert "certificate verify failed" in str(out.error)
    assert refused_after_handshake(seen, "unknown ca"), seen


async def test_no_client_cert_refused(pair: Pair) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pair.a.ca_pem.decode())
    ctx.set_alpn_protocols([pki.ALPN_LINK])
    out, seen = await dial_gateway_of_a(pair, ctx)
    assert isinstance(out.error, ssl.SSLError)
    assert "peer did not return a certificate" in str(out.error)
    assert refused_after_handshake(seen, "certificate required"), seen


async def test_tls12_client_refused(pair: Pair) -> None:
    ctx = links.link_client_context(pair.b, pair.link)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out, seen = await dial_gateway_of_a(pair, ctx)
    assert isinstance(out.error, ssl.SSLError)
    assert "unsupported protocol" in str(out.error)
    # the server refuses the ClientHello: the client fails in its handshake, told why
    stage, what = seen
    assert stage == "connect"
    assert isinstance(what, ssl.SSLError), what
    assert "alert protocol version" in str(what)


async def test_server_of_other_site_refused_by_dialer(pair: Pair, tmp_path: Path) -> None:
    # an impostor listener with a certificate from another CA: the dialer refuses it
    evil = pki.SiteIdentity.load_or_create(tmp_path / "evil", "site-a")
    async with Listener(
        pki.server_context(evil.gateway_cert_path, evil.gateway_key_path, [pair.a.ca_pem]),
        pair.a.state_dir,
    ) as (lst, port):
        seen = await client_failure(port, links.link_client_context(pair.b, pair.link))
        out = await asyncio.wait_for(lst.outcomes.get(), 5)
    stage, what = seen
    assert stage == "connect"
    assert isinstance(what, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(what)
    assert out.error is not None


# -- records, renewal and CLI command text ---------------------------------------------


async def test_renewal_over_records(pair: Pair) -> None:
    assert not links.link_renewal_due(pair.b.state_dir, pair.link.name)
    later = pki.utcnow() + timedelta(hours=17)
    assert links.link_renewal_due(pair.b.state_dir, pair.link.name, later)
    old = pki.load_cert(Path(pair.link.cert_path))
    pem = links.sign_renewal(pair.a, pair.a.state_dir, "site-b", links.renewal_csr(pair.b))
    new = links.store_renewed_cert(pair.b, pair.b.state_dir, pair.link.name, pem)
    assert new.serial_number != old.serial_number
    assert pki.load_cert(Path(pair.link.cert_path)) == new
    # a certificate for another key is not stored
    stranger = pki.issue_cert(
        pair.a.ca, "site-b", pki.new_key().public_key(), lifetime=timedelta(hours=1)
    )
    with pytest.raises(PkiError, match="another key"):
        links.store_renewed_cert(
            pair.b, pair.b.state_dir, pair.link.name, pki.cert_to_pem(stranger).decode()
        )
    # and the renewed certificate still opens the link
    async with Listener(links.gateway_server_context(pair.a), pair.a.state_dir) as (lst, port):
        _site, reply = await ping(port, links.link_client_context(pair.b, pair.link))
        out = await asyncio.wait_for(lst.outcomes.get(), 5)
    assert reply == b"pong"
    assert out.site == "site-b"


async def test_renewals_ask_once_until_answered_or_overdue(pair: Pair) -> None:
    """The state machine both sides run (the control channel carries its messages)."""
    now = [0.0]
    b = links.Renewals(pair.b.state_dir, retry_after=600, clock=lambda: now[0])
    a = links.Renewals(pair.a.state_dir, lifetime=timedelta(hours=2))
    assert b.due([pair.link], {"site-a"}) == []  # a fresh certificate is not due
    # A one-minute certificate (valid from 5 minutes ago) has less than a third left.
    short = links.sign_renewal(
        pair.a,
        pair.a.state_dir,
        "site-b",
        links.renewal_csr(pair.b),
        lifetime=timedelta(minutes=1),
    )
    links.store_renewed_cert(pair.b, pair.b.state_dir, pair.link.name, short)
    assert b.due([pair.link], set()) == []  # no live link to ask over
    assert b.due([pair.link], {"site-a"}) == [pair.link]
    req = b.request(pair.b)
    b.asked("site-a")
    assert b.due([pair.link], {"site-a"}) == []  # pending
    now[0] = 599.0
    assert b.due([pair.link], {"site-a"}) == []
    now[0] = 600.0
    assert b.due([pair.link], {"site-a"}) == [pair.link]  # unanswered: ask again
    ans = a.answer(pair.a, "site-b", req)
    b.store(pair.b, "site-a", ans)
    new = pki.load_cert(Path(pair.link.cert_path))
    assert new.not_valid_after_utc - new.not_valid_before_utc == timedelta(hours=2, minutes=5)
    assert b.due([pair.link], {"site-a"}) == []  # renewed
    with pytest.raises(CatalogError, match="unexpected renewed certificate from site-z"):
        b.store(pair.b, "site-z", ans)
    with pytest.raises(PkiError, match="not a peer"):
        a.answer(pair.a, "site-z", req)


async def test_commands(tmp_path: Path) -> None:
    a = SiteConfig(site="site-a", state_dir=tmp_path / "a", grant_listen=HostPort("127.0.0.1", 0))
    b = SiteConfig(site="site-b", state_dir=tmp_path / "b")
    ident_a = pki.SiteIdentity.load_or_create(a.state_dir, a.site)
    grant = await links.start_grant_server(
        links.GrantServer(ident_a, a.state_dir, ["127.0.0.1:7443"]), "127.0.0.1", 0
    )
    try:
        a = SiteConfig(
            site="site-a", state_dir=a.state_dir, grant_listen=HostPort("127.0.0.1", grant.port)
        )
        out_file = tmp_path / "tok.txt"
        said = links.cmd_token_create(a, output=out_file, uses=1)
        assert f"meshlink link create {out_file}" in said
        assert out_file.stat().st_mode & 0o077 == 0
        assert "valid" in links.cmd_token_list(a)
        said = await links.cmd_link_create(b, str(out_file), name="to-a")
        assert said == "linked to site site-a as 'to-a' via 127.0.0.1:7443"
    finally:
        await grant.close()
    assert "used up" in links.cmd_token_list(a)
    listing = links.cmd_link_list(b).splitlines()
    assert listing[0].split()[:3] == ["NAME", "PEER", "ENDPOINTS"]
    assert listing[1].split()[:3] == ["to-a", "site-a", "127.0.0.1:7443"]
    peers = links.cmd_peer_list(a).splitlines()
    assert peers[1].split()[0] == "site-b"
    assert (
        links.cmd_peer_revoke(a, "site-b")
        == "peer site-b revoked: its gateway is refused from now on"
    )
    assert len(links.cmd_peer_list(a).splitlines()) == 1
    assert links.cmd_link_delete(b, "to-a") == "link to-a to site site-a deleted"
    assert links.LINKS.list(b.state_dir) == []
    assert not (b.state_dir / "links" / "to-a.crt").exists()
    with pytest.raises(links.RecordNotFound, match="no link named 'to-a'"):
        links.cmd_link_delete(b, "to-a")


@pytest.mark.parametrize(
    ("site", "key"),
    [
        ({"grant_listen": HostPort("0.0.0.0", 7444)}, "grant.advertise"),
        (
            {
                "grant_listen": HostPort("0.0.0.0", 7444),
                "grant_advertise": HostPort("gw.example.net", 7444),
            },
            "gateway.advertise",
        ),
        (
            {
                "grant_advertise": HostPort("10.0.0.1", 7444),
                "gateway_advertise": (HostPort("10.0.0.1", 7443), HostPort("::", 7443)),
            },
            "gateway.advertise",
        ),
    ],
)
def test_token_create_refuses_addresses_nobody_can_dial(
    tmp_path: Path, site: dict[str, Any], key: str
) -> None:
    """The manifests listen on 0.0.0.0: a token must not silently send peers there."""
    cfg = SiteConfig(
        site="site-a",
        state_dir=tmp_path / "a",
        gateway_listen=HostPort("0.0.0.0", 7443),
        source="site.yaml",
        **site,
    )
    with pytest.raises(ConfigError) as ei:
        links.cmd_token_create(cfg)
    assert str(ei.value).startswith(f"site.yaml: {key}: "), str(ei.value)
    assert "not an address another site can dial" in str(ei.value)
    assert links.cmd_token_list(cfg).splitlines()[1:] == []  # nothing was issued
