"""The sans-IO tunnel protocol: two Connections joined in memory, no sockets."""

from __future__ import annotations

import struct

import pytest

from meshlink.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from meshlink.proto import Connection, FlowTarget, StreamState
from meshlink.proto import events as E
from meshlink.proto import frames as F

TARGET = FlowTarget(site="site-a", namespace="default", name="web", port=80)


def pump(src: Connection, dst: Connection) -> list[E.Event]:
    return dst.receive_data(src.bytes_to_send())


def pair(**kw: int) -> tuple[Connection, Connection]:
    a = Connection(initiator=True, **kw)
    b = Connection(initiator=False, **kw)
    assert isinstance(pump(a, b)[0], E.HelloReceived)
    assert isinstance(pump(b, a)[0], E.HelloReceived)
    return a, b


def data_of(events: list[E.Event], sid: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, E.DataReceived) and e.stream_id == sid
    )


def test_hello_exchange_reports_peer_limits() -> None:
    a = Connection(initiator=True, max_frame=32768, initial_window=5000, max_streams=7)
    b = Connection(initiator=False)
    (ev,) = pump(a, b)
    assert ev == E.HelloReceived(version=1, max_frame=32768, initial_window=5000, max_streams=7)
    assert b.peer_max_streams == 7
    assert b.ready
    assert not a.ready
    pump(b, a)
    assert a.ready


def test_stream_open_accept_data_both_ways_and_half_close() -> None:
    a, b = pair()
    sid = a.open_stream(TARGET, hops=2)
    assert sid % 2 == 1
    a.send_data(sid, b"hello")
    evs = pump(a, b)
    assert evs[0] == E.StreamOpened(sid, TARGET, 2)
    assert data_of(evs, sid) == b"hello"
    b.accept_stream(sid)
    b.send_data(sid, b"world")
    b.send_eof(sid)
    evs = pump(b, a)
    assert evs[0] == E.StreamAccepted(sid)
    assert data_of(evs, sid) == b"world"
    assert evs[-1] == E.StreamEnded(sid)
    assert a.stream_state(sid) is StreamState.REMOTE_CLOSED
    # a may still send after b's FIN (half-close), then closes its side
    a.send_data(sid, b"more")
    a.send_eof(sid)
    evs = pump(a, b)
    assert data_of(evs, sid) == b"more"
    assert evs[-1] == E.StreamEnded(sid)
    assert a.open_streams == 0
    assert b.open_streams == 0
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"x")


def test_both_sides_open_with_distinct_parity() -> None:
    a, b = pair()
    s1 = a.open_stream(TARGET)
    s2 = b.open_stream(TARGET)
    s3 = a.open_stream(TARGET)
    assert (s1 % 2, s2 % 2, s3 % 2) == (1, 0, 1)
    assert s3 > s1
    assert [e.stream_id for e in pump(a, b) if isinstance(e, E.StreamOpened)] == [s1, s3]
    assert [e.stream_id for e in pump(b, a) if isinstance(e, E.StreamOpened)] == [s2]


def test_send_after_fin_and_data_after_peer_fin_are_errors() -> None:
    a, b = pair()
    sid = a.open_stream(TARGET)
    a.send_eof(sid)
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"x")
    pump(a, b)
    # a misbehaving peer that sends DATA after its FIN
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_data(F.frame(F.FrameType.DATA, sid, b"late"))
    assert err.value.code == ErrorCode.STREAM_CLOSED


def test_reset_both_ways_and_late_frames_are_ignored() -> None:
    a, b = pair()
    sid = a.open_stream(TARGET)
    pump(a, b)
    b.reset_stream(sid, ErrorCode.NO_ROUTE)
    assert b.open_streams == 0
    # data a sent before seeing the reset is ignored by b, not an error
    a.send_data(sid, b"in flight")
    in_flight = a.bytes_to_send()
    assert pump(b, a) == [E.StreamReset(sid, ErrorCode.NO_ROUTE)]
    assert b.receive_data(in_flight) == []
    assert a.open_streams == 0
    a.reset_stream(sid)  # resetting a closed stream is a no-op
    assert a.bytes_to_send() == b""
    # and the other direction
    s2 = b.open_stream(TARGET)
    pump(b, a)
    a.reset_stream(s2, ErrorCode.CONNECT_ERROR, "connection refused")
    assert pump(a, b) == [E.StreamReset(s2, ErrorCode.CONNECT_ERROR, "connection refused")]


def test_flow_control_credit_is_never_exceeded() -> None:
    a, b = pair(initial_window=16384)
    sid = a.open_stream(TARGET)
    assert a.send_window(sid) == 16384
    a.send_data(sid, b"x" * 16384)
    assert a.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"y")
    evs = pump(a, b)
    got = sum(len(e.data) for e in evs if isinstance(e, E.DataReceived))
    assert got == 16384
    b.acknowledge_received(sid, 1000)  # the sender is stalled: credit goes back at once
    assert pump(b, a) == [E.WindowUpdated(sid, 1000)]
    assert a.send_window(sid) == 1000
    with pytest.raises(LocalProtocolError):
        b.acknowledge_received(sid, 20000)  # more than was ever received


def test_window_updates_are_batched_to_a_quarter_window() -> None:
    a, b = pair(initial_window=16384)
    sid = a.open_stream(TARGET)
    a.send_data(sid, b"x" * 8000)
    pump(a, b)
    b.acknowledge_received(sid, 1000)  # below a quarter window: no WINDOW yet
    assert b.bytes_to_send() == b""
    b.acknowledge_received(sid, 4000)
    assert pump(b, a) == [E.WindowUpdated(sid, 5000)]
    assert a.send_window(sid) == 16384 - 8000 + 5000


def test_peer_exceeding_credit_is_a_flow_control_error() -> None:
    a, b = pair(initial_window=16384)
    sid = a.open_stream(TARGET)
    pump(a, b)
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_data(F.frame(F.FrameType.DATA, sid, b"z" * 16385))
    assert err.value.code == ErrorCode.FLOW_CONTROL_ERROR
    # the connection queued a GOAWAY with the code and stays failed
    evs = a.receive_data(b.bytes_to_send())
    assert isinstance(evs[-1], E.GoAwayReceived)
    assert evs[-1].code == ErrorCode.FLOW_CONTROL_ERROR
    with pytest.raises(RemoteProtocolError):
        b.receive_data(b"")


def test_window_overflow_is_a_flow_control_error() -> None:
    a, b = pair()
    sid = a.open_stream(TARGET)
    pump(a, b)
    with pytest.raises(RemoteProtocolError) as err:
        a.receive_data(F.frame(F.FrameType.WINDOW, sid, struct.pack("!I", 2**31 - 1)))
    assert err.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_large_data_is_split_to_the_peer_frame_limit() -> None:
    a, b = pair(max_frame=16384, initial_window=1 << 20)
    sid = a.open_stream(TARGET)
    payload = bytes(range(256)) * 400  # 102400 bytes
    a.send_data(sid, payload)
    wire = a.bytes_to_send()
    assert data_of(b.receive_data(wire), sid) == payload
    # every frame on the wire respects the limit
    pos = 0
    while pos < len(wire):
        length, _t, _f, _s = F.HEADER.unpack_from(wire, pos)
        assert length <= 16384
        pos += F.HEADER_SIZE + length


def test_ping_pong_echoes_payload() -> None:
    a, b = pair()
    token = a.ping()
    assert len(token) == 8
    assert pump(a, b) == [E.PingReceived(token)]
    assert pump(b, a) == [E.PongReceived(token)]
    assert a.ping(b"12345678") == b"12345678"
    with pytest.raises(LocalProtocolError):
        a.ping(b"short")


def test_control_messages_and_size_bound() -> None:
    a, b = pair()
    a.send_control(b'{"snapshot": []}')
    assert pump(a, b) == [E.ControlReceived(b'{"snapshot": []}')]
    with pytest.raises(LocalProtocolError):
        a.send_control(b"x" * (F.MAX_CONTROL + 1))


def test_goaway_and_no_streams_after_it() -> None:
    a, b = pair()
    a.go_away(ErrorCode.NOT_AUTHORIZED, "site x is not linked")
    assert pump(a, b) == [E.GoAwayReceived(ErrorCode.NOT_AUTHORIZED, "site x is not linked")]
    assert a.closed
    assert b.closed
    with pytest.raises(LocalProtocolError):
        a.open_stream(TARGET)


def test_unsupported_version_answers_goaway() -> None:
    future = Connection(initiator=True, version=7)
    b = Connection(initiator=False)
    with pytest.raises(RemoteProtocolError) as err:
        pump(future, b)
    assert err.value.code == ErrorCode.UNSUPPORTED_VERSION
    evs = future.receive_data(b.bytes_to_send())
    assert evs[0] == E.HelloReceived(
        1, F.DEFAULT_MAX_FRAME, F.DEFAULT_WINDOW, F.DEFAULT_MAX_STREAMS
    )
    assert isinstance(evs[1], E.GoAwayReceived)
    assert evs[1].code == ErrorCode.UNSUPPORTED_VERSION
    assert "speaks 1" in evs[1].text


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.FRAME_SIZE_ERROR),  # not meshlink at all
        (F.frame(F.FrameType.PING, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),  # no HELLO
        (F.frame(F.FrameType.HELLO, 0, b"NOTMESHL" + b"\0" * 10), ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_bad_first_frame(wire: bytes, code: ErrorCode) -> None:
    b = Connection(initiator=False)
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_data(wire)
    assert err.value.code == code


def _hello() -> bytes:
    return F.frame(F.FrameType.HELLO, 0, F.encode_hello(1, F.DEFAULT_MAX_FRAME, 65536))


@pytest.mark.parametrize(
    "frame",
    [
        F.frame(F.FrameType.OPEN, 1, b"\x00\x03TCP"),  # truncated target
        F.frame(F.FrameType.OPEN, 2, F.encode_open(TARGET, 0)),  # wrong parity
        F.frame(F.FrameType.OPEN, 1, bytes([9]) + F.encode_open(TARGET, 0)[1:]),  # 9 hops
        F.frame(F.FrameType.DATA, 5, b"x"),  # never opened
        F.frame(F.FrameType.WINDOW, 0, b"\0\0\0\1"),  # stream frame on stream 0
        F.frame(F.FrameType.PING, 3, b"12345678"),  # connection frame on a stream
        F.frame(F.FrameType.PING, 0, b"1234"),  # wrong size
        F.frame(F.FrameType.HELLO, 0, F.encode_hello(1, 1 << 20, 1000)),  # second HELLO
        F.frame(99, 0, b""),  # unknown type
        F.HEADER.pack(F.MAX_FRAME_LIMIT + 1, 3, 0, 1),  # oversized
    ],
)
def test_malformed_frames_raise_remote_protocol_error(frame: bytes) -> None:
    b = Connection(initiator=False)
    b.receive_data(_hello())
    with pytest.raises(RemoteProtocolError):
        b.receive_data(frame)


def _v1_hello_without_limit() -> bytes:
    """A HELLO as sent before max_streams was added (18 bytes: no stream limit)."""
    return F.frame(F.FrameType.HELLO, 0, F.HELLO_BODY.pack(F.MAGIC, 1, F.DEFAULT_MAX_FRAME, 65536))


def test_stream_limit_refuses_with_rst() -> None:
    """A peer that ignores our announced limit gets RST(REFUSED_STREAM) for the excess."""
    a = Connection(initiator=True)
    b = Connection(initiator=False, max_streams=1)
    a.receive_data(_v1_hello_without_limit())  # a believes b has no limit
    b.receive_data(a.bytes_to_send())
    b.bytes_to_send()
    s1 = a.open_stream(TARGET)
    s2 = a.open_stream(TARGET)
    a.send_data(s2, b"optimistic")
    evs = pump(a, b)
    assert [e for e in evs if isinstance(e, E.StreamOpened)] == [E.StreamOpened(s1, TARGET, 0)]
    assert data_of(evs, s2) == b""
    assert pump(b, a) == [
        E.StreamReset(s2, ErrorCode.REFUSED_STREAM, "more than 1 open streams on this link")
    ]
    assert b.open_streams == 1


def test_stream_limit_is_announced_and_kept_by_the_opener() -> None:
    a = Connection(initiator=True)
    b = Connection(initiator=False, max_streams=2)
    pump(a, b)
    pump(b, a)
    assert a.peer_max_streams == 2
    s1 = a.open_stream(TARGET)
    s2 = a.open_stream(TARGET)
    assert not a.can_open_stream
    with pytest.raises(LocalProtocolError) as err:
        a.open_stream(TARGET)
    assert err.value.code == ErrorCode.REFUSED_STREAM
    evs = pump(a, b)
    assert [e.stream_id for e in evs if isinstance(e, E.StreamOpened)] == [s1, s2]
    # A reset frees its slot at once; a half-closed stream holds it until both FINs.
    a.reset_stream(s1)
    assert a.can_open_stream
    s3 = a.open_stream(TARGET)
    a.send_eof(s2)
    assert not a.can_open_stream
    evs = pump(a, b)
    assert E.StreamOpened(s3, TARGET, 0) in evs  # b forgot s1 before s3's OPEN arrived
    b.send_eof(s2)
    pump(b, a)
    assert a.stream_state(s2) is StreamState.CLOSED
    assert a.can_open_stream
    s4 = a.open_stream(TARGET)
    assert E.StreamOpened(s4, TARGET, 0) in pump(a, b)
    assert b.open_streams == 2


def test_hello_without_a_stream_limit_means_none() -> None:
    a = Connection(initiator=True)
    (ev,) = a.receive_data(_v1_hello_without_limit())
    assert isinstance(ev, E.HelloReceived)
    assert a.peer_max_streams == F.NO_STREAM_LIMIT


@pytest.mark.parametrize("sid", [7, 2, 1])
def test_hello_on_a_stream_is_a_protocol_error(sid: int) -> None:
    b = Connection(initiator=False)
    hello = F.frame(F.FrameType.HELLO, sid, F.encode_hello(1, F.DEFAULT_MAX_FRAME, 65536))
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_data(hello)
    assert err.value.code == ErrorCode.PROTOCOL_ERROR
    assert "HELLO frame on stream" in str(err.value)
    assert not b.ready
    # The GOAWAY queued for the peer carries the code.
    out = b.bytes_to_send()
    peer = Connection(initiator=True)
    evs = peer.receive_data(out)
    assert isinstance(evs[-1], E.GoAwayReceived)
    assert evs[-1].code == ErrorCode.PROTOCOL_ERROR


def test_hello_announcing_no_stream_at_all_is_refused() -> None:
    b = Connection(initiator=False)
    with pytest.raises(RemoteProtocolError):
        b.receive_data(F.frame(F.FrameType.HELLO, 0, F.encode_hello(1, 1 << 20, 1000, 0)))


def test_hello_names_the_instance_and_how_many_its_site_runs() -> None:
    a = Connection(initiator=True, instance="meshlink-7d9f-abcde", replicas=2)
    b = Connection(initiator=False)
    (ev,) = pump(a, b)
    assert isinstance(ev, E.HelloReceived)
    assert (ev.instance, ev.replicas) == ("meshlink-7d9f-abcde", 2)
    (ev,) = pump(b, a)
    assert isinstance(ev, E.HelloReceived)
    assert (ev.instance, ev.replicas) == ("", 1)  # named by no one: "" and one replica


@pytest.mark.parametrize(
    "hello",
    [
        _v1_hello_without_limit(),  # before max_streams
        F.frame(  # before the instance fields
            F.FrameType.HELLO,
            0,
            F.HELLO_BODY.pack(F.MAGIC, 1, F.DEFAULT_MAX_FRAME, 65536) + F.HELLO_STREAMS.pack(9),
        ),
    ],
)
def test_a_hello_of_an_older_peer_is_instance_empty_and_one_replica(hello: bytes) -> None:
    (ev,) = Connection(initiator=True).receive_data(hello)
    assert isinstance(ev, E.HelloReceived)
    assert (ev.instance, ev.replicas) == ("", 1)


def test_hello_fields_round_trip_and_later_bytes_are_ignored() -> None:
    raw = F.encode_hello(1, F.DEFAULT_MAX_FRAME, 65536, 7, "pod-1.x_Y", 1024) + b"later"
    assert F.decode_hello(raw) == F.Hello(1, F.DEFAULT_MAX_FRAME, 65536, 7, "pod-1.x_Y", 1024)


def _body_with(instance: bytes, replicas: int) -> bytes:
    head = F.HELLO_BODY.pack(F.MAGIC, 1, F.DEFAULT_MAX_FRAME, 65536) + F.HELLO_STREAMS.pack(9)
    return head + bytes([len(instance)]) + instance + F.HELLO_REPLICAS.pack(replicas)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_body_with(b"evil\x1b[31m\nname", 1), "instance id 'evil\\x1b[31m\\nname' is not"),
        (_body_with("p\u00e9".encode("latin-1"), 1), "instance id 'p\\xe9' is not"),
        (_body_with(b"x" * 254, 1), "is not 0-253"),
        (_body_with(b"pod", 0), "replicas 0 is outside 1..1024"),
        (_body_with(b"pod", 1025), "replicas 1025 is outside"),
        (_body_with(b"pod", 2)[:-1], "HELLO instance fields are cut short"),
        (_body_with(b"pod", 2)[:-5], "HELLO instance fields are cut short"),
    ],
)
def test_a_bad_instance_in_a_hello_is_a_protocol_error_named_safely(
    payload: bytes, why: str
) -> None:
    b = Connection(initiator=False)
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_data(F.frame(F.FrameType.HELLO, 0, payload))
    assert err.value.code == ErrorCode.PROTOCOL_ERROR
    assert why in str(err.value)
    assert str(err.value).isprintable()  # escaped: safe to log


@pytest.mark.parametrize(("instance", "replicas"), [("bad name", 1), ("pod", 0), ("x" * 254, 1)])
def test_a_bad_own_instance_is_a_local_error(instance: str, replicas: int) -> None:
    with pytest.raises(LocalProtocolError):
        Connection(initiator=True, instance=instance, replicas=replicas)


def test_api_misuse_is_local_protocol_error() -> None:
    a = Connection(initiator=True)
    with pytest.raises(LocalProtocolError):
        a.open_stream(TARGET)  # before the peer's HELLO
    a, _b = pair()
    with pytest.raises(LocalProtocolError):
        a.open_stream(FlowTarget("s", "ns", "n", 0))
    with pytest.raises(LocalProtocolError):
        a.open_stream(TARGET, hops=9)
    sid = a.open_stream(TARGET)
    with pytest.raises(LocalProtocolError):
        a.accept_stream(sid)  # only the receiver of OPEN accepts
    with pytest.raises(LocalProtocolError):
        Connection(initiator=True, max_frame=10)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (FlowTarget("", "ns", "n", 80), "site is empty"),
        (FlowTarget("s", "x" * 254, "n", 80), "namespace is longer than 253 bytes"),
        (FlowTarget("s", "ns", "n", 0), "port 0 is not in 1..65535"),
        (FlowTarget("s", "ns", "n", 80, "HTTP"), "protocol 'HTTP' is not one of"),
    ],
)
def test_a_target_says_what_keeps_it_off_the_wire(target: FlowTarget, why: str) -> None:
    assert why in (target.problem() or "")
    assert FlowTarget("s", "ns", "n", 80).problem() is None
    assert str(FlowTarget("s", "ns", "n", 80)) == "n.ns@s:80/TCP"


@pytest.mark.parametrize(
    ("decode", "why"),
    [
        (lambda: F.check_hello_limits(1, 65536), "HELLO max_frame 1 is outside"),
        (lambda: F.check_hello_limits(F.DEFAULT_MAX_FRAME, 0), "initial_window 0 is out of"),
        (lambda: F.decode_open(F.encode_open(TARGET, 0) + b"x"), "wrong length"),
        (lambda: F.decode_code(b"\x00\x00", "RST"), "RST frame is too short"),
        (lambda: F.decode_u32(b"\x00\x00\x00", "WINDOW"), "WINDOW frame must carry 4 bytes"),
        (lambda: F.decode_rst(b"\x00\x00\x00\x08" + b"x" * 300), "RST reason is too long"),
    ],
)
def test_malformed_frame_payloads_are_remote_errors(decode: object, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        decode()  # type: ignore[operator]


def test_a_code_from_a_later_version_reads_as_internal_error() -> None:
    assert F.decode_code(b"\x00\x00\xff\xff", "RST") is ErrorCode.INTERNAL_ERROR


T = F.FrameType


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (F.frame(T.FIN, 1, b"x"), "FIN frame with a payload"),
        (F.frame(T.ACCEPT, 2, b"x"), "ACCEPT frame with a payload"),
        (F.frame(T.ACCEPT, 1, b""), "unexpected ACCEPT for stream 1"),  # b did not open 1
        (F.frame(T.ACCEPT, 4, b""), "stream 4, which was never opened"),
        (F.frame(T.WINDOW, 9, F.encode_u32(5)), "stream 9, which was never opened"),
        (F.frame(T.DATA, 9, b""), "stream 9, which was never opened"),
        (F.frame(T.PONG, 0, b"short"), "PONG payload must be 8 bytes"),
        (F.frame(T.WINDOW, 1, F.encode_u32(0)), "WINDOW increment must be positive"),
    ],
)
def test_frames_that_break_the_protocol_fail_the_connection(frame: bytes, why: str) -> None:
    a, b = pair()
    sid = a.open_stream(TARGET)
    pump(a, b)  # b now has stream 1, opened by a
    assert sid == 1
    with pytest.raises(RemoteProtocolError, match=why):
        b.receive_data(bytearray(frame))  # any bytes-like input
    with pytest.raises(RemoteProtocolError, match=why):
        b.receive_data(b"")  # the error stays
    with pytest.raises(LocalProtocolError, match="the connection failed"):
        b.send_control(b"x")


def test_frames_for_a_stream_already_closed_are_dropped() -> None:
    a, b = pair()
    sid = a.open_stream(TARGET)
    pump(a, b)
    b.reset_stream(sid)
    pump(b, a)
    assert b.receive_data(F.frame(T.WINDOW, sid, F.encode_u32(5))) == []
    assert b.receive_data(F.frame(T.ACCEPT, sid, b"")) == []


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"initial_window": 0}, "initial_window 0 is out of range"),
        ({"max_streams": 0}, "max_streams 0 is out of range"),
    ],
)
def test_a_connection_with_impossible_limits_is_refused(kw: dict[str, int], why: str) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        Connection(initiator=True, **kw)
