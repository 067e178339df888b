"""Flow ends under test: a conformance suite every end must pass (trio's
``check_two_way_stream`` habit), and an in-memory link pair to run ``StreamEnd`` without
sockets or TLS.

``check_end_pair(make_pair)`` takes a factory of two connected ``Flow``s, whose bytes cross
the ends under test (a Flow joined to a Flow; TcpEnds over a loopback socket; StreamEnds
over a link), and checks ordering both ways at once, half-close each way, a reset, and
backpressure: a writer whose reader does not read is stopped within bounded buffers, and
resumes losing nothing once the reader reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from meshlink.proto import FlowTarget
from meshlink.tunnel import FlowError
from meshlink.tunnel.link import Link, StreamEnd
from meshlink.tunnel.splice import Flow, TcpEnd, join

PairFactory = Callable[[], contextlib.AbstractAsyncContextManager[tuple[Flow, Flow]]]

TIMEOUT = 10.0


def _payload(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


async def _send_all(flow: Flow, data: bytes, chunk: int = 65536) -> None:
    for i in range(0, len(data), chunk):
        flow.write(data[i : i + chunk])
        await flow.drain()


async def check_ordering_both_ways(make_pair: PairFactory) -> None:
    async with make_pair() as (a, b):
        ab, ba = _payload(3_000_000, 1), _payload(2_000_000, 2)

        async def side(me: Flow, out: bytes, want: bytes) -> None:
            sender = asyncio.create_task(_send_all(me, out))
            got = bytearray()
            while len(got) < len(want):
                chunk = await me.read()
                assert chunk, "the flow ended early"
                got += chunk
            await sender
            assert got == want

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(side(a, ab, ba), side(b, ba, ab))


async def check_half_close(make_pair: PairFactory) -> None:
    async with make_pair() as (a, b):
        async with asyncio.timeout(TIMEOUT):
            a.write(b"request")
            a.write_eof()
            assert await b.read_all() == b"request"  # then b"" : a's end of flow
            assert await b.read() == b""
            b.write(b"reply after the request ended")  # the other way still flows
            b.write_eof()
            assert await a.read_all() == b"reply after the request ended"


async def check_reset(make_pair: PairFactory) -> None:
    async with make_pair() as (a, b):
        async with asyncio.timeout(TIMEOUT):
            a.write(b"x" * 1000)
            await a.drain()
            a.abort()

            async def read_until_error() -> None:
                while True:  # data may or may not arrive first; the reset does
                    if not await b.read():
                        raise AssertionError("a reset flow ended as if half-closed")

            with pytest.raises(FlowError):
                await read_until_error()
            with pytest.raises(FlowError):
                b.write(b"after the reset")


async def check_backpressure(make_pair: PairFactory, bound: int) -> None:
    """A writer whose reader does not read stops before ``bound`` bytes."""
    async with make_pair() as (a, b):
        written = 0
        chunk = _payload(65536, 3)
        blocked = False
        while written < bound * 2:
            a.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(a.drain(), 0.5)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"{written} bytes written to a reader that does not read"
        assert written <= bound, f"{written} bytes buffered (bound {bound})"
        a.write_eof()
        async with asyncio.timeout(TIMEOUT):
            got = await b.read_all()
        assert got == chunk * (written // len(chunk))


async def check_end_pair(make_pair: PairFactory, *, bound: int) -> None:
    """The whole suite (``bound``: the most the pair may buffer one way)."""
    await check_ordering_both_ways(make_pair)
    await check_half_close(make_pair)
    await check_reset(make_pair)
    await check_backpressure(make_pair, bound)


# -- ends to test ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def flow_pair() -> AsyncIterator[tuple[Flow, Flow]]:
    """Two Flows joined back to back."""
    a, b = Flow(), Flow()
    join(a, b)
    yield a, b


class MemoryTransport(asyncio.Transport):
    """One direction of an in-memory connection: writes reach the peer protocol's
    ``data_received`` on a later loop iteration; above ``high`` buffered bytes the writing
    protocol is paused, and resumed once the buffer is below ``low``."""

    def __init__(self, protocol: asyncio.Protocol, high: int = 256 * 1024) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer: MemoryTransport | None = None
        self.high, self.low = high, high // 4
        self.buffered = 0
        self.paused = False
        self.closing = False
        self._loop = asyncio.get_running_loop()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self.high = high
            self.low = low if low is not None else high // 4

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.peer is None:
            return
        data = bytes(data)
        self.buffered += len(data)
        self._loop.call_soon(self._deliver, data)
        if self.buffered > self.high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def _deliver(self, data: bytes) -> None:
        self.buffered -= len(data)
        if self.peer is not None and not self.peer.closing:
            self.peer.protocol.data_received(data)
        if self.paused and self.buffered <= self.low:
            self.paused = False
            self.protocol.resume_writing()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._loop.call_soon(self.protocol.connection_lost, None)
            if self.peer is not None:
                self.peer.close()

    def abort(self) -> None:
        self.close()


class MemoryOwner:
    """A LinkOwner that joins every stream the peer opens to a new Flow."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.accepted: asyncio.Queue[Flow] = asyncio.Queue()

    def link_ready(self, link: Link) -> None:
        self.ready.set()

    def link_accepted(self, link: Link, transport: asyncio.Transport) -> None:
        raise AssertionError("memory links are attached, not accepted")

    def link_closed(self, link: Link, reason: str) -> None:
        pass

    def stream_opened(self, link: Link, stream: StreamEnd, target: FlowTarget, hops: int) -> None:
        flow = Flow()
        join(flow, stream)
        link.accept(stream)
        stream.start()
        self.accepted.put_nowait(flow)

    def control(self, link: Link, payload: bytes) -> None:
        pass


@contextlib.asynccontextmanager
async def memory_links(
    *, stream_window: int = 1 << 20, high: int = 256 * 1024
) -> AsyncIterator[tuple[Link, Link, MemoryOwner]]:
    """Two Links joined in memory (no TLS): the dialer's and the acceptor's (its owner)."""
    oa, ob = MemoryOwner(), MemoryOwner()
    la = Link(oa, direction="dial", stream_window=stream_window)
    lb = Link(ob, direction="accept", stream_window=stream_window)
    ta, tb = MemoryTransport(la, high), MemoryTransport(lb, high)
    ta.peer, tb.peer = tb, ta
    la.attach(ta, "b")
    lb.attach(tb, "a")
    try:
        async with asyncio.timeout(TIMEOUT):
            await oa.ready.wait()
            await ob.ready.wait()
        yield la, lb, ob
    finally:
        la.close("test over")
        lb.close("test over")


@contextlib.asynccontextmanager
async def stream_pair(*, stream_window: int = 1 << 20) -> AsyncIterator[tuple[Flow, Flow]]:
    """Two Flows joined by a stream over an in-memory link pair."""
    async with memory_links(stream_window=stream_window) as (la, _lb, owner):
        st = la.open_stream(FlowTarget("b", "ns", "svc", 80), 0)
        a = Flow()
        join(a, st)
        st.start()
        async with asyncio.timeout(TIMEOUT):
            b = await owner.accepted.get()
        yield a, b


@contextlib.asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[Flow, Flow]]:
    """Two Flows joined by TcpEnds over a loopback TCP connection."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[TcpEnd] = loop.create_future()

    def server_end() -> TcpEnd:
        end = TcpEnd()
        if not accepted.done():
            accepted.set_result(end)
        return end

    server = await loop.create_server(server_end, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ends: list[TcpEnd] = []
    try:
        client = TcpEnd()
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        far = await asyncio.wait_for(accepted, TIMEOUT)
        ends += [client, far]
        a, b = Flow(), Flow()
        join(a, client)
        join(b, far)
        client.start()
        far.start()
        yield a, b
    finally:
        for end in ends:
            end.close()
        server.close()
        await server.wait_closed()
