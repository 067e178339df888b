"""The stream state machine, as one table (h11's habit): (state, action) -> next state.

A stream is OPEN from its OPEN frame until each side has sent FIN (then CLOSED) or either
side sends RST (CLOSED at once). ACCEPT is orthogonal (a flag on the stream), because data
may flow optimistically before the peer has reached the target. A pair missing from the
table is a violation: `LocalProtocolError` when we attempt it, `RemoteProtocolError`
(STREAM_CLOSED) when the peer does.
"""

from __future__ import annotations

import enum
from typing import Final


class StreamState(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "local-closed"  # we sent FIN, the peer may still send
    REMOTE_CLOSED = "remote-closed"  # the peer sent FIN, we may still send
    CLOSED = "closed"


class Action(enum.Enum):
    SEND_DATA = "send DATA"
    SEND_FIN = "send FIN"
    SEND_RST = "send RST"
    RECV_DATA = "receive DATA"
    RECV_FIN = "receive FIN"
    RECV_RST = "receive RST"


_S = StreamState
_A = Action

TRANSITIONS: Final[dict[tuple[StreamState, Action], StreamState]] = {
    (_S.OPEN, _A.SEND_DATA): _S.OPEN,
    (_S.OPEN, _A.RECV_DATA): _S.OPEN,
    (_S.OPEN, _A.SEND_FIN): _S.LOCAL_CLOSED,
    (_S.OPEN, _A.RECV_FIN): _S.REMOTE_CLOSED,
    (_S.OPEN, _A.SEND_RST): _S.CLOSED,
    (_S.OPEN, _A.RECV_RST): _S.CLOSED,
    (_S.LOCAL_CLOSED, _A.RECV_DATA): _S.LOCAL_CLOSED,
    (_S.LOCAL_CLOSED, _A.RECV_FIN): _S.CLOSED,
    (_S.LOCAL_CLOSED, _A.SEND_RST): _S.CLOSED,
    (_S.LOCAL_CLOSED, _A.RECV_RST): _S.CLOSED,
    (_S.REMOTE_CLOSED, _A.SEND_DATA): _S.REMOTE_CLOSED,
    (_S.REMOTE_CLOSED, _A.SEND_FIN): _S.CLOSED,
    (_S.REMOTE_CLOSED, _A.SEND_RST): _S.CLOSED,
    (_S.REMOTE_CLOSED, _A.RECV_RST): _S.CLOSED,
}
"""Every allowed move. A CLOSED stream is forgotten, so it has no row."""


def next_state(state: StreamState, action: Action) -> StreamState | None:
    """The state after `action`, or None when the action is not allowed in `state`."""
    return TRANSITIONS.get((state, action))
