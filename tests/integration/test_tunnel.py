"""The gateway over real TLS 1.3 on loopback: gateways in this process, throwaway sites
built with meshlink.pki, real TCP services behind them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshlink import pki
from meshlink.errors import ErrorCode, MeshlinkError
from meshlink.proto import FlowTarget
from meshlink.tunnel import (
    DialSpec,
    FlowError,
    Gateway,
    ImportListener,
    LocalRoute,
    NoRoute,
    NoRouteError,
    PeerRoute,
    Route,
)
from tests.sites import free_port

pytestmark = [
    pytest.mark.timeout(60),
    # The loop_factories hook needs a conftest; until then the (deprecated) policy fixture.
    pytest.mark.filterwarnings("ignore:Overriding the .event_loop_policy. fixture"),
]


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: the daemon runs on uvloop, whose transports differ."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for `cond()` with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Handler:
    """A GatewayHandler driven by tables: local services and next hops."""

    site: str
    services: dict[tuple[str, str, int], tuple[str, int]] = field(default_factory=dict)
    via: dict[str, str] = field(default_factory=dict)  # target site -> next-hop peer
    ups: list[str] = field(default_factory=list)
    downs: list[tuple[str, str]] = field(default_factory=list)
    controls: list[tuple[str, bytes]] = field(default_factory=list)
    instances: list[tuple[str, str, str]] = field(default_factory=list)  # (up/down, site, inst)

    def link_up(self, peer_site: str) -> None:
        self.ups.append(peer_site)

    def link_down(self, peer_site: str, reason: str) -> None:
        self.downs.append((peer_site, reason))

    def instance_up(self, peer_site: str, instance: str) -> None:
        self.instances.append(("up", peer_site, instance))

    def instance_down(self, peer_site: str, instance: str, reason: str) -> None:
        self.instances.append(("down", peer_site, instance))

    def control_received(self, peer_site: str, instance: str, payload: bytes) -> None:
        self.controls.append((peer_site, payload))

    def route(self, target: FlowTarget) -> Route:
        if target.site == self.site:
            ep = self.services.get((target.namespace, target.name, target.port))
            return LocalRoute(*ep) if ep else NoRoute(f"{target} is not exported here")
        hop = self.via.get(target.site, target.site)
        return PeerRoute(hop)


class Site:
    """A throwaway site: identity, trust, a gateway and its handler."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        instance: str = "",
        replicas: int = 1,
        *,
        open_links: bool = True,
    ) -> None:
        self.name = name
        self.ident = pki.SiteIdentity.load_or_create(tmp / name, name)
        self.trusted: list[bytes] = [self.ident.ca_pem]
        self.allowed: set[str] = set()
        self.handler = Handler(name)
        self.gateway = Gateway(
            name,
            listen=("127.0.0.1", 0),
            server_context=self.server_context,
            authorize=lambda s: s in self.allowed,
            handler=self.handler,
            route=self.handler.route,
            heartbeat_interval=0.5,  # 1.5 s to declare death: tolerant of a loaded CI machine
            dead_after=3,
            instance=instance,
            replicas=replicas,
            open_links=open_links,
        )
        self.task: asyncio.Task[None] | None = None
        self.servers: list[asyncio.Server] = []

    async def serve(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        ns: str,
        name: str,
        port: int,
    ) -> int:
        """Run a TCP service on loopback and export it as ns/name:port."""
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        real = server.sockets[0].getsockname()[1]
        self.handler.services[(ns, name, port)] = ("127.0.0.1", real)
        return int(real)

    def server_context(self) -> ssl.SSLContext:
        return pki.server_context(
            self.ident.gateway_chain_path, self.ident.gateway_key_path, self.trusted
        )

    def client_context_for(self, peer: Site) -> Callable[[], ssl.SSLContext]:
        def make() -> ssl.SSLContext:
            return pki.client_context(
                self.ident.gateway_chain_path, self.ident.gateway_key_path, peer.ident.ca_pem
            )

        return make

    @property
    def endpoint(self) -> str:
        assert self.gateway.bound_address is not None
        host, port = self.gateway.bound_address
        return f"{host}:{port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.gateway.run())
        await self.gateway.started()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def up(self, peer: str) -> bool:
        return any(s.peer_site == peer and s.state == "up" for s in self.gateway.status())


def trust(dialer: Site, acceptor: Site) -> None:
    """Mutual trust and authorization, so that `dialer` may dial `acceptor`."""
    acceptor.trusted.append(dialer.ident.ca_pem)
    acceptor.allowed.add(dialer.name)
    dialer.allowed.add(acceptor.name)


def link(dialer: Site, acceptor: Site) -> None:
    """Mutual trust, then `dialer` dials `acceptor`."""
    trust(dialer, acceptor)
    dialer.gateway.set_dials(
        [
            DialSpec(
                name=f"to-{acceptor.name}",
                peer_site=acceptor.name,
                endpoints=(acceptor.endpoint,),
                ssl_context=dialer.client_context_for(acceptor),
            )
        ]
    )


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Site]]]:
    made: list[Site] = []

    async def make(name: str, instance: str = "", replicas: int = 1) -> Site:
        s = Site(tmp_path, name, instance, replicas)
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        await reader.read()  # wait for the client to finish
    except ConnectionError:
        pass
    finally:
        writer.close()


async def hasher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to EOF, answers the sha256 of what it read and its length."""
    h = hashlib.sha256()
    n = 0
    try:
        while data := await reader.read(1 << 18):
            h.update(data)
            n += len(data)
        writer.write(h.digest() + struct.pack("!Q", n))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def pair_ab(sites: Callable[[str], Awaitable[Site]]) -> tuple[Site, Site]:
    """Site a dials site b, which exports echo (ns/echo:7) and hasher (ns/hash:8)."""
    a = await sites("a")
    b = await sites("b")
    await b.serve(echo, "ns", "echo", 7)
    await b.serve(hasher, "ns", "hash", 8)
    link(a, b)
    await until(lambda: a.up("b") and b.up("a"), what="link a-b up")
    return a, b


ECHO = FlowTarget("b", "ns", "echo", 7)
HASH = FlowTarget("b", "ns", "hash", 8)


async def import_listener(site: Site, *targets: FlowTarget) -> tuple[ImportListener, int]:
    listener = ImportListener(site.gateway, ("127.0.0.1", 0), lambda: list(targets))
    await listener.start()
    assert listener.bound_address is not None
    return listener, listener.bound_address[1]


async def test_link_comes_up_and_flow_echoes(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    assert a.handler.ups == ["b"]
    assert b.handler.ups == ["a"]
    flow = await a.gateway.open_flow(ECHO, timeout=5)
    flow.write(b"hello through the tunnel")
    flow.write_eof()
    assert await flow.read_all() == b"hello through the tunnel"
    await until(lambda: a.gateway.status()[0].rtt_ms is not None, what="an RTT sample")
    st = a.gateway.status()[0]
    assert st.direction == "dial"
    assert st.bytes_out > 0
    assert st.rtt_ms is not None
    assert st.rtt_ms < 1000
    (bst,) = b.gateway.status()
    assert bst.direction == "accept"
    assert bst.peer_site == "a"


async def test_100_mb_with_end_to_end_checksum(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, _b = await pair_ab(sites)
    listener, port = await import_listener(a, HASH)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        h = hashlib.sha256()
        block = os.urandom(1 << 20)
        total = 100 * (1 << 20)
        for i in range(100):
            chunk = block[i:] + block[:i]  # vary the content per MiB
            h.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.readexactly(40), 30)
        assert answer[:32] == h.digest()
        assert struct.unpack("!Q", answer[32:])[0] == total
        writer.close()
    finally:
        await listener.close()


async def test_100_mb_download_through_flow_object(sites: Callable[[str], Awaitable[Site]]) -> None:
    """The other direction: the service streams, the importer reads (backpressure path)."""
    a, b = await pair_ab(sites)
    block = os.urandom(1 << 20)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):
            writer.write(block)
            await writer.drain()
        writer.close()

    await b.serve(source, "ns", "source", 9)
    flow = await a.gateway.open_flow(FlowTarget("b", "ns", "source", 9), timeout=5)
    h = hashlib.sha256()
    n = 0
    while chunk := await flow.read():
        h.update(chunk)
        n += len(chunk)
    assert n == 100 << 20
    assert h.digest() == hashlib.sha256(block * 100).digest()


async def test_half_close_client_first(sites: Callable[[str], Awaitable[Site]]) -> None:
    """Client sends, half-closes; the service answers after seeing EOF; both ends finish."""
    a, b = await pair_ab(sites)

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(b"got " + str(len(data)).encode())
        writer.close()

    await b.serve(answer_after_eof, "ns", "half", 10)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "half", 10))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * 5000)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"got 5000"
        writer.close()
    finally:
        await listener.close()


async def test_half_close_service_first(sites: Callable[[str], Awaitable[Site]]) -> None:
    """The service half-closes first; the client can still send and the service reads it."""
    a, b = await pair_ab(sites)
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, I am done talking")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    await b.serve(greet_then_listen, "ns", "greet", 11)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "greet", 11))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b"hello, I am done talking"
        writer.write(b"but I still have things to say")
        writer.write_eof()
        assert await asyncio.wait_for(received, 10) == b"but I still have things to say"
        writer.close()
    finally:
        await listener.close()


def rst_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_reset_from_service_reaches_client(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)

    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        rst_close(writer)

    await b.serve(reset_after_hello, "ns", "rst", 12)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "rst", 12))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await until(lambda: a.gateway.status()[0].flows_open == 0, what="flow closed at a")
        await until(lambda: b.gateway.status()[0].flows_open == 0, what="flow closed at b")
    finally:
        await listener.close()


async def test_reset_from_client_reaches_service(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def wait_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(5)
            writer.write(b"ready")
            await reader.read()
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        finally:
            writer.close()

    await b.serve(wait_forever, "ns", "wait", 13)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "wait", 13))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"ready"
        rst_close(writer)
        assert await asyncio.wait_for(outcome, 10) == "reset"
    finally:
        await listener.close()


async def test_200_concurrent_flows(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, _b = await pair_ab(sites)
    listener, port = await import_listener(a, ECHO)

    async def one(i: int) -> bool:
        payload = os.urandom(1000 + 37 * i)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        got = await reader.read()
        writer.close()
        return got == payload

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)
        assert all(results)
        await until(lambda: a.gateway.status()[0].flows_open == 0, what="all flows closed")
    finally:
        await listener.close()


async def test_link_killed_mid_transfer_resets_flow_and_reconnects(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    a, b = await pair_ab(sites)
    listener, port = await import_listener(a, HASH)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * (1 << 20))
        await writer.drain()
        await until(lambda: a.gateway.status()[0].flows_open == 1, what="flow open")
        (live,) = a.gateway._links.live("b")
        assert live.transport is not None
        live.transport.abort()  # the TLS connection dies under the flow
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            await keep_writing_then_read(reader, writer)
        writer.close()
        assert ("b", a.handler.downs[0][1]) == a.handler.downs[0]
        await until(lambda: a.up("b") and b.up("a") and len(a.handler.ups) == 2, what="relink")
        flow = await a.gateway.open_flow(ECHO, timeout=5)
        flow.write(b"back")
        flow.write_eof()
        assert await flow.read_all() == b"back"
    finally:
        await listener.close()


async def keep_writing_then_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    for _ in range(1000):  # bounded: a reset arrives long before
        writer.write(b"y" * 65536)
        await writer.drain()
    await asyncio.wait_for(reader.read(), 10)


class FreezableProxy:
    """A TCP relay on loopback that can go silent without closing (like an iptables DROP)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                await self.flowing.wait()
                w.write(data)
                await w.drain()
        w.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.upstream)
        self.writers += [w, uw]
        for t in (self._pump(r, uw), self._pump(ur, w)):
            task = asyncio.create_task(t)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_silent_peer_is_declared_dead_by_heartbeat(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    a = await sites("a")
    b = await sites("b")
    assert b.gateway.bound_address is not None
    proxy = FreezableProxy(b.gateway.bound_address)
    pport = await proxy.start()
    try:
        trust(a, b)
        a.gateway.set_dials(
            [DialSpec("to-b", "b", (f"127.0.0.1:{pport}",), a.client_context_for(b))]
        )
        await until(lambda: a.up("b") and b.up("a"), what="link up through the proxy")
        proxy.flowing.clear()  # silence, no FIN, no RST
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await until(lambda: bool(a.handler.downs) and bool(b.handler.downs), what="link down")
        assert loop.time() - t0 < 5  # 3 x 0.2 s heartbeats, generous bound
        assert "heartbeat" in a.handler.downs[0][1]
    finally:
        proxy.flowing.set()
        await proxy.close()


async def test_control_messages_both_ways(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    assert a.gateway.send_control("b", b"snapshot from a")
    assert b.gateway.send_control("a", b"delta from b")
    assert not a.gateway.send_control("nobody", b"x")
    await until(lambda: bool(b.handler.controls) and bool(a.handler.controls), what="controls")
    assert b.handler.controls == [("a", b"snapshot from a")]
    assert a.handler.controls == [("b", b"delta from b")]


async def test_no_route_is_a_clear_error(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, _b = await pair_ab(sites)
    with pytest.raises(NoRouteError, match="not exported here"):
        await a.gateway.open_flow(FlowTarget("b", "ns", "missing", 1), timeout=5)
    with pytest.raises(NoRouteError, match="no live link to zz"):
        await a.gateway.open_flow(FlowTarget("zz", "ns", "x", 1), timeout=5)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "missing", 1))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await listener.close()


async def test_import_fails_over_to_next_target(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, _b = await pair_ab(sites)
    listener, port = await import_listener(a, FlowTarget("b", "ns", "missing", 1), ECHO)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"second choice")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"second choice"
        writer.close()
    finally:
        await listener.close()


async def test_connect_refused_by_service(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    b.handler.services[("ns", "dead", 5)] = ("127.0.0.1", free_port())
    with pytest.raises(FlowError) as err:
        await a.gateway.open_flow(FlowTarget("b", "ns", "dead", 5), timeout=5)
    assert err.value.code == ErrorCode.CONNECT_ERROR
    assert "refused" in str(err.value)


async def test_relay_through_middle_gateway(sites: Callable[[str], Awaitable[Site]]) -> None:
    """A-B-C with no A-C link: A's flow to C's service is relayed by B."""
    a = await sites("a")
    b = await sites("b")
    c = await sites("c")
    await c.serve(echo, "ns", "echo", 7)
    link(a, b)
    link(c, b)
    a.handler.via["c"] = "b"
    await until(lambda: a.up("b") and c.up("b") and b.up("a") and b.up("c"), what="links up")
    listener, port = await import_listener(a, FlowTarget("c", "ns", "echo", 7))
    try:
        payload = os.urandom(3 << 20)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        writer.close()
        # a refusal two hops away comes back with its reason
        with pytest.raises(NoRouteError):
            await a.gateway.open_flow(FlowTarget("c", "ns", "nothing", 1), timeout=5)
    finally:
        await listener.close()


async def test_relay_loop_stops_at_hop_limit(sites: Callable[[str], Awaitable[Site]]) -> None:
    """A routing loop (a->b->c->a->...) is cut by the hop count, not run forever."""
    a = await sites("a")
    b = await sites("b")
    c = await sites("c")
    link(a, b)
    link(b, c)
    trust(a, c)
    a.gateway.set_dials(
        [
            DialSpec("to-b", "b", (b.endpoint,), a.client_context_for(b)),
            DialSpec("to-c", "c", (c.endpoint,), a.client_context_for(c)),
        ]
    )
    await until(lambda: a.up("b") and b.up("c") and c.up("a"), what="ring up")
    a.handler.via["z"] = "b"
    b.handler.via["z"] = "c"
    c.handler.via["z"] = "a"
    with pytest.raises(NoRouteError):
        await a.gateway.open_flow(FlowTarget("z", "ns", "x", 1), timeout=10)


async def test_duplicate_links_keep_the_smaller_sites_dial(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    a = await sites("a")
    b = await sites("b")
    link(a, b)
    link(b, a)
    await until(lambda: a.up("b") and b.up("a"), what="links up")
    await until(
        lambda: (
            [s.direction for s in a.gateway.status() if s.state == "up"] == ["dial"]
            and [s.direction for s in b.gateway.status() if s.state == "up"] == ["accept"]
        ),
        what="a's dial kept on both sides",
    )
    await b.serve(echo, "ns", "echo", 7)
    flow = await a.gateway.open_flow(ECHO, timeout=5)
    flow.write(b"one link")
    flow.write_eof()
    assert await flow.read_all() == b"one link"


async def test_drop_peer_closes_link(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    b.allowed.discard("a")  # revoked: it may not come back
    b.gateway.drop_peer("a", "revoked")
    await until(lambda: bool(a.handler.downs) and bool(b.handler.downs), what="link down")
    assert "NOT_AUTHORIZED" in a.handler.downs[0][1]
    await until(
        lambda: "NOT_AUTHORIZED" in (a.gateway.status()[0].last_error or ""),
        what="redial refused",
    )
    assert not b.up("a")


async def test_hol_small_flows_complete_while_bulk_runs(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    a, b = await pair_ab(sites)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 18):
                pass
        writer.close()

    await b.serve(sink, "ns", "sink", 14)
    bulk = await a.gateway.open_flow(FlowTarget("b", "ns", "sink", 14), timeout=5)
    stop = asyncio.Event()
    sent = 0

    async def pump() -> None:
        nonlocal sent
        block = b"B" * (1 << 18)
        while not stop.is_set() and sent < (4 << 30):  # bounded
            bulk.write(block)
            sent += len(block)
            await bulk.drain()

    pumper = asyncio.create_task(pump())
    try:
        await until(lambda: sent > (8 << 20), what="bulk flow running")
        loop = asyncio.get_running_loop()
        worst = 0.0
        for i in range(20):
            t0 = loop.time()
            flow = await a.gateway.open_flow(ECHO, timeout=5)
            flow.write(b"ping %d" % i)
            flow.write_eof()
            assert await asyncio.wait_for(flow.read_all(), 5) == b"ping %d" % i
            worst = max(worst, loop.time() - t0)
        assert not pumper.done()  # the bulk flow was running the whole time
        assert worst < 2.0, f"a small flow took {worst:.2f} s behind the bulk one"
    finally:
        stop.set()
        await pumper
        bulk.abort()


async def test_gateway_shutdown_tells_peer(sites: Callable[[str], Awaitable[Site]]) -> None:
    a, b = await pair_ab(sites)
    await b.stop()
    await until(lambda: bool(a.handler.downs), what="a sees the link down")
    assert "shutting down" in a.handler.downs[0][1]


def last_error(site: Site, peer: str) -> str:
    return next((s.last_error or "" for s in site.gateway.status() if s.peer_site == peer), "")


async def dial_error(site: Site, peer: str, what: str) -> str:
    await until(lambda: bool(last_error(site, peer)), what=what)
    return last_error(site, peer)


async def test_peer_with_cert_from_another_ca_is_refused(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    b = await sites("b")
    c = await sites("c")
    b.allowed.add("c")  # authorized by name, but b does not trust c's CA
    c.gateway.set_dials([DialSpec("to-b", "b", (b.endpoint,), c.client_context_for(b))])
    err = await dial_error(c, "b", "c's dial refused")
    assert "the peer refused the link: TLSV1_ALERT_UNKNOWN_CA" in err
    assert not b.handler.ups
    assert not c.handler.ups


async def raw_tls(site: Site, ctx: ssl.SSLContext) -> bytes:
    """Connect with `ctx`, and read what the gateway says (b"" on a clean close)."""
    assert site.gateway.bound_address is not None
    reader, writer = await asyncio.open_connection(*site.gateway.bound_address, ssl=ctx)
    try:
        return await asyncio.wait_for(reader.read(1000), 10)
    finally:
        writer.transport.abort()


async def tls_outcome(site: Site, ctx: ssl.SSLContext) -> str:
    try:
        data = await raw_tls(site, ctx)
    except ssl.SSLError:
        return "alert"
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else f"data: {data!r}"


async def test_client_without_certificate_is_refused(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    b = await sites("b")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=b.ident.ca_pem.decode())
    ctx.set_alpn_protocols([pki.ALPN_LINK])
    # TLS 1.3: the client finishes its side, then reads the server's certificate_required
    assert await tls_outcome(b, ctx) == "alert"
    assert not b.handler.ups
    assert b.gateway.status() == []


async def test_tls_12_client_is_refused(
    sites: Callable[[str], Awaitable[Site]], caplog: pytest.LogCaptureFixture
) -> None:
    a = await sites("a")
    b = await sites("b")
    link(a, b)  # make a trusted and authorized: only the TLS version is wrong
    ctx = a.client_context_for(b)()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with caplog.at_level(logging.WARNING, logger="meshlink.tunnel.gateway"):
        assert await tls_outcome(b, ctx) == "alert"
    assert "TLS 1.3 is required" in caplog.text
    await until(lambda: a.up("b"), what="the proper TLS 1.3 dial still works")
    assert b.handler.ups == ["a"]


async def test_unauthorized_site_gets_goaway_not_authorized(
    sites: Callable[[str], Awaitable[Site]],
) -> None:
    b = await sites("b")
    c = await sites("c")
    b.trusted.append(c.ident.ca_pem)  # the CA is trusted, but site c is not linked
    c.gateway.set_dials([DialSpec("to-b", "b", (b.endpoint,), c.client_context_for(b))])
    err = await dial_error(c, "b", "c's dial refused")
    assert "NOT_AUTHORIZED" in err
    assert "site c is not linked to b" in err
    assert not b.handler.ups


async def test_dialer_checks_the_servers_site_id(sites: Callable[[str], Awaitable[Site]]) -> None:
    a = await sites("a")
    b = await sites("b")
    link(a, b)
    await until(lambda: a.up("b"), what="link up")
    # the same endpoint, but we claim to expect site "x": b's certificate says "b"
    a.gateway.set_dials([DialSpec("to-x", "x", (b.endpoint,), a.client_context_for(b))])
    err = await dial_error(a, "x", "mismatch reported")
    assert "expected 'x'" in err


async def test_listener_that_cannot_bind_says_why(sites: Callable[[str], Awaitable[Site]]) -> None:
    a = await sites("a")
    assert a.gateway.bound_address is not None
    clash = Gateway(
        "clash",
        listen=a.gateway.bound_address,
        server_context=a.server_context,
        authorize=lambda s: True,
        handler=Handler("clash"),
        route=Handler("clash").route,
    )
    with pytest.raises(MeshlinkError, match=r"gateway\.listen: cannot listen on 127\.0\.0\.1:"):
        await asyncio.wait_for(clash.run(), 10)
    with pytest.raises(MeshlinkError):
        await clash.started()


class Forwarder:
    """A TCP forwarder to a target that can be switched: a Service in front of replicas,
    landing each new connection on whichever instance the test says."""

    def __init__(self, target: Site) -> None:
        self.target = target
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        host, port = self.target.endpoint.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_dialer_links_every_instance_of_a_site_without_churn(
    sites: Callable[[str, str, int], Awaitable[Site]],
) -> None:
    """Site b runs two instances behind one address (a forwarder standing for a Service).
    a's dials land on b-1 again and again: each such link is closed at its HELLO and the
    existing one is untouched (its flow goes on, no link event); once dials land on b-2,
    a holds both. b-1 going away then changes nothing at site level; b-2 serves."""
    a = await sites("a", "a-1", 1)
    b1 = await sites("b", "b-1", 2)
    b2 = await sites("b", "b-2", 2)
    for b in (b1, b2):
        trust(a, b)
        await b.serve(echo, "ns", "echo", 7)
    fwd = Forwarder(b1)
    endpoint = await fwd.start()
    try:
        spec = DialSpec("to-b", "b", (endpoint,), a.client_context_for(b1))
        a.gateway.set_dials([spec])
        await until(lambda: a.up("b"), what="a linked with b-1")
        (first,) = a.gateway._links.live("b")
        assert first.peer_instance == "b-1"
        flow = await a.gateway.open_flow(ECHO, timeout=5)
        await until(lambda: fwd.connections >= 4, what="three more dials landing on b-1")
        flow.write(b"still here")
        flow.write_eof()
        assert await flow.read_all() == b"still here"
        assert a.gateway._links.live("b") == [first]
        assert a.handler.ups == ["b"]
        assert a.handler.downs == []
        assert a.handler.instances == [("up", "b", "b-1")]
        fwd.target = b2  # the next dials land on the other instance
        await until(lambda: a.gateway.instances("b") == ["b-1", "b-2"], what="both linked")
        assert a.handler.ups == ["b"]  # the site came up once
        rows = [(r.peer_instance, r.peer_replicas) for r in a.gateway.status()]
        assert rows == [("b-1", 2), ("b-2", 2)]
        await b1.stop()
        await until(lambda: a.gateway.instances("b") == ["b-2"], what="b-1's link gone")
        assert a.handler.downs == []  # the site stayed up
        assert a.handler.instances[-1] == ("down", "b", "b-1")
        for _ in range(4):  # every new flow takes the live link
            flow = await a.gateway.open_flow(ECHO, timeout=5)
            flow.write(b"x")
            flow.write_eof()
            assert await flow.read_all() == b"x"
        await b2.stop()
        await until(lambda: bool(a.handler.downs), what="the site down with its last instance")
        assert [d[0] for d in a.handler.downs] == ["b"]
    finally:
        fwd.close()


async def test_a_gateway_not_open_yet_neither_accepts_nor_dials(tmp_path: Path) -> None:
    """A site opens its gateway once it knows its own exports (runtime): before that a dial
    to it is refused outright, and it dials no one (a link would bring flows it cannot
    route yet)."""
    a, b, c = Site(tmp_path, "a"), Site(tmp_path, "b", open_links=False), Site(tmp_path, "c")
    try:
        for s in (a, b, c):
            await s.start()
        link(a, b)  # a dials b
        link(b, c)  # b dials c
        assert b.gateway.bound_address is not None  # bound, not listening
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*b.gateway.bound_address)
        await dial_error(a, "b", "a's dial to b failing")
        assert not b.gateway.is_open
        assert not a.up("b")
        assert not c.up("b")  # b never dialled
        b.gateway.open()
        await until(lambda: a.up("b") and b.up("a") and b.up("c") and c.up("b"), what="links up")
    finally:
        for s in (a, b, c):
            await s.stop()
