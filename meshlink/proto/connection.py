"""The sans-IO tunnel connection: bytes in, events out, bytes to send. No sockets, no asyncio.

One `Connection` is one end of one TLS link. Feed it what the transport read
(`receive_data`), act on the events it returns, call its methods to open streams and send,
and write whatever `data_to_send` returns. The wire format is documented in `frames`, the
stream state table in `state`, flow control in `windows`.

The hot path is kept lean: DATA payloads are handed out as zero-copy views of the bytes
that were fed in, as they arrive (a large frame split across reads becomes several
`DataReceived`), and outgoing large payloads are queued as they are, never re-copied.
"""

from __future__ import annotations

import os
from typing import Final

from meshlink.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from meshlink.proto import events as E
from meshlink.proto import frames as F
from meshlink.proto.state import Action, StreamState, next_state
from meshlink.proto.target import FlowTarget
from meshlink.proto.windows import FlowWindow

_COALESCE: Final = 64 * 1024
"""Payloads smaller than this are copied into one outgoing buffer with their neighbours
(few, full TLS records); larger ones are queued by reference."""

_HDR_UNPACK = F.HEADER.unpack_from
_HDR_PACK = F.HEADER.pack
_DATA: Final = int(F.FrameType.DATA)


class _Stream:
    __slots__ = ("accepted", "local", "state", "window")

    def __init__(self, window: FlowWindow, *, local: bool) -> None:
        self.state = StreamState.OPEN
        self.window = window
        self.local = local  # opened by us
        self.accepted = False


class Connection:
    """One end of a tunnel connection (see the module docstring).

    Over 300 lines because it is the whole wire protocol of one end, h11-style: the frame
    parser, the per-frame rules and every send method share the stream table and the
    connection's error state; frames, states and windows are already their own modules.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        max_frame: int = F.DEFAULT_MAX_FRAME,
        initial_window: int = F.DEFAULT_WINDOW,
        max_streams: int = F.DEFAULT_MAX_STREAMS,
        version: int = F.VERSION,
        instance: str = "",
        replicas: int = 1,
    ) -> None:
        if not F.MIN_FRAME_LIMIT <= max_frame <= F.MAX_FRAME_LIMIT:
            raise LocalProtocolError(f"max_frame {max_frame} is out of range")
        if not 1 <= initial_window <= 2**31 - 1:
            raise LocalProtocolError(f"initial_window {initial_window} is out of range")
        if not 1 <= max_streams <= F.NO_STREAM_LIMIT:
            raise LocalProtocolError(f"max_streams {max_streams} is out of range")
        problem = F.check_instance(instance, replicas)
        if problem is not None:
            raise LocalProtocolError(problem)
        self.initiator = initiator
        self.max_frame = max_frame
        self.initial_window = initial_window
        self.max_streams = max_streams
        """Streams the peer may have open at once (announced in our HELLO)."""
        self.peer_version: int | None = None
        self.peer_max_frame = F.MIN_FRAME_LIMIT
        self.peer_window = 0
        self.peer_max_streams = F.NO_STREAM_LIMIT
        self._opened_here = 0  # open streams opened by this side (against peer_max_streams)
        self._opened_there = 0  # open streams opened by the peer (against max_streams)
        self._streams: dict[int, _Stream] = {}
        self._next_local = 1 if initiator else 2
        self._last_remote = 0
        self._out: list[bytes | memoryview] = []
        self._small = bytearray()
        self._error: RemoteProtocolError | None = None
        self._goaway_sent = False
        self.goaway_received = False
        # parser state
        self._hbuf = bytearray()
        self._frame: tuple[int, int, int] | None = None  # (type, stream, length) being read
        self._pbuf = bytearray()
        self._data_left = 0
        self._data_stream = 0  # 0: the DATA being read is for a closed stream (dropped)
        self._queue(
            F.FrameType.HELLO,
            0,
            F.encode_hello(version, max_frame, initial_window, max_streams, instance, replicas),
        )

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """True once the peer's HELLO arrived: streams can be opened."""
        return self.peer_version is not None

    @property
    def closed(self) -> bool:
        return self._error is not None or self._goaway_sent or self.goaway_received

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open_stream(self) -> bool:
        """Whether open_stream would stay within the peer's stream limit."""
        return self._opened_here < self.peer_max_streams

    def stream_state(self, stream_id: int) -> StreamState:
        st = self._streams.get(stream_id)
        return st.state if st else StreamState.CLOSED

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (0 for a closed stream)."""
        st = self._streams.get(stream_id)
        return st.window.send_credit if st else 0

    # ------------------------------------------------------------------ output
    def _queue(self, ftype: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        n = len(payload)
        small = self._small
        small += _HDR_PACK(n, ftype, 0, stream_id)
        if n < _COALESCE:
            small += payload
        else:
            self._out.append(bytes(small))
            small.clear()
            self._out.append(payload)

    def data_to_send(self) -> list[bytes | memoryview]:
        """Buffers to write, in order, and forget them (write them with one writelines)."""
        out = self._out
        if self._small:
            out.append(bytes(self._small))
            self._small.clear()
        self._out = []
        return out

    def bytes_to_send(self) -> bytes:
        """Like data_to_send, joined into one bytes object."""
        return b"".join(self.data_to_send())

    # ------------------------------------------------------------------ API
    def _check_usable(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(f"the connection failed: {self._error}")
        if self._goaway_sent:
            raise LocalProtocolError("the connection is going away")
        if self.peer_version is None:
            raise LocalProtocolError("the peer's HELLO has not arrived yet")

    def _local_stream(self, stream_id: int, action: Action) -> _Stream:
        self._check_usable()
        st = self._streams.get(stream_id)
        if st is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        new = next_state(st.state, action)
        if new is None:
            raise LocalProtocolError(
                f"cannot {action.value} on stream {stream_id} in state {st.state.value}"
            )
        st.state = new
        if new is StreamState.CLOSED:
            self._forget(stream_id)
        return st

    def _forget(self, stream_id: int) -> _Stream | None:
        """Drop a closed stream, and its count against its opener's limit."""
        st = self._streams.pop(stream_id, None)
        if st is not None:
            if st.local:
                self._opened_here -= 1
            else:
                self._opened_there -= 1
        return st

    def open_stream(self, target: FlowTarget, *, hops: int = 0) -> int:
        """Open a stream to `target` (hops = relays already crossed); returns its id.

        Data may be sent at once; the peer answers ACCEPT or RST."""
        self._check_usable()
        payload = F.encode_open(target, hops)
        if self._opened_here >= self.peer_max_streams:
            raise LocalProtocolError(
                f"the peer allows {self.peer_max_streams} open streams on this link, "
                "and that many are open",
                ErrorCode.REFUSED_STREAM,
            )
        sid = self._next_local
        if sid > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids are exhausted on this connection; reconnect")
        self._next_local += 2
        self._streams[sid] = _Stream(
            FlowWindow(send_initial=self.peer_window, recv_initial=self.initial_window),
            local=True,
        )
        self._opened_here += 1
        self._queue(F.FrameType.OPEN, sid, payload)
        return sid

    def accept_stream(self, stream_id: int) -> None:
        """Tell the peer its stream reached the target."""
        self._check_usable()
        st = self._streams.get(stream_id)
        if st is None or st.local or st.accepted:
            raise LocalProtocolError(f"stream {stream_id} cannot be accepted")
        st.accepted = True
        self._queue(F.FrameType.ACCEPT, stream_id)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """Queue `data` (no more than `send_window(stream_id)` bytes) on the stream."""
        st = self._local_stream(stream_id, Action.SEND_DATA)
        n = len(data)
        st.window.spend(n)
        mf = self.peer_max_frame
        if n <= mf:
            self._queue(_DATA, stream_id, data)
            return
        view = memoryview(data)
        for off in range(0, n, mf):
            self._queue(_DATA, stream_id, view[off : off + mf])

    def send_eof(self, stream_id: int) -> None:
        """Half-close: we send no more data on this stream."""
        self._local_stream(stream_id, Action.SEND_FIN)
        self._queue(F.FrameType.FIN, stream_id)

    def reset_stream(
        self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL, text: str = ""
    ) -> None:
        """Abort the stream (with an optional short reason for the peer's logs and errors).
        Resetting a stream that is already closed does nothing."""
        st = self._forget(stream_id)
        if st is not None and self._error is None and not self._goaway_sent:
            self._queue(F.FrameType.RST, stream_id, F.encode_rst(code, text))

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """`n` bytes of the stream were consumed: grant the peer more credit (batched)."""
        st = self._streams.get(stream_id)
        if st is None or self._error is not None or self._goaway_sent:
            return  # credit for a closed stream is moot
        inc = st.window.consume(n)
        if inc and st.state in (StreamState.OPEN, StreamState.LOCAL_CLOSED):
            self._queue(F.FrameType.WINDOW, stream_id, F.encode_u32(inc))

    def send_control(self, payload: bytes) -> None:
        """Queue an opaque control message (at most MAX_CONTROL bytes)."""
        self._check_usable()
        if len(payload) > min(F.MAX_CONTROL, self.peer_max_frame):
            raise LocalProtocolError(
                f"control message of {len(payload)} bytes is larger than the peer accepts "
                f"({min(F.MAX_CONTROL, self.peer_max_frame)}); split it"
            )
        self._queue(F.FrameType.CONTROL, 0, bytes(payload))

    def ping(self, payload: bytes | None = None) -> bytes:
        """Queue a PING; returns its 8-byte payload (random unless given)."""
        self._check_usable()
        data = os.urandom(8) if payload is None else payload
        if len(data) != 8:
            raise LocalProtocolError("a PING payload is exactly 8 bytes")
        self._queue(F.FrameType.PING, 0, data)
        return data

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR, text: str = "") -> None:
        """Queue a GOAWAY; nothing more may be sent after it."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self._queue(F.FrameType.GOAWAY, 0, F.encode_goaway(code, text))

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[E.Event]:
        """Feed bytes read from the transport; returns what the peer did.

        Raises RemoteProtocolError (with a wire code) when the peer broke the protocol;
        a GOAWAY with that code is then queued, and the connection is finished."""
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)
        events: list[E.Event] = []
        try:
            self._parse(data, events)
        except RemoteProtocolError as exc:
            self._error = exc
            if not self._goaway_sent:
                self._goaway_sent = True
                self._queue(F.FrameType.GOAWAY, 0, F.encode_goaway(exc.code, str(exc)))
            raise
        return events

    def _parse(self, data: bytes, events: list[E.Event]) -> None:
        view = memoryview(data)
        pos = 0
        end = len(data)
        while pos < end:
            left = self._data_left
            if left:  # inside a DATA payload: hand it out as it arrives
                take = min(left, end - pos)
                if self._data_stream:
                    events.append(E.DataReceived(self._data_stream, view[pos : pos + take]))
                pos += take
                self._data_left = left - take
                continue
            frm = self._frame
            if frm is None:  # reading a header
                hbuf = self._hbuf
                if not hbuf and end - pos >= F.HEADER_SIZE:
                    length, ftype, _flags, sid = _HDR_UNPACK(data, pos)
                    pos += F.HEADER_SIZE
                else:
                    take = min(F.HEADER_SIZE - len(hbuf), end - pos)
                    hbuf += view[pos : pos + take]
                    pos += take
                    if len(hbuf) < F.HEADER_SIZE:
                        return
                    length, ftype, _flags, sid = _HDR_UNPACK(hbuf)
                    hbuf.clear()
                if length > self.max_frame:
                    raise RemoteProtocolError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}",
                        ErrorCode.FRAME_SIZE_ERROR,
                    )
                if self.peer_version is None and ftype != F.FrameType.HELLO:
                    raise RemoteProtocolError("the peer did not start with HELLO")
                if ftype == _DATA:
                    self._start_data(sid, length)
                    continue
                if length == 0:
                    self._handle(ftype, sid, b"", events)
                    continue
                self._frame = (ftype, sid, length)
                continue
            ftype, sid, length = frm
            pbuf = self._pbuf
            if not pbuf and end - pos >= length:
                payload = data[pos : pos + length]
                pos += length
            else:
                take = min(length - len(pbuf), end - pos)
                pbuf += view[pos : pos + take]
                pos += take
                if len(pbuf) < length:
                    return
                payload = bytes(pbuf)
                pbuf.clear()
            self._frame = None
            self._handle(ftype, sid, payload, events)

    def _start_data(self, sid: int, length: int) -> None:
        st = self._remote_stream(sid, Action.RECV_DATA)
        if st is None:
            self._data_stream = 0
        else:
            st.window.receive(length)
            self._data_stream = sid
        self._data_left = length

    def _remote_stream(self, sid: int, action: Action) -> _Stream | None:
        """The stream a frame of the peer's is for (None: closed, drop the frame)."""
        st = self._streams.get(sid)
        if st is None:
            if sid == 0:
                raise RemoteProtocolError("stream frame on stream 0")
            mine = (sid % 2 == 1) == self.initiator
            if (mine and sid >= self._next_local) or (not mine and sid > self._last_remote):
                raise RemoteProtocolError(f"frame for stream {sid}, which was never opened")
            return None
        new = next_state(st.state, action)
        if new is None:
            raise RemoteProtocolError(
                f"peer may not {action.value} on stream {sid} in state {st.state.value}",
                ErrorCode.STREAM_CLOSED,
            )
        st.state = new
        if new is StreamState.CLOSED:
            self._forget(sid)
        return st

    def _handle(self, ftype: int, sid: int, payload: bytes, events: list[E.Event]) -> None:
        T = F.FrameType
        if self.peer_version is None:  # _parse let only a HELLO through
            if sid != 0:
                raise RemoteProtocolError(f"HELLO frame on stream {sid}")
            hello = F.decode_hello(payload)
            version, max_frame, window = hello.version, hello.max_frame, hello.initial_window
            max_streams = hello.max_streams
            if version not in F.SUPPORTED_VERSIONS:
                raise RemoteProtocolError(
                    f"peer speaks tunnel protocol version {version}; this side speaks "
                    f"{', '.join(map(str, sorted(F.SUPPORTED_VERSIONS)))}",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            F.check_hello_limits(max_frame, window, max_streams)
            self.peer_version = version
            self.peer_max_frame = max_frame
            self.peer_window = window
            self.peer_max_streams = max_streams
            events.append(
                E.HelloReceived(
                    version, max_frame, window, max_streams, hello.instance, hello.replicas
                )
            )
            return
        if ftype in F.CONNECTION_FRAMES:
            if sid != 0:
                raise RemoteProtocolError(f"{T(ftype).name} frame on stream {sid}")
        elif sid == 0 and ftype <= T.GOAWAY:
            raise RemoteProtocolError(f"{T(ftype).name} frame on stream 0")
        if ftype == T.OPEN:
            self._on_open(sid, payload, events)
        elif ftype == T.DATA:  # only an empty DATA frame gets here
            self._remote_stream(sid, Action.RECV_DATA)
        elif ftype == T.FIN:
            if payload:
                raise RemoteProtocolError("FIN frame with a payload", ErrorCode.FRAME_SIZE_ERROR)
            if self._remote_stream(sid, Action.RECV_FIN) is not None:
                events.append(E.StreamEnded(sid))
        elif ftype == T.RST:
            code, text = F.decode_rst(payload)
            if self._remote_stream(sid, Action.RECV_RST) is not None:
                events.append(E.StreamReset(sid, code, text))
        elif ftype == T.WINDOW:
            inc = F.decode_u32(payload, "WINDOW")
            st = self._streams.get(sid)
            if st is None:
                self._remote_stream(sid, Action.RECV_DATA)  # raises for never-opened ids
                return
            st.window.grant(inc)
            events.append(E.WindowUpdated(sid, inc))
        elif ftype == T.ACCEPT:
            if payload:
                raise RemoteProtocolError("ACCEPT frame with a payload", ErrorCode.FRAME_SIZE_ERROR)
            st = self._streams.get(sid)
            if st is None:
                self._remote_stream(sid, Action.RECV_DATA)
                return
            if not st.local or st.accepted:
                raise RemoteProtocolError(f"unexpected ACCEPT for stream {sid}")
            st.accepted = True
            events.append(E.StreamAccepted(sid))
        elif ftype == T.PING:
            if len(payload) != 8:
                raise RemoteProtocolError(
                    "PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR
                )
            if not self._goaway_sent:
                self._queue(T.PONG, 0, payload)
            events.append(E.PingReceived(payload))
        elif ftype == T.PONG:
            if len(payload) != 8:
                raise RemoteProtocolError(
                    "PONG payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR
                )
            events.append(E.PongReceived(payload))
        elif ftype == T.CONTROL:
            events.append(E.ControlReceived(payload))
        elif ftype == T.GOAWAY:
            code, text = F.decode_goaway(payload)
            self.goaway_received = True
            events.append(E.GoAwayReceived(code, text))
        elif ftype == T.HELLO:
            raise RemoteProtocolError("second HELLO")
        else:
            raise RemoteProtocolError(f"unknown frame type {ftype}")

    def _on_open(self, sid: int, payload: bytes, events: list[E.Event]) -> None:
        if (sid % 2 == 1) == self.initiator:
            raise RemoteProtocolError(f"peer opened stream {sid}, an id of this side's parity")
        if sid <= self._last_remote:
            raise RemoteProtocolError(f"peer reused or lowered stream id {sid}")
        target, hops = F.decode_open(payload)
        self._last_remote = sid
        if self._goaway_sent or self._opened_there >= self.max_streams:
            self._queue(
                F.FrameType.RST,
                sid,
                F.encode_rst(
                    ErrorCode.REFUSED_STREAM,
                    "going away"
                    if self._goaway_sent
                    else f"more than {self.max_streams} open streams on this link",
                ),
            )
            return
        self._streams[sid] = _Stream(
            FlowWindow(send_initial=self.peer_window, recv_initial=self.initial_window),
            local=False,
        )
        self._opened_there += 1
        events.append(E.StreamOpened(sid, target, hops))
