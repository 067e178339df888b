"""Import listeners: a local TCP listener per imported service port; every accepted
connection becomes a flow through the gateway to one of the service's exporting sites.

`choose()` returns the candidate targets best first (the runtime orders them by hops and
RTT); a target that refuses (no route, connect error) is skipped for the next one before
any client byte is forwarded, so failover needs no replay. When all refuse, the client
connection is reset and one line is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from meshlink.errors import ErrorCode
from meshlink.proto import FlowTarget
from meshlink.tunnel.gateway import Gateway
from meshlink.tunnel.link import StreamEnd
from meshlink.tunnel.splice import TcpEnd, join
from meshlink.tunnel.types import FlowError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 5.0


class _ClientEnd(TcpEnd):
    """An accepted client connection; tells its listener when it is made and lost."""

    __slots__ = ("_on_lost", "_on_made")

    def __init__(
        self, on_made: Callable[[_ClientEnd], None], on_lost: Callable[[_ClientEnd], None]
    ) -> None:
        super().__init__()
        self._on_made = on_made
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # reading stays paused until the flow is joined
        self._on_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(self)
        super().connection_lost(exc)


class ImportListener:
    """A local listener forwarding each connection through the gateway."""

    def __init__(
        self,
        gateway: Gateway,
        bind: tuple[str, int],
        choose: Callable[[], Sequence[FlowTarget]],
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.gateway = gateway
        self.bind = bind
        self.choose = choose
        self.connect_timeout = connect_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[_ClientEnd] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.bound_address: tuple[str, int] | None = None
        self._last_refusal: str | None = None

    async def start(self) -> None:
        """Bind and start accepting (raises OSError when the address is unavailable)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientEnd(self._accepted, self._clients.discard),
            self.bind[0],
            self.bind[1],
            reuse_address=True,
        )
        name = self._server.sockets[0].getsockname()
        self.bound_address = (name[0], name[1])

    async def close(self) -> None:
        """Stop listening and reset the flows still open."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in list(self._clients):
            c.feed_abort(ErrorCode.CANCEL)
        self._clients.clear()

    def _accepted(self, client: _ClientEnd) -> None:
        self._clients.add(client)
        task = asyncio.get_running_loop().create_task(self._serve(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log_refusal(self, fut: asyncio.Future[None]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self._refused(str(exc))

    def _refused(self, why: str) -> None:
        if why != self._last_refusal:  # one line per distinct cause, not per connection
            log.warning("import %s:%d: connection refused: %s", self.bind[0], self.bind[1], why)
            self._last_refusal = why

    async def _serve(self, client: _ClientEnd) -> None:
        try:
            targets = list(self.choose())
        except Exception:
            log.exception("import %s:%d: choosing a target failed", *self.bind)
            targets = []
        errors = []
        # One candidate: nothing to fail over to, so forward the client's bytes at once
        # (saves a round trip per flow). Several: wait for ACCEPT before sending a byte,
        # so a refusal can move on to the next candidate without replaying anything.
        optimistic = len(targets) == 1
        for target in targets:
            try:
                end = await self.gateway.connect_end(
                    target, timeout=self.connect_timeout, wait_accept=not optimistic
                )
            except FlowError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # a bug in a handler must not kill the listener
                log.exception("import %s:%d: opening a flow to %s failed", *self.bind, target)
                errors.append(f"{target}: internal error {e!r}")
                continue
            if isinstance(end, StreamEnd) and end.accepted is not None and optimistic:
                end.accepted.add_done_callback(self._log_refusal)
            if client.closed:
                end.feed_abort(ErrorCode.CANCEL)
                end.start()
                return
            join(client, end)
            end.start()
            client.start()
            self._last_refusal = None
            return
        why = "; ".join(errors) or "no site exports it right now"
        self._refused(why)
        client.feed_abort(ErrorCode.NO_ROUTE, why)
