"""The meshlink tunnel wire format, version 1: frame layout, types and payload codecs.

Every frame is a 10-byte header followed by `length` payload bytes (network byte order)::

    0       4      5       6               10
    +-------+------+-------+----------------+-----------------------+
    |length | type | flags |   stream id    |  payload (length B)   |
    |  u32  |  u8  |  u8   |      u32       |                       |
    +-------+------+-------+----------------+-----------------------+

`flags` is reserved: sent as 0, ignored on receipt. `length` may not exceed the receiver's
`max_frame` (from its HELLO; never more than 1 MiB), else FRAME_SIZE_ERROR.

Frame types (stream 0 = the connection itself):

====  ========  ======  ===========================================================
type  name      stream  payload
====  ========  ======  ===========================================================
0     HELLO     0       magic ``b"MESHLINK"`` | version u16 | max_frame u32 |
                        initial_window u32 (bytes a peer may send per stream
                        before a WINDOW) | max_streams u32 (optional) |
                        instance (u8 length, ASCII bytes) | replicas u16
                        (optional, both or neither; see below). Must be each
                        side's first frame, on stream 0; further trailing
                        bytes are reserved for later versions.
1     OPEN      new id  hops u8 | protocol, site, namespace, name as (u8 length,
                        UTF-8 bytes) | port u16. Ids are odd when opened by the
                        side that dialled the TLS connection, even otherwise, and
                        increase per side.
2     ACCEPT    id      empty: the receiver of OPEN reached the target.
3     DATA      id      stream bytes; counted against the stream's window.
4     FIN       id      empty: the sender half-closes (no more DATA from it).
5     RST       id      code u32 (errors.ErrorCode) | optional UTF-8 reason (at
                        most 256 bytes): the stream is aborted.
6     WINDOW    id      increment u32 > 0: more send credit for that stream.
7     PING      0       8 opaque bytes, echoed in a PONG (RTT measurement).
8     PONG      0       the 8 bytes of the PING it answers.
9     CONTROL   0       opaque bytes (catalog sync), at most MAX_CONTROL bytes.
10    GOAWAY    0       code u32 | UTF-8 text (at most 1024 bytes): the sender
                        closes the connection after this frame.
====  ========  ======  ===========================================================

``max_streams`` (added within version 1, in the bytes reserved for it; a HELLO without it
announces no limit): how many streams the sender lets its peer have open at once, counting
the streams the peer opened that the sender has not yet seen closed (both FINs, or an RST).
An OPEN beyond it is answered by RST(REFUSED_STREAM); a sender keeps under its peer's limit
(a stream counts from its OPEN until the sender has both sent and received FIN, or sent or
received an RST: the receiver never forgets a stream later than that, because frames are
ordered).

``instance`` and ``replicas`` (added within version 1, after max_streams; a HELLO without
them is instance "" and 1 replica, as sent before): ``instance`` names the running process
of the sender's site (its pod name in Kubernetes), at most 253 characters of
``a-z A-Z 0-9 . _ -`` (empty: not named); ``replicas`` (1 to 1024) is how many instances
the sender's site runs, so that a dialer knows how many distinct instances to link with.
Anything else there is a PROTOCOL_ERROR: the peer claims fields it does not fill right.

A version the receiver does not speak is answered by GOAWAY(UNSUPPORTED_VERSION) naming
the versions it does. Frames for a stream that has already closed are ignored (they may
cross an RST on the wire); frames for a stream that was never opened are a
PROTOCOL_ERROR.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from meshlink.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from meshlink.names import MAX_REPLICAS, is_instance_id
from meshlink.proto.target import MAX_HOPS, FlowTarget

MAGIC: Final = b"MESHLINK"
VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

HEADER: Final = struct.Struct("!IBBI")
HEADER_SIZE: Final = HEADER.size  # 10
HELLO_BODY: Final = struct.Struct("!8sHII")
HELLO_STREAMS: Final = struct.Struct("!I")
HELLO_REPLICAS: Final = struct.Struct("!H")
MAX_INSTANCE: Final = 253
"""The longest instance id a HELLO may carry (a Kubernetes pod name's limit)."""

MAX_FRAME_LIMIT: Final = 1 << 20
"""No frame payload is ever larger than this (1 MiB)."""
MIN_FRAME_LIMIT: Final = 1 << 14
DEFAULT_MAX_FRAME: Final = MAX_FRAME_LIMIT
DEFAULT_WINDOW: Final = 1 << 20
MAX_CONTROL: Final = MAX_FRAME_LIMIT
MAX_GOAWAY_TEXT: Final = 1024
MAX_RST_TEXT: Final = 256
DEFAULT_MAX_STREAMS: Final = 512
"""Streams a peer may have open at once on one link (each can cost an upstream socket)."""
NO_STREAM_LIMIT: Final = 0xFFFFFFFF
"""The limit assumed of a peer whose HELLO does not carry max_streams."""

_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")


class FrameType(enum.IntEnum):
    HELLO = 0
    OPEN = 1
    ACCEPT = 2
    DATA = 3
    FIN = 4
    RST = 5
    WINDOW = 6
    PING = 7
    PONG = 8
    CONTROL = 9
    GOAWAY = 10


CONNECTION_FRAMES: Final = frozenset(
    {FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.CONTROL, FrameType.GOAWAY}
)


def frame(ftype: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), ftype, 0, stream_id) + payload


@dataclass(frozen=True, slots=True)
class Hello:
    """The fields of a HELLO (see the table in the module docstring)."""

    version: int
    max_frame: int
    initial_window: int
    max_streams: int = DEFAULT_MAX_STREAMS
    instance: str = ""
    replicas: int = 1


def check_instance(instance: str, replicas: int) -> str | None:
    """What is wrong with an instance id and replica count for a HELLO (None: nothing)."""
    if instance and not is_instance_id(instance):
        return f"instance id {instance[:64]!a} is not 0-{MAX_INSTANCE} of a-z A-Z 0-9 . _ -"
    if not 1 <= replicas <= MAX_REPLICAS:
        return f"replicas {replicas} is outside 1..{MAX_REPLICAS}"
    return None


def encode_hello(
    version: int,
    max_frame: int,
    initial_window: int,
    max_streams: int = DEFAULT_MAX_STREAMS,
    instance: str = "",
    replicas: int = 1,
) -> bytes:
    raw = instance.encode("ascii", "replace")
    return (
        HELLO_BODY.pack(MAGIC, version, max_frame, initial_window)
        + HELLO_STREAMS.pack(max_streams)
        + bytes([len(raw)])
        + raw
        + HELLO_REPLICAS.pack(replicas)
    )


def decode_hello(payload: bytes) -> Hello:
    """The fields of a HELLO payload; max_streams is NO_STREAM_LIMIT when the peer did not
    send it, instance "" and replicas 1 when it did not send those. Checks the magic and the
    instance fields (the version check is the connection's, so it can answer with the
    versions it speaks)."""
    if len(payload) < HELLO_BODY.size or payload[:8] != MAGIC:
        raise RemoteProtocolError("the peer does not speak the meshlink tunnel protocol")
    _, version, max_frame, window = HELLO_BODY.unpack_from(payload)
    max_streams = NO_STREAM_LIMIT
    pos = HELLO_BODY.size
    if len(payload) >= pos + HELLO_STREAMS.size:
        (max_streams,) = HELLO_STREAMS.unpack_from(payload, pos)
        pos += HELLO_STREAMS.size
    if len(payload) == pos:
        return Hello(version, max_frame, window, max_streams)
    n = payload[pos]
    end = pos + 1 + n
    if len(payload) < end + HELLO_REPLICAS.size:
        raise RemoteProtocolError("HELLO instance fields are cut short")
    instance = payload[pos + 1 : end].decode("latin-1")
    (replicas,) = HELLO_REPLICAS.unpack_from(payload, end)
    problem = check_instance(instance, replicas)
    if problem is not None:
        raise RemoteProtocolError(f"HELLO {problem}")
    return Hello(version, max_frame, window, max_streams, instance, replicas)


def check_hello_limits(max_frame: int, window: int, max_streams: int = NO_STREAM_LIMIT) -> None:
    if not MIN_FRAME_LIMIT <= max_frame <= MAX_FRAME_LIMIT:
        raise RemoteProtocolError(
            f"HELLO max_frame {max_frame} is outside {MIN_FRAME_LIMIT}..{MAX_FRAME_LIMIT}"
        )
    if not 1 <= window <= 2**31 - 1:
        raise RemoteProtocolError(
            f"HELLO initial_window {window} is out of range", ErrorCode.FLOW_CONTROL_ERROR
        )
    if max_streams < 1:
        raise RemoteProtocolError("HELLO max_streams is 0: the peer would accept no stream")


def _put_str(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    out.append(len(raw))
    out += raw


def encode_open(target: FlowTarget, hops: int) -> bytes:
    problem = target.problem()
    if problem:
        raise LocalProtocolError(f"cannot open a stream to {target!r}: {problem}")
    if not 0 <= hops <= MAX_HOPS:
        raise LocalProtocolError(f"hop count {hops} is outside 0..{MAX_HOPS}")
    out = bytearray([hops])
    for value in (target.protocol, target.site, target.namespace, target.name):
        _put_str(out, value)
    out += _U16.pack(target.port)
    return bytes(out)


def decode_open(payload: bytes) -> tuple[FlowTarget, int]:
    """(target, hops) of an OPEN payload; any malformation is a PROTOCOL_ERROR."""
    fields: list[str] = []
    pos = 1
    try:
        for _ in range(4):
            n = payload[pos]
            raw = payload[pos + 1 : pos + 1 + n]
            pos += 1 + n  # a short field leaves pos past the end: unpack_from fails below
            fields.append(raw.decode("utf-8"))
        (port,) = _U16.unpack_from(payload, pos)
    except (IndexError, UnicodeDecodeError, struct.error):
        raise RemoteProtocolError("malformed OPEN frame") from None
    if len(payload) != pos + 2:
        raise RemoteProtocolError("malformed OPEN frame (wrong length)")
    hops = payload[0]
    protocol, site, namespace, name = fields
    target = FlowTarget(site=site, namespace=namespace, name=name, port=port, protocol=protocol)
    problem = target.problem()
    if problem:
        raise RemoteProtocolError(f"OPEN frame names an invalid target: {problem}")
    if hops > MAX_HOPS:
        raise RemoteProtocolError(f"OPEN frame hop count {hops} exceeds {MAX_HOPS}")
    return target, hops


def decode_code(payload: bytes, what: str) -> ErrorCode:
    if len(payload) < 4:
        raise RemoteProtocolError(f"{what} frame is too short", ErrorCode.FRAME_SIZE_ERROR)
    (raw,) = _U32.unpack_from(payload)
    try:
        return ErrorCode(raw)
    except ValueError:  # a code from a later version: the closest meaning we know
        return ErrorCode.INTERNAL_ERROR


def encode_u32(value: int) -> bytes:
    return _U32.pack(value)


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise RemoteProtocolError(f"{what} frame must carry 4 bytes", ErrorCode.FRAME_SIZE_ERROR)
    value: int = _U32.unpack(payload)[0]
    return value


def encode_rst(code: int, text: str = "") -> bytes:
    return _U32.pack(code) + text.encode("utf-8")[:MAX_RST_TEXT]


def decode_rst(payload: bytes) -> tuple[ErrorCode, str]:
    code = decode_code(payload, "RST")
    if len(payload) > 4 + MAX_RST_TEXT:
        raise RemoteProtocolError("RST reason is too long", ErrorCode.FRAME_SIZE_ERROR)
    return code, payload[4:].decode("utf-8", "replace")


def encode_goaway(code: int, text: str) -> bytes:
    raw = text.encode("utf-8")[:MAX_GOAWAY_TEXT]
    return _U32.pack(code) + raw


def decode_goaway(payload: bytes) -> tuple[ErrorCode, str]:
    code = decode_code(payload, "GOAWAY")
    text = payload[4 : 4 + MAX_GOAWAY_TEXT].decode("utf-8", "replace")
    return code, text
