"""The versioned sans-IO tunnel wire protocol: frames, streams, flow-control windows.

`Connection` is the protocol (bytes in, events out, bytes to send); the wire format is
documented in `meshlink.proto.frames`; `StreamScheduler` decides which stream sends next
and when credit returns (`meshlink.proto.scheduler`). Nothing here does I/O.
"""

from meshlink.proto.connection import Connection
from meshlink.proto.events import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from meshlink.proto.frames import (
    DEFAULT_MAX_STREAMS,
    MAX_CONTROL,
    SUPPORTED_VERSIONS,
    VERSION,
    FrameType,
)
from meshlink.proto.scheduler import EOF_SENT, RESUMED, Outbox, StreamScheduler
from meshlink.proto.state import StreamState
from meshlink.proto.target import MAX_HOPS, FlowTarget

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "EOF_SENT",
    "MAX_CONTROL",
    "MAX_HOPS",
    "RESUMED",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "Connection",
    "ControlReceived",
    "DataReceived",
    "Event",
    "FlowTarget",
    "FrameType",
    "GoAwayReceived",
    "HelloReceived",
    "Outbox",
    "PingReceived",
    "PongReceived",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "StreamScheduler",
    "StreamState",
    "WindowUpdated",
]
