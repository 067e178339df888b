"""Per-stream flow-control windows: how much a side may send, and when to grant more.

Credit-based like HTTP/2: the receiver grants `initial` bytes per stream in its HELLO and
tops the sender up with WINDOW frames as it consumes data. A sender never has more than
the granted credit in flight, so a receiver never buffers more than `initial` bytes of a
stream: bounded memory, and backpressure that reaches the original sender.
"""

from __future__ import annotations

from typing import Final

from meshlink.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

MAX_WINDOW: Final = 2**31 - 1


class FlowWindow:
    """Both directions of one stream's flow control."""

    __slots__ = ("_recv_initial", "_recv_unacked", "recv_left", "send_credit")

    def __init__(self, *, send_initial: int, recv_initial: int) -> None:
        self.send_credit = send_initial
        """Bytes we may still send before the peer grants more."""
        self.recv_left = recv_initial
        """Bytes the peer may still send us."""
        self._recv_initial = recv_initial
        self._recv_unacked = 0

    # sending side
    def spend(self, n: int) -> None:
        if n > self.send_credit:
            raise LocalProtocolError(
                f"sending {n} bytes exceeds the peer's flow-control credit ({self.send_credit})"
            )
        self.send_credit -= n

    def grant(self, increment: int) -> None:
        """The peer sent WINDOW(increment)."""
        if increment <= 0:
            raise RemoteProtocolError("WINDOW increment must be positive", ErrorCode.PROTOCOL_ERROR)
        if self.send_credit + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                "WINDOW increment overflows the flow-control window", ErrorCode.FLOW_CONTROL_ERROR
            )
        self.send_credit += increment

    # receiving side
    def receive(self, n: int) -> None:
        """The peer is sending `n` bytes of DATA."""
        if n > self.recv_left:
            raise RemoteProtocolError(
                f"peer sent {n} bytes with only {self.recv_left} bytes of credit",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.recv_left -= n

    def consume(self, n: int) -> int:
        """`n` received bytes were consumed; return the WINDOW increment to send now (or 0).

        Credit is returned in batches of at least a quarter of the window, so a bulk flow
        costs one WINDOW frame per quarter window rather than one per DATA frame.
        """
        if n < 0 or self._recv_unacked + n + self.recv_left > self._recv_initial:
            raise LocalProtocolError(f"acknowledging {n} bytes that were never received")
        self._recv_unacked += n
        if self._recv_unacked * 4 >= self._recv_initial or (
            self.recv_left == 0 and self._recv_unacked
        ):
            inc = self._recv_unacked
            self._recv_unacked = 0
            self.recv_left += inc
            return inc
        return 0
