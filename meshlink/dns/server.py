"""The DNS server's I/O: a UDP DatagramProtocol and a TCP server around ``answer``.

Thin on purpose: every decision is in ``answer`` (sans-IO). The servers hold one reference
to the current snapshot and read it once per packet, so ``update`` is an atomic swap that
the very next packet sees, and a reply never mixes two snapshots. Handlers never raise out
(a bad packet is dropped or answered FORMERR), per-packet logging is DEBUG only.

TCP (RFC 7766): 2-byte length framing, several queries per connection answered in order,
an idle timeout, a cap on concurrent connections, and backpressure (reading pauses while
the client does not read its replies). At the cap, a new connection closes the one that
has been quiet longest (RFC 7766 section 6.2.2: the server may close idle connections to
free resources) rather than being refused, so idle connections held open by a client
cannot lock the others out. UDP is served whatever TCP holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Final, cast

from meshlink.dns.answer import answer
from meshlink.dns.snapshot import Snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_UDP: Final = 1232
"""Largest UDP reply we send (DNS flag day 2020: avoids IP fragmentation)."""
TCP_IDLE_TIMEOUT: Final = 10.0
MAX_TCP_CONNECTIONS: Final = 256
_BIND_ATTEMPTS: Final = 20


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: cast, do not assert.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        # The hot path: one dict lookup and the id patched (the rest of answer() inlined).
        server = self.server
        key = data[2:]
        cache = server.udp_cache
        hit = cache.pos.get(key)
        if hit is None:
            hit = cache.neg.get(key)
        if hit is not None:
            reply: bytes | None = data[:2] + hit
        else:
            try:
                reply = answer(data, server.snapshot, max_udp=server.max_udp)
            except Exception:  # a bug in answer(): drop the packet, keep serving
                log.exception("dns: unexpected error answering a UDP query")
                return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do.
        log.debug("dns: udp error %s", exc)


class _Tcp(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.idle: asyncio.TimerHandle | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        conns = self.server.connections
        while len(conns) >= self.server.max_connections:
            quietest = next(iter(conns))  # least recently active first
            del conns[quietest]
            log.debug("dns: %d tcp connections open: closing the quietest", len(conns) + 1)
            quietest.close()
        conns[self] = None
        self.server.tcp_accepted += 1
        self._arm()

    def close(self) -> None:
        """Close now: replies the client has not read are dropped (a graceful close would
        wait for it, holding the socket)."""
        if self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            else:
                self.transport.close()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.server.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        log.debug("dns: tcp connection idle, closing")
        self.close()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._arm()
        conns = self.server.connections
        if self in conns:  # most recently active last
            del conns[self]
            conns[self] = None
        buf = self.buf
        buf += data
        server = self.server
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            query = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            try:
                reply = answer(query, server.snapshot, max_udp=server.max_udp, tcp=True)
            except Exception:  # a bug in answer(): close this connection only
                log.exception("dns: unexpected error answering a TCP query")
                transport.close()
                return
            if reply is None:
                # Unreadable header: no way to say FORMERR to it; end the stream.
                transport.close()
                return
            transport.write(len(reply).to_bytes(2, "big") + reply)

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its queries.
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.server.connections.pop(self, None)
        self.transport = None


class DnsServer:
    """UDP and TCP on the same address and port, answering from the current snapshot."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        host: str = "127.0.0.1",
        port: int = 5353,
        max_udp: int = DEFAULT_MAX_UDP,
        idle_timeout: float = TCP_IDLE_TIMEOUT,
        max_connections: int = MAX_TCP_CONNECTIONS,
    ) -> None:
        self.host = host
        self.port = port
        self.max_udp = max_udp
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.snapshot = snapshot
        self.udp_cache = snapshot.cache(max_udp, False)
        self.connections: dict[_Tcp, None] = {}
        """Open TCP connections, least recently active first."""
        self.tcp_accepted = 0
        """TCP connections accepted so far (for status and tests)."""
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self.bound_port = 0

    def update(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from the next packet on (both assignments before any I/O)."""
        self.udp_cache = snapshot.cache(self.max_udp, False)
        self.snapshot = snapshot

    async def start(self) -> None:
        """Bind UDP and TCP on one port (port 0: a free one, the same for both)."""
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS if self.port == 0 else 1):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, self.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(
                    lambda: _Tcp(self),
                    host=self.host,
                    port=port,
                    reuse_address=True,
                    backlog=self.max_connections,
                )
            except OSError as e:
                udp.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                last = e
                continue
            self._udp = udp
            self.bound_port = port
            sock = udp.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            log.info(
                "dns: serving %s on %s port %d (udp+tcp), %d names",
                self.snapshot.zone,
                self.host,
                port,
                self.snapshot.names,
            )
            return
        assert last is not None
        raise last

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            await self._tcp.wait_closed()
            self._tcp = None
