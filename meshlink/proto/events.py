"""Events returned by `Connection.receive_data`: what the peer did, one object per fact."""

from __future__ import annotations

from dataclasses import dataclass

from meshlink.errors import ErrorCode
from meshlink.proto.target import FlowTarget


class Event:
    """Base of all protocol events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """The peer's HELLO: the link is usable once this arrives."""

    version: int
    max_frame: int
    initial_window: int
    max_streams: int = 0xFFFFFFFF
    """Streams we may have open at once on this link (0xFFFFFFFF: the peer set no limit)."""


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream to `target`; answer with accept_stream or reset_stream."""

    stream_id: int
    target: FlowTarget
    hops: int


@dataclass(frozen=True, slots=True)
class StreamAccepted(Event):
    """The peer reached the target of a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Payload bytes of a stream. A DATA frame may arrive as several of these (they are
    delivered as the bytes come in). `data` is a read-only view that stays valid; hand its
    length to `acknowledge_received` once the bytes have been consumed."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream (FIN): it will send no more data."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The peer aborted the stream."""

    stream_id: int
    code: ErrorCode
    text: str = ""
    """The peer's reason, if it gave one (for logs and error messages only)."""


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted more send credit on a stream."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    """The peer pinged; the PONG is already queued."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """Answer to one of our pings, echoing its 8-byte payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ControlReceived(Event):
    """An opaque control message (catalog sync rides on these)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer is closing the connection."""

    code: ErrorCode
    text: str
