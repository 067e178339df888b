"""Stream scheduling on one connection (sans-IO): who sends next, and when credit returns.

The ``Connection`` says what may be sent (each stream's credit); the scheduler decides
what is sent, for every stream of one link, and keeps what cannot go yet:

- **Parking.** A stream's data goes out at once while the link can write and the stream's
  credit lasts; the rest is parked in the stream's ``Outbox``. ``send`` returns True when
  a stream parks for the first time: the caller pauses the stream's source, so a parked
  queue holds at most what the source had in hand (bounded memory).
- **Round robin.** While the link cannot write (``writable`` False: the transport's buffer
  is full), every stream that has data parks it and joins the round-robin queue. When the
  link drains, ``drain_round`` sends at most ``quantum`` bytes of each queued stream in
  turn, a ``round_budget`` per round (the caller flushes between rounds, which may stop the
  link again): a small flow waits for at most one quantum of each bulk flow, and writes
  stay large. A stream short of credit waits for its WINDOW (``window_opened``) instead.
- **End of stream** after parked data: ``send_eof`` defers the FIN until the queue is
  empty. Draining reports, per stream, ``RESUMED`` (all parked data sent: resume the
  source) and ``EOF_SENT`` (the deferred FIN went out: the stream may be done).
- **Held acknowledgements.** Credit for received data is returned (``acknowledge_received``)
  only while the stream is started and its sink takes data; while the sink is paused (or
  the stream not yet joined to one) it is held, so a slow receiver slows the sender, and
  released at once when the sink resumes.

No I/O: the caller feeds it and writes ``Connection.data_to_send()``. Tests drive two
connections in memory (tests/unit/test_proto_scheduler.py).
"""

from __future__ import annotations

import collections
from typing import Final

from meshlink.errors import LocalProtocolError
from meshlink.proto.connection import Connection

DRAIN_QUANTUM: Final = 64 * 1024
"""Bytes of one stream sent per turn of the round robin."""
ROUND_BUDGET: Final = 768 * 1024
"""Bytes sent per round before the caller flushes (the link's high minus low water mark)."""

RESUMED: Final = 1
"""Drained: the stream's parked data is all sent; resume its source."""
EOF_SENT: Final = 2
"""Drained: the stream's deferred end of stream went out."""


class Outbox:
    """One stream's state in the scheduler (its caller keeps it, no lookups per call)."""

    __slots__ = (
        "closed",
        "held",
        "parked",
        "pending",
        "pending_bytes",
        "sid",
        "sink_paused",
        "started",
        "want_eof",
    )

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.pending: collections.deque[bytes | memoryview] = collections.deque()
        self.pending_bytes = 0
        self.want_eof = False
        self.parked = False
        """The source was told to pause (RESUMED will be reported once drained)."""
        self.held = 0
        """Bytes received and not acknowledged (credit held back from the peer)."""
        self.started = False
        self.sink_paused = False
        self.closed = False


class StreamScheduler:
    """See the module docstring."""

    def __init__(
        self,
        conn: Connection,
        *,
        quantum: int = DRAIN_QUANTUM,
        round_budget: int = ROUND_BUDGET,
    ) -> None:
        self.conn = conn
        self.quantum = quantum
        self.round_budget = round_budget
        self.writable = True
        """False while the transport's write buffer is full (the caller sets it)."""
        self._blocked: dict[Outbox, None] = {}  # insertion-ordered: the round robin

    def open(self, sid: int) -> Outbox:
        return Outbox(sid)

    def close(self, box: Outbox) -> None:
        """Forget the stream: its parked data and its turn."""
        box.closed = True
        box.pending.clear()
        box.pending_bytes = 0
        self._blocked.pop(box, None)

    # -- sending -------------------------------------------------------------------------

    def send(self, box: Outbox, data: bytes | memoryview) -> bool:
        """Send ``data`` on the stream or park it; True when the source must now pause."""
        if box.pending or not self.writable:
            return self._park(box, data)
        conn = self.conn
        credit = conn.send_window(box.sid)
        if len(data) <= credit:
            conn.send_data(box.sid, data)
            return False
        if credit:
            view = memoryview(data)
            conn.send_data(box.sid, view[:credit])
            data = view[credit:]
        return self._park(box, data)

    def _park(self, box: Outbox, data: bytes | memoryview) -> bool:
        box.pending.append(data)
        box.pending_bytes += len(data)
        if not self.writable:
            self._blocked[box] = None
        if box.parked:
            return False
        box.parked = True
        return True

    def send_eof(self, box: Outbox) -> int:
        """End the stream's output: now (EOF_SENT, or 0 if the stream cannot send any
        more), or after its parked data (0; draining reports EOF_SENT)."""
        if box.pending:
            box.want_eof = True
            return 0
        return self._eof(box)

    def _eof(self, box: Outbox) -> int:
        try:
            self.conn.send_eof(box.sid)
        except LocalProtocolError:
            return 0
        return EOF_SENT

    def _drain(self, box: Outbox, quantum: int) -> int:
        """Send parked data as far as credit, the link and ``quantum`` allow."""
        conn, pending, sid = self.conn, box.pending, box.sid
        while pending and self.writable and quantum > 0:
            credit = min(conn.send_window(sid), quantum)
            if not credit:
                break
            quantum -= credit
            chunk = pending[0]
            if len(chunk) <= credit:
                pending.popleft()
                conn.send_data(sid, chunk)
                box.pending_bytes -= len(chunk)
            else:
                view = memoryview(chunk)
                conn.send_data(sid, view[:credit])
                pending[0] = view[credit:]
                box.pending_bytes -= credit
        if pending:
            if not self.writable or quantum <= 0:
                self._blocked[box] = None  # the back of the round-robin queue
            return 0
        flags = 0
        if box.want_eof:
            box.want_eof = False
            flags |= self._eof(box)
        if box.parked:
            box.parked = False
            flags |= RESUMED
        return flags

    def window_opened(self, box: Outbox) -> int:
        """The peer granted the stream credit: send what is parked (flags as drained)."""
        return self._drain(box, 1 << 62) if box.pending else 0

    @property
    def blocked(self) -> bool:
        """Streams wait for their turn."""
        return bool(self._blocked)

    def drain_round(self) -> list[tuple[Outbox, int]]:
        """One round of the round robin (the link can write): each waiting stream in turn
        sends up to a quantum until the round's budget is spent. Returns the streams whose
        draining reported something (flags as ``RESUMED``/``EOF_SENT``)."""
        out = []
        budget = self.round_budget
        blocked = self._blocked
        while blocked and budget > 0 and self.writable:
            box = next(iter(blocked))
            del blocked[box]
            before = box.pending_bytes
            flags = self._drain(box, self.quantum)
            budget -= max(1, before - box.pending_bytes)
            if flags:
                out.append((box, flags))
        return out

    # -- acknowledging -------------------------------------------------------------------

    def received(self, box: Outbox, n: int) -> None:
        """``n`` bytes of the stream reached its sink (or wait for one): acknowledge them,
        or hold the credit while the sink is paused or not joined yet."""
        if box.sink_paused or not box.started:
            box.held += n
        else:
            self.conn.acknowledge_received(box.sid, n)

    def start(self, box: Outbox) -> None:
        """The stream is joined to its sink: credit flows unless the sink is paused."""
        box.started = True
        if not box.sink_paused:
            self._release(box)

    def pause_sink(self, box: Outbox) -> None:
        box.sink_paused = True

    def resume_sink(self, box: Outbox) -> None:
        box.sink_paused = False
        self._release(box)

    def _release(self, box: Outbox) -> None:
        if box.held and not box.closed:
            held, box.held = box.held, 0
            self.conn.acknowledge_received(box.sid, held)
