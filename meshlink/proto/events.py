"""Events returned by `Connection.receive_data`: what the peer did, one object per fact."""

from __future__ import annotations

from dataclasses import dataclass

from meshlink.errors import ErrorCode
from meshlink.proto.target import FlowTarget


class Event:
    """Base of all protocol events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamEvent(Event):
    """Something the peer did on one stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PayloadEvent(Event):
    """A connection-level frame whose payload is all there is to it."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """The peer's HELLO: the link is usable once this arrives."""

    version: int
    max_frame: int
    initial_window: int
    max_streams: int = 0xFFFFFFFF
    """Streams we may have open at once on this link (0xFFFFFFFF: the peer set no limit)."""
    instance: str = ""
    """The peer's instance id ("" from a peer that does not name its instances)."""
    replicas: int = 1
    """How many instances the peer's site runs."""


@dataclass(frozen=True, slots=True)
class StreamOpened(StreamEvent):
    """The peer opened a stream to `target`; answer with accept_stream or reset_stream."""

    target: FlowTarget
    hops: int


@dataclass(frozen=True, slots=True)
class StreamAccepted(StreamEvent):
    """The peer reached the target of a stream we opened."""


@dataclass(frozen=True, slots=True)
class DataReceived(StreamEvent):
    """Payload bytes of a stream. A DATA frame may arrive as several of these (they are
    delivered as the bytes come in). `data` is a read-only view that stays valid; hand its
    length to `acknowledge_received` once the bytes have been consumed."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded(StreamEvent):
    """The peer half-closed the stream (FIN): it will send no more data."""


@dataclass(frozen=True, slots=True)
class StreamReset(StreamEvent):
    """The peer aborted the stream."""

    code: ErrorCode
    text: str = ""
    """The peer's reason, if it gave one (for logs and error messages only)."""


@dataclass(frozen=True, slots=True)
class WindowUpdated(StreamEvent):
    """The peer granted more send credit on a stream."""

    increment: int


@dataclass(frozen=True, slots=True)
class PingReceived(PayloadEvent):
    """The peer pinged; the PONG is already queued."""


@dataclass(frozen=True, slots=True)
class PongReceived(PayloadEvent):
    """Answer to one of our pings, echoing its 8-byte payload."""


@dataclass(frozen=True, slots=True)
class ControlReceived(PayloadEvent):
    """An opaque control message (catalog sync rides on these)."""


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer is closing the connection."""

    code: ErrorCode
    text: str
