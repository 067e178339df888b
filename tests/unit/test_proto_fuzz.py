"""Hypothesis: random chunking gives the same stream contents, junk only ever raises
RemoteProtocolError, flow-control accounting holds under random operations."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlink.errors import RemoteProtocolError
from meshlink.proto import (
    Connection,
    ControlReceived,
    DataReceived,
    Event,
    FlowTarget,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

TARGET = FlowTarget(site="b", namespace="ns", name="svc", port=443)


def normalise(events: list[Event]) -> list[object]:
    """Events with consecutive DATA of one stream merged (DATA may arrive in pieces)."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, DataReceived):
            if out and isinstance(out[-1], tuple) and out[-1][0] == ev.stream_id:
                out[-1] = (ev.stream_id, out[-1][1] + bytes(ev.data))
            else:
                out.append((ev.stream_id, bytes(ev.data)))
        else:
            out.append(ev)
    return out


def chunked(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    return [wire[i:j] for i, j in itertools.pairwise(points)]


def scripted_wire() -> bytes:
    a = Connection(initiator=True, max_frame=16384)
    b = Connection(initiator=False)
    hello = a.bytes_to_send()
    b.receive_data(hello)
    a.receive_data(b.bytes_to_send())
    s1 = a.open_stream(TARGET)
    a.send_data(s1, bytes(range(256)) * 200)
    s2 = a.open_stream(TARGET, hops=3)
    a.send_data(s2, b"small")
    a.send_eof(s2)
    a.send_control(b"catalog" * 10)
    a.ping(b"pingpong")
    a.reset_stream(s1)
    return hello + a.bytes_to_send()


WIRE = scripted_wire()


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=40))
def test_random_chunking_gives_the_same_events(cuts: list[int]) -> None:
    whole = Connection(initiator=False)
    expected = normalise(whole.receive_data(WIRE))
    pieces = Connection(initiator=False)
    got: list[Event] = []
    for chunk in chunked(WIRE, cuts):
        got.extend(pieces.receive_data(chunk))
    assert normalise(got) == expected
    kinds = [type(e) for e in expected if not isinstance(e, tuple)]
    assert StreamOpened in kinds
    assert StreamEnded in kinds
    assert StreamReset in kinds
    assert ControlReceived in kinds


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=300), prefix=st.booleans())
def test_random_bytes_only_raise_remote_protocol_error(junk: bytes, prefix: bool) -> None:
    b = Connection(initiator=False)
    data = (WIRE[:28] + junk) if prefix else junk
    with contextlib.suppress(RemoteProtocolError):
        b.receive_data(data)


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(WIRE) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    cut=st.integers(min_value=0, max_value=len(WIRE)),
)
def test_mutated_frames_only_raise_remote_protocol_error(
    flips: list[tuple[int, int]], cut: int
) -> None:
    wire = bytearray(WIRE)
    for pos, value in flips:
        wire[pos] = value
    b = Connection(initiator=False)
    try:
        b.receive_data(bytes(wire[:cut]))
        b.receive_data(bytes(wire[cut:]))
    except RemoteProtocolError:
        return
    b.bytes_to_send()


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(min_value=1, max_value=40000)),
            st.tuples(st.just("ack"), st.integers(min_value=1, max_value=40000)),
        ),
        max_size=60,
    )
)
def test_flow_control_accounting(ops: list[tuple[str, int]]) -> None:
    """The receiver never holds more than its window; credit returns as it consumes."""
    window = 65536
    a = Connection(initiator=True, initial_window=window)
    b = Connection(initiator=False, initial_window=window)
    b.receive_data(a.bytes_to_send())
    a.receive_data(b.bytes_to_send())
    sid = a.open_stream(TARGET)
    sent = received = consumed = 0
    for op, n in ops:
        if op == "send":
            k = min(n, a.send_window(sid))
            if k:
                a.send_data(sid, b"d" * k)
                sent += k
            for ev in b.receive_data(a.bytes_to_send()):
                if isinstance(ev, DataReceived):
                    received += len(ev.data)
        else:
            k = min(n, received - consumed)
            if k:
                b.acknowledge_received(sid, k)
                consumed += k
            for ev in a.receive_data(b.bytes_to_send()):
                assert isinstance(ev, WindowUpdated)
        assert received == sent
        assert received - consumed <= window  # bounded buffering at the receiver
        assert a.send_window(sid) <= window
        assert a.send_window(sid) >= window - (sent - consumed) - window // 4


def test_ping_payload_is_echoed_under_chunking() -> None:
    a = Connection(initiator=True)
    b = Connection(initiator=False)
    b.receive_data(a.bytes_to_send())
    a.receive_data(b.bytes_to_send())
    token = a.ping()
    b.receive_data(a.bytes_to_send())
    pong = b.bytes_to_send()
    evs: list[Event] = []
    for i in range(len(pong)):
        evs.extend(a.receive_data(pong[i : i + 1]))
    assert evs == [PongReceived(token)]
