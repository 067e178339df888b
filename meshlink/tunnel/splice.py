"""Splicing: a flow is two `End`s joined back to back (TCP socket <-> tunnel stream, stream
<-> stream when relaying, socket <-> socket for a local route).

Each End pushes what it reads into its peer (`feed`, `feed_eof`, `feed_abort`) and tells its
peer to stop or resume reading when its own output backs up (`pause_input`,
`resume_input`): uvicorn's flow-control pattern, so every buffer in a flow is bounded and a
slow receiver slows the original sender. A TCP end is an asyncio Protocol (no streams, no
per-chunk task switches): the hot path is `data_received -> transport.write`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from typing import Final, cast

from meshlink.errors import ErrorCode
from meshlink.tunnel.types import FlowError, describe_code

log = logging.getLogger(__name__)

TCP_HIGH_WATER: Final = 512 * 1024
"""A socket's write buffer above this pauses whatever feeds it."""

_LINGER_0: Final = struct.pack("ii", 1, 0)


class End:
    """One side of a spliced flow (see the module docstring)."""

    __slots__ = ("peer",)

    def __init__(self) -> None:
        self.peer: End | None = None

    def feed(self, data: bytes | memoryview) -> None:
        """Write `data` out of this end."""
        raise NotImplementedError

    def feed_eof(self) -> None:
        """The other side will send nothing more: half-close our output."""
        raise NotImplementedError

    def feed_abort(self, code: ErrorCode, text: str = "") -> None:
        """The other side failed: abort this end (a TCP RST, a stream RST)."""
        raise NotImplementedError

    def pause_input(self) -> None:
        """Our peer's output is full: stop reading until resume_input."""
        raise NotImplementedError

    def resume_input(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Begin moving data once joined (ends that wait for their join override this)."""


def join(a: End, b: End) -> None:
    a.peer = b
    b.peer = a


def abort_transport(transport: asyncio.Transport) -> None:
    """Close with an RST (SO_LINGER 0), so the far end sees a reset, not a clean FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    transport.abort()


class TcpEnd(End, asyncio.Protocol):
    """A TCP connection as one end of a flow. Starts with reading paused until joined."""

    __slots__ = (
        "_closed",
        "_early",
        "_eof_in",
        "_eof_out",
        "_paused_by_peer",
        "transport",
    )

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self._eof_in = False
        self._eof_out = False
        self._closed = False
        self._paused_by_peer = False
        self._early: list[bytes] | None = None
        """Bytes that arrived before the end was joined (uvloop may deliver one read even
        though reading was paused in connection_made); flushed in order by start()."""

    @property
    def closed(self) -> bool:
        """Closed or aborted (its connection is gone or going)."""
        return self._closed

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        if self.peer is None:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and self._early is None:
            peer.feed(data)
            return
        # Not joined (or not started) yet: keep the bytes, stop reading; start() flushes.
        if self._early is None:
            self._early = []
        self._early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof_in = True
        if self._early is not None:
            return True  # delivered by start(), after the early bytes
        if self.peer is not None:
            self.peer.feed_eof()
        if self._eof_out and self.transport is not None:
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self._closed
        self._closed = True
        peer = self.peer
        if not was_closed and peer is not None and not (self._eof_in and self._eof_out):
            # reset, error, or closed without a FIN exchange: the other side must not hang
            if exc is None and self._eof_in:
                pass  # orderly: our FIN went upstream; the peer finishes on its own
            else:
                log.debug("tcp end lost: %s", exc)
                peer.feed_abort(ErrorCode.CANCEL)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_input()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_input()

    # End
    def start(self) -> None:
        """Begin reading (after join), first handing over whatever arrived early."""
        early, self._early = self._early, None
        if early and self.peer is not None:
            for chunk in early:
                self.peer.feed(chunk)
        if self._eof_in and early is not None and self.peer is not None:
            self.peer.feed_eof()
        if self.transport is not None and not self._closed and not self._paused_by_peer:
            self.transport.resume_reading()

    def feed(self, data: bytes | memoryview) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def feed_eof(self) -> None:
        t = self.transport
        if self._closed or t is None or self._eof_out:
            return
        self._eof_out = True
        if self._eof_in:
            t.close()
        elif t.can_write_eof():
            t.write_eof()
        else:  # pragma: no cover - TCP transports can always half-close
            t.close()

    def feed_abort(self, code: ErrorCode, text: str = "") -> None:
        if self._closed or self.transport is None:
            self._closed = True
            return
        self._closed = True
        abort_transport(self.transport)

    def pause_input(self) -> None:
        self._paused_by_peer = True
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_input(self) -> None:
        self._paused_by_peer = False
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()


class Flow(End):
    """A flow as an object with awaitable reads and writes (what `Gateway.open_flow` returns).

    Reads return b"" at the end of the flow (the far side half-closed) and raise FlowError
    when it was reset. Buffers are bounded: reading less pauses the far sender.
    """

    __slots__ = (
        "_buf",
        "_buffered",
        "_code",
        "_eof",
        "_paused",
        "_text",
        "_waiter",
        "_write_ok",
    )

    LIMIT: Final = 256 * 1024

    def __init__(self) -> None:
        super().__init__()
        self._buf: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._code: ErrorCode | None = None
        self._text = ""
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_ok = asyncio.Event()
        self._write_ok.set()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # End (the tunnel side pushes into us)
    def feed(self, data: bytes | memoryview) -> None:
        self._buf.append(bytes(data))
        self._buffered += len(data)
        if self._buffered > self.LIMIT and not self._paused and self.peer is not None:
            self._paused = True
            self.peer.pause_input()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def feed_abort(self, code: ErrorCode, text: str = "") -> None:
        self._code = code
        self._text = text
        self._write_ok.set()
        self._wake()

    def pause_input(self) -> None:
        self._write_ok.clear()

    def resume_input(self) -> None:
        self._write_ok.set()

    def _error(self) -> FlowError:
        assert self._code is not None
        why = self._text or describe_code(self._code)
        return FlowError(f"the flow was reset: {why}", self._code)

    # user API
    async def read(self, n: int = 65536) -> bytes:
        while not self._buf:
            if self._code is not None:
                raise self._error()
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._buf.popleft()
        if len(chunk) > n:
            self._buf.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= self.LIMIT // 2 and self.peer is not None:
            self._paused = False
            self.peer.resume_input()
        return chunk

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
        return bytes(out)

    def write(self, data: bytes) -> None:
        if self._code is not None:
            raise self._error()
        if self.peer is not None and data:
            self.peer.feed(data)

    async def drain(self) -> None:
        await self._write_ok.wait()
        if self._code is not None:
            raise self._error()

    def write_eof(self) -> None:
        if self.peer is not None and self._code is None:
            self.peer.feed_eof()

    def abort(self) -> None:
        if self.peer is not None and self._code is None:
            self._code = ErrorCode.CANCEL
            self.peer.feed_abort(ErrorCode.CANCEL)
            self._wake()
