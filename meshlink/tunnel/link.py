"""One link: a TLS connection to a peer gateway running the tunnel protocol, and the streams
multiplexed on it.

`Link` is an asyncio Protocol over the TLS transport, in uvicorn's manner: `data_received`
feeds the sans-IO `Connection` and dispatches its events to `StreamEnd`s; writes are
batched (frames queued during one loop iteration go out in one `writelines`);
`pause_writing`/`resume_writing` tell the link's sans-IO `StreamScheduler`, which owns
fairness and head-of-line blocking: the TLS write buffer is kept small; when it is full,
streams park their data, pause their source, and are drained round robin in quanta when
the transport asks for more, so a bulk flow cannot starve a small one of link capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Final, Protocol, cast

from meshlink.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from meshlink.proto import (
    DEFAULT_MAX_STREAMS,
    EOF_SENT,
    RESUMED,
    Connection,
    ControlReceived,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamScheduler,
    StreamState,
    WindowUpdated,
)
from meshlink.proto.target import FlowTarget
from meshlink.tunnel.splice import End
from meshlink.tunnel.types import FlowRefused, NoRouteError, describe_code

log = logging.getLogger(__name__)

LINK_HIGH_WATER: Final = 1 << 20
LINK_LOW_WATER: Final = 256 * 1024
LINK_SOCKBUF: Final = 4 << 20
STREAM_WINDOW: Final = 4 << 20
"""Default per-stream credit: the most a peer may have in flight (and we may buffer) per
stream. Measured: 1 MiB capped a single flow near 1-2 Gbit/s on a loaded 2-core machine
(the credit round trip crosses two busy processes); 4 MiB roughly doubled it."""


class StreamEnd(End):
    """A stream on a link, as one end of a flow: glue between the flow's other end and the
    link's ``StreamScheduler`` (which owns parking, credit and held acknowledgements)."""

    __slots__ = (
        "_early",
        "_early_abort",
        "_early_eof",
        "accepted",
        "box",
        "closed",
        "link",
        "on_accepted",
        "sid",
    )

    def __init__(self, link: Link, sid: int) -> None:
        super().__init__()
        self.link = link
        self.sid = sid
        self.box = link.scheduler.open(sid)
        self.closed = False
        self.accepted: asyncio.Future[None] | None = None
        self.on_accepted: Callable[[], None] | None = None
        # What arrived before the join, replayed in order by start().
        self._early: list[bytes | memoryview] = []
        self._early_eof = False
        self._early_abort: tuple[ErrorCode, str] | None = None

    # -- link -> flow ------------------------------------------------------------------
    def on_data(self, data: memoryview | bytes) -> None:
        peer = self.peer
        if peer is None:
            self._early.append(data)
        else:
            peer.feed(data)
        # the WINDOW this may queue goes out with data_received's kick
        self.link.scheduler.received(self.box, len(data))

    def on_eof(self) -> None:
        if self.peer is None:
            self._early_eof = True
        else:
            self.peer.feed_eof()
        self._maybe_done()

    def on_reset(self, code: ErrorCode, text: str | None = None) -> None:
        if self.closed:
            return
        self._finish()
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(_reset_error(code, text))
        if self.peer is not None:
            self.peer.feed_abort(code, text or "")
        else:
            self._early_abort = (code, text or "")

    def on_window(self) -> None:
        self.drained(self.link.scheduler.window_opened(self.box))

    def start(self) -> None:
        """Replay what arrived before the join; credit flows from now on."""
        early, self._early = self._early, []
        peer = self.peer
        if peer is not None:
            for chunk in early:
                peer.feed(chunk)
            if self._early_eof:
                peer.feed_eof()
        if self._early_abort is not None and peer is not None:
            peer.feed_abort(*self._early_abort)
        else:
            self.link.scheduler.start(self.box)
            self.link.kick()

    # -- flow -> link ------------------------------------------------------------------
    def feed(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        if self.link.scheduler.send(self.box, data) and self.peer is not None:
            self.peer.pause_input()
        self.link.kick()

    def drained(self, flags: int) -> None:
        """What the scheduler reports after draining this stream's parked data."""
        self.link.kick()
        if flags & EOF_SENT:
            self._maybe_done()
        if flags & RESUMED and self.peer is not None:
            self.peer.resume_input()

    def feed_eof(self) -> None:
        if self.closed:
            return
        if self.link.scheduler.send_eof(self.box):
            self.link.kick()
            self._maybe_done()

    def feed_abort(self, code: ErrorCode, text: str = "") -> None:
        if self.closed:
            return
        self._finish()
        try:
            self.link.conn.reset_stream(self.sid, code, text)
        except LocalProtocolError:
            return
        self.link.kick()

    def pause_input(self) -> None:
        self.link.scheduler.pause_sink(self.box)

    def resume_input(self) -> None:
        self.link.scheduler.resume_sink(self.box)
        self.link.kick()

    # -- lifecycle ---------------------------------------------------------------------
    def _maybe_done(self) -> None:
        if self.link.conn.stream_state(self.sid) is StreamState.CLOSED:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self.link.scheduler.close(self.box)
            self.link.streams.pop(self.sid, None)

    def link_lost(self) -> None:
        self.on_reset(ErrorCode.CANCEL, "the link went down")


def _reset_error(code: ErrorCode, text: str | None = None) -> Exception:
    msg = text or describe_code(code)
    if code is ErrorCode.NO_ROUTE:
        return NoRouteError(msg)
    return FlowRefused(msg, code)


class LinkOwner(Protocol):
    """What a link reports to (the gateway; tests' in-memory owners)."""

    def link_ready(self, link: Link) -> None: ...

    def link_accepted(self, link: Link, transport: asyncio.Transport) -> None: ...

    def link_closed(self, link: Link, reason: str) -> None: ...

    def stream_opened(
        self, link: Link, stream: StreamEnd, target: FlowTarget, hops: int
    ) -> None: ...

    def control(self, link: Link, payload: bytes) -> None: ...


class Link(asyncio.Protocol):
    """A TLS link to one peer gateway (see the module docstring)."""

    def __init__(
        self,
        owner: LinkOwner,
        *,
        direction: str,
        endpoint: str | None = None,
        dial_name: str | None = None,
        stream_window: int = STREAM_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        instance: str = "",
        replicas: int = 1,
    ) -> None:
        self.owner = owner
        self.direction = direction
        self.endpoint = endpoint
        self.dial_name = dial_name
        self.peer_site: str | None = None
        self.peer_instance = ""
        """The peer's instance id (from its HELLO; "" from a peer that names none)."""
        self.peer_replicas = 1
        """How many instances the peer's site runs (from its HELLO)."""
        self.duplicate = False
        """Closed because the owner already had a link with that instance."""
        self.conn = Connection(
            initiator=direction == "dial",
            initial_window=stream_window,
            max_streams=max_streams,
            instance=instance,
            replicas=replicas,
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamEnd] = {}
        # A round of the round robin is what the TLS write buffer takes between its marks.
        self.scheduler = StreamScheduler(self.conn, round_budget=LINK_HIGH_WATER - LINK_LOW_WATER)
        self.ready = False
        self.closed = False
        self.close_reason = ""
        self.lost_error: Exception | None = None  # what ended the connection (a TLS alert?)
        self.goaway_code: ErrorCode | None = None  # the peer's GOAWAY, if it sent one
        self.bytes_in = 0
        self.bytes_out = 0
        self.since = time.time()
        self.last_rx = time.monotonic()
        self.rtt_ms: float | None = None
        self.rtt_ewma_ms: float | None = None
        self._pings: dict[bytes, float] = {}
        self._kicked = False
        self._pre: list[bytes] | None = []  # bytes read before attach()
        self._torn_down = False
        self.up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the link is ready (the peer's HELLO arrived and the owner has seen it)."""
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """The close reason, once closed. Await it through ``asyncio.shield``: a task
        cancelled while awaiting it directly cancels the future itself."""

    # -- setup -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # called once the TLS handshake is done; the dialer attaches after checking the
        # server's identity, the acceptor's owner checks the client's right here
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        if self.direction == "accept":
            self.owner.link_accepted(self, transport)

    def attach(self, transport: asyncio.Transport, peer_site: str) -> None:
        """Start the protocol once the peer's identity is known and checked."""
        self.transport = transport
        self.peer_site = peer_site
        transport.set_write_buffer_limits(high=LINK_HIGH_WATER, low=LINK_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Bounded kernel buffers: bulk data waits in our per-stream queues, where small
            # flows overtake it, rather than in the sockets' one FIFO. Measured (quick runs,
            # load 3): 1 MiB cost 8-flow throughput (3.3 vs 4.8 Gbit/s) for no gain in the
            # p99 setup time of a small flow behind a bulk one (19-21 ms for 1 MiB, 4 MiB
            # and autotuned alike); the 64 KiB round-robin quantum is what bounds that.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LINK_SOCKBUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_SOCKBUF)
        self.last_rx = time.monotonic()
        self._flush()
        pre, self._pre = self._pre, None
        for chunk in pre or ():
            self.data_received(chunk)

    def refuse(self, transport: asyncio.Transport, code: ErrorCode, text: str) -> None:
        """Send HELLO + GOAWAY(code, text) and close: the peer learns why."""
        self.transport = transport
        self._pre = None
        self.conn.go_away(code, text)
        self._flush()
        self.close(text, send_goaway=False)

    # -- input -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._pre is not None:
            self._pre.append(data)
            return
        if self.closed:
            return
        self.bytes_in += len(data)
        self.last_rx = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            log.warning("link %s: protocol error from peer: %s", self.peer_site, exc)
            self._flush()
            self.close(f"protocol error: {exc}", send_goaway=False)
            return
        streams = self.streams
        for ev in events:
            if isinstance(ev, DataReceived):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.on_data(ev.data)
            elif isinstance(ev, WindowUpdated):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.on_window()
            else:
                self._on_event(ev)
                if self.is_closed():
                    return
        self.kick()

    def _on_event(self, ev: object) -> None:
        st: StreamEnd | None
        if isinstance(ev, StreamOpened):
            st = StreamEnd(self, ev.stream_id)
            self.streams[ev.stream_id] = st
            self.owner.stream_opened(self, st, ev.target, ev.hops)
        elif isinstance(ev, StreamAccepted):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                if st.accepted is not None and not st.accepted.done():
                    st.accepted.set_result(None)
                if st.on_accepted is not None:
                    st.on_accepted()
        elif isinstance(ev, StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_eof()
        elif isinstance(ev, StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_reset(ev.code, ev.text)
        elif isinstance(ev, PongReceived):
            sent = self._pings.pop(ev.payload, None)
            if sent is not None:
                rtt = (time.monotonic() - sent) * 1000
                self.rtt_ms = rtt
                self.rtt_ewma_ms = (
                    rtt if self.rtt_ewma_ms is None else (0.8 * self.rtt_ewma_ms + 0.2 * rtt)
                )
        elif isinstance(ev, ControlReceived):
            if self.ready:
                self.owner.control(self, ev.payload)
        elif isinstance(ev, HelloReceived):
            self.peer_instance = ev.instance
            self.peer_replicas = ev.replicas
            self.ready = True
            self.since = time.time()
            self.owner.link_ready(self)
            if not self.up.done():
                self.up.set_result(None)
        elif isinstance(ev, GoAwayReceived):
            self.goaway_code = ev.code
            why = f"peer closed the link: {ev.code.name}" + (f" ({ev.text})" if ev.text else "")
            if ev.code is ErrorCode.NO_ERROR:
                log.info("link %s: %s", self.peer_site, why)
            else:
                log.warning("link %s: %s", self.peer_site, why)
            self.close(why, send_goaway=False)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_error = exc
        self._teardown(self.close_reason or (f"connection lost: {exc}" if exc else "peer closed"))

    def is_closed(self) -> bool:
        return self.closed

    # -- output ----------------------------------------------------------------------
    def kick(self) -> None:
        """Schedule a flush of queued frames at the end of this loop iteration."""
        if not self._kicked and not self.closed:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._kicked = False
        t = self.transport
        if t is None or t.is_closing():
            return
        out = self.conn.data_to_send()
        if out:
            self.bytes_out += sum(map(len, out))
            t.writelines(out)

    def pause_writing(self) -> None:
        self.scheduler.writable = False

    def resume_writing(self) -> None:
        sched = self.scheduler
        sched.writable = True
        while sched.blocked and sched.writable:
            # a round of quanta, then a flush (which may pause us again: the rest wait)
            for box, flags in sched.drain_round():
                st = self.streams.get(box.sid)
                if st is not None:
                    st.drained(flags)
            self._flush()

    # -- API -------------------------------------------------------------------------
    def open_stream(self, target: FlowTarget, hops: int) -> StreamEnd:
        sid = self.conn.open_stream(target, hops=hops)
        st = StreamEnd(self, sid)
        self.streams[sid] = st
        self.kick()
        return st

    def accept(self, st: StreamEnd) -> None:
        if not st.closed:
            self.conn.accept_stream(st.sid)
            self.kick()

    def send_control(self, payload: bytes) -> None:
        self.conn.send_control(payload)
        self.kick()

    def heartbeat(self, dead_after: float) -> bool:
        """Send a PING; returns False (and closes) when the peer has been silent too long."""
        if self.closed:
            return False
        silent = time.monotonic() - self.last_rx
        if silent > dead_after:
            log.warning("link %s: no frames for %.1f s: declaring it dead", self.peer_site, silent)
            self.close(f"no heartbeat for {silent:.1f} s", send_goaway=False, abort=True)
            return False
        if self.ready:
            if len(self._pings) > 16:
                self._pings.clear()
            token = self.conn.ping()
            self._pings[token] = time.monotonic()
            self.kick()
        return True

    def close(
        self,
        reason: str,
        *,
        code: ErrorCode = ErrorCode.NO_ERROR,
        send_goaway: bool = True,
        abort: bool = False,
    ) -> None:
        if self.closed:
            return
        if not self.close_reason:
            self.close_reason = reason
        if send_goaway and not self.conn.closed:
            self.conn.go_away(code, reason)
        self._flush()
        t = self.transport
        self._teardown(reason)
        if t is not None:
            if abort:
                t.abort()
            else:
                t.close()

    def _teardown(self, reason: str) -> None:
        # Once, whatever happened to ``done``: the owner must always hear of the close
        # (it was skipped when a cancelled waiter had cancelled ``done``, and the gateway
        # then kept reporting a closed link as up).
        if self._torn_down:
            return
        self._torn_down = True
        self.closed = True
        if not self.close_reason:
            self.close_reason = reason
        for st in list(self.streams.values()):
            st.link_lost()
        self.streams.clear()
        if not self.done.done():
            self.done.set_result(self.close_reason)
        self.owner.link_closed(self, self.close_reason)
