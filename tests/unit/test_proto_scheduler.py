"""The stream scheduler (sans-IO): two Connections in memory, one scheduling the streams
of one side. Random sends, stalls of the link, and acknowledgements by the receiver; every
stream's bytes arrive whole, in order, once, with the end of stream after them; a source
is told to pause once per parking and to resume once it drained; the round robin lets a
small stream through after at most a quantum of each bulk one."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlink.proto import (
    EOF_SENT,
    RESUMED,
    Connection,
    DataReceived,
    FlowTarget,
    HelloReceived,
    Outbox,
    StreamEnded,
    StreamOpened,
    StreamScheduler,
    WindowUpdated,
)

TARGET = FlowTarget("b", "ns", "svc", 80)


@dataclass
class Side:
    """The receiving side's view of one stream."""

    got: bytearray = field(default_factory=bytearray)
    eof: bool = False
    unacked: int = 0


class Harness:
    """A's streams scheduled towards B; B acknowledges when told to."""

    def __init__(self, streams: int, window: int, quantum: int, budget: int) -> None:
        self.a = Connection(initiator=True, initial_window=window, max_frame=16384)
        self.b = Connection(initiator=False, initial_window=window, max_frame=16384)
        assert isinstance(self.b.receive_data(self.a.bytes_to_send())[0], HelloReceived)
        assert isinstance(self.a.receive_data(self.b.bytes_to_send())[0], HelloReceived)
        self.sched = StreamScheduler(self.a, quantum=quantum, round_budget=budget)
        self.boxes: list[Outbox] = []
        self.sent: list[bytearray] = []
        self.paused: list[bool] = []
        self.eof_asked: list[bool] = []
        self.eof_sent: list[bool] = []
        self.side: dict[int, Side] = {}
        for _ in range(streams):
            sid = self.a.open_stream(TARGET)
            box = self.sched.open(sid)
            self.sched.start(box)
            self.boxes.append(box)
            self.sent.append(bytearray())
            self.paused.append(False)
            self.eof_asked.append(False)
            self.eof_sent.append(False)
        for ev in self.b.receive_data(self.a.bytes_to_send()):
            assert isinstance(ev, StreamOpened)
            self.side[ev.stream_id] = Side()
            self.b.accept_stream(ev.stream_id)
        self.a.receive_data(self.b.bytes_to_send())
        self.order: list[int] = []
        """Stream ids in the order their DATA reached B (frame by frame)."""

    def index(self, box: Outbox) -> int:
        return self.boxes.index(box)

    def report(self, i: int, flags: int) -> None:
        if flags & RESUMED:
            assert self.paused[i], "resumed a source that was not paused"
            self.paused[i] = False
        if flags & EOF_SENT:
            assert not self.eof_sent[i]
            self.eof_sent[i] = True

    # -- actions -------------------------------------------------------------------------
    def send(self, i: int, data: bytes) -> None:
        assert not self.eof_asked[i]
        self.sent[i] += data
        if self.sched.send(self.boxes[i], data):
            assert not self.paused[i], "told to pause twice without a resume"
            self.paused[i] = True

    def send_eof(self, i: int) -> None:
        if not self.eof_asked[i]:
            self.eof_asked[i] = True
            self.report(i, self.sched.send_eof(self.boxes[i]))

    def stall(self) -> None:
        self.sched.writable = False

    def unstall(self) -> None:
        self.sched.writable = True
        while self.sched.blocked and self.sched.writable:
            for box, flags in self.sched.drain_round():
                self.report(self.index(box), flags)
            self.deliver()

    def deliver(self) -> None:
        """What A wrote reaches B."""
        for ev in self.b.receive_data(self.a.bytes_to_send()):
            if isinstance(ev, DataReceived):
                s = self.side[ev.stream_id]
                s.got += ev.data
                s.unacked += len(ev.data)
                self.order.append(ev.stream_id)
            elif isinstance(ev, StreamEnded):
                s = self.side[ev.stream_id]
                s.eof = True

    def acknowledge(self, i: int) -> None:
        """B's sink consumed what it got on stream ``i``: credit goes back to A."""
        self.deliver()
        s = self.side[self.boxes[i].sid]
        if s.unacked:
            self.b.acknowledge_received(self.boxes[i].sid, s.unacked)
            s.unacked = 0
        for ev in self.a.receive_data(self.b.bytes_to_send()):
            if isinstance(ev, WindowUpdated):
                box = next(b for b in self.boxes if b.sid == ev.stream_id)
                self.report(self.index(box), self.sched.window_opened(box))

    def settle(self) -> None:
        """Unstalled, B consuming everything: what is parked drains."""
        self.unstall()
        for _ in range(10_000):
            self.deliver()
            if not any(b.pending for b in self.boxes):
                break
            for i in range(len(self.boxes)):
                self.acknowledge(i)
            self.unstall()
        self.deliver()


actions = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 2), st.integers(1, 40_000)),
        st.tuples(st.just("eof"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("stall"), st.just(0), st.just(0)),
        st.tuples(st.just("unstall"), st.just(0), st.just(0)),
        st.tuples(st.just("ack"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("deliver"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    actions=actions,
    window=st.integers(1000, 100_000),
    quantum=st.integers(1, 50_000),
    budget=st.integers(1, 200_000),
)
def test_every_byte_arrives_in_order_once_with_its_end_after_it(
    actions: list[tuple[str, int, int]], window: int, quantum: int, budget: int
) -> None:
    h = Harness(3, window, quantum, budget)
    fill = 0
    for op, i, n in actions:
        if op == "send" and not h.eof_asked[i]:
            h.send(i, bytes((fill + k) % 251 for k in range(n)))
            fill += 1
        elif op == "eof":
            h.send_eof(i)
        elif op == "stall":
            h.stall()
        elif op == "unstall":
            h.unstall()
        elif op == "ack":
            h.acknowledge(i)
        else:
            h.deliver()
        for k, box in enumerate(h.boxes):
            side = h.side[box.sid]
            assert h.sent[k].startswith(side.got)  # a prefix, in order, never more
            assert box.pending_bytes == sum(len(c) for c in box.pending)
            assert not side.eof or side.got == h.sent[k]
    h.settle()
    for k, box in enumerate(h.boxes):
        side = h.side[box.sid]
        assert side.got == h.sent[k]
        assert not h.paused[k], "a parked source was never resumed"
        assert side.eof == h.eof_asked[k] == h.eof_sent[k]


def test_a_small_stream_waits_at_most_a_quantum_of_each_bulk_stream() -> None:
    quantum = 4096
    h = Harness(3, 10 << 20, quantum, 1 << 20)
    h.stall()
    h.send(0, b"x" * 200_000)  # bulk
    h.send(1, b"y" * 200_000)  # bulk
    h.send(2, b"small")
    h.unstall()
    small = h.boxes[2].sid
    first = h.order.index(small)
    before = h.order[:first]
    frames = 16384
    # Each bulk stream got at most its quantum (in frames of at most max_frame) first.
    for sid in (h.boxes[0].sid, h.boxes[1].sid):
        assert before.count(sid) <= -(-quantum // frames)
    assert bytes(h.side[small].got) == b"small"


def test_held_credit_is_released_when_the_sink_resumes() -> None:
    a = Connection(initiator=True, initial_window=4000)
    b = Connection(initiator=False, initial_window=4000)
    b.receive_data(a.bytes_to_send())
    a.receive_data(b.bytes_to_send())
    sched_b = StreamScheduler(b)
    sid = a.open_stream(TARGET)
    b.receive_data(a.bytes_to_send())
    box = sched_b.open(sid)
    a.send_data(sid, b"z" * 3000)
    b.receive_data(a.bytes_to_send())
    sched_b.received(box, 3000)  # not started: held
    assert b.bytes_to_send() == b""
    sched_b.pause_sink(box)
    sched_b.start(box)  # started, but the sink is paused: still held
    assert b.bytes_to_send() == b""
    assert box.held == 3000
    sched_b.resume_sink(box)
    assert box.held == 0
    (ev,) = a.receive_data(b.bytes_to_send())
    assert ev == WindowUpdated(sid, 3000)


def test_closing_forgets_parked_data_and_its_turn() -> None:
    h = Harness(2, 1 << 20, 1000, 1 << 20)
    h.stall()
    h.send(0, b"a" * 5000)
    h.send(1, b"b" * 5000)
    h.sched.close(h.boxes[0])
    assert not h.boxes[0].pending
    h.unstall()
    assert not h.side[h.boxes[0].sid].got
    assert h.side[h.boxes[1].sid].got == b"b" * 5000


def test_an_end_of_stream_the_connection_refuses_is_not_reported() -> None:
    h = Harness(1, 1 << 20, 1000, 1 << 20)
    box = h.boxes[0]
    h.a.reset_stream(box.sid)  # the stream is gone from the connection
    assert h.sched.send_eof(box) == 0
