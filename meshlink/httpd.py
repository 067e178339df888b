"""Serving an aiohttp application with limits: the one way meshlink serves HTTP (the ops
server, and the grant endpoint over TLS).

What a client can make the server hold is bounded:
- **head and idle time**: a connection must send a complete request head within
  ``HEADER_TIMEOUT`` of connecting or of its previous response, and an idle keep-alive
  connection is closed after as long (aiohttp's keep-alive timer, armed from the connect);
- **request time**: a handler, reading the body included, gets ``REQUEST_TIMEOUT``, else
  the client gets 408;
- **connections**: at ``MAX_CONNECTIONS``, a new connection closes an idle one for itself
  (one that never finished a request first, oldest first; then the one idle longest); when
  every connection has a request in progress, the new one is closed. Over TLS a connection
  counts from the end of its handshake; the handshake itself is bounded by
  ``HANDSHAKE_TIMEOUT``.
A malformed request (a line over 8 kB, a bad method ...) is answered 400 by aiohttp and
logged at DEBUG in one line: it is the client's mistake, not the server's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from meshlink.config import HostPort, listen_error

log = logging.getLogger(__name__)

HEADER_TIMEOUT: Final = 10.0
REQUEST_TIMEOUT: Final = 30.0
HANDSHAKE_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 128


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: a request that cannot be parsed is a client error, one DEBUG
    line without a traceback (aiohttp logs it as an ERROR with one)."""

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.debug("bad request from %s: %s", args[0] if args else "?", exc.message)
            return
        super().exception(msg, *args, **kwargs)


_SERVER_LOG: Final = _ServerLog(logging.getLogger("meshlink.httpd.aiohttp"), {})


@dataclass
class Limits:
    header_timeout: float = HEADER_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


@dataclass
class _Connections:
    """Which connections have a request in progress, and when each last finished one."""

    busy: set[RequestHandler] = field(default_factory=set)
    done_at: dict[RequestHandler, float] = field(default_factory=dict)

    def quietest_idle(self, handlers: list[RequestHandler]) -> RequestHandler | None:
        idle = [h for h in handlers if h not in self.busy]
        if not idle:
            return None
        # Never served first (-1; min() keeps the first of equals: the oldest), then the
        # one whose last request finished longest ago.
        return min(idle, key=lambda h: self.done_at.get(h, -1.0))

    def forget_closed(self) -> None:
        """Drop the connections that are gone (called as the record grows)."""
        self.done_at = {h: t for h, t in self.done_at.items() if h.transport is not None}


class _CappedSite(web.BaseSite):
    """A TCP site whose protocol factory enforces the connection cap, with a TLS handshake
    timeout (aiohttp's TCPSite sets neither)."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limits: Limits,
        conns: _Connections,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=limits.max_connections)
        self._host = host
        self._port = port
        self._limits = limits
        self._conns = conns
        self.bound_port = port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{HostPort(self._host, self.bound_port)}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            ssl_handshake_timeout=self._limits.handshake_timeout if self._ssl_context else None,
        )
        self.bound_port = self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        live = [
            h
            for h in server.connections
            if h.transport is not None and not h.transport.is_closing()
        ]
        if len(live) >= self._limits.max_connections:
            quietest = self._conns.quietest_idle(live)
            if quietest is None:
                log.debug("http: %d connections, all busy: refusing a new one", len(live))
                return _Refuse()
            log.debug("http: %d connections: closing the quietest idle one", len(live))
            quietest.force_close()
        return server()


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


def _middleware(limits: Limits, conns: _Connections) -> Any:
    @web.middleware
    async def limit(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        proto = request.protocol
        conns.busy.add(proto)
        try:
            async with asyncio.timeout(limits.request_timeout):
                return await handler(request)
        except TimeoutError:
            return web.Response(status=408, text="request timeout\n")
        finally:
            conns.busy.discard(proto)
            conns.done_at[proto] = asyncio.get_running_loop().time()
            if len(conns.done_at) > 2 * limits.max_connections:
                conns.forget_closed()

    return limit


@dataclass
class Served:
    """A started server; ``await close()`` stops it."""

    runner: web.AppRunner
    host: str
    port: int
    _conns: _Connections

    @property
    def remembered(self) -> int:
        """Connections whose last request time is kept (bounded: closed ones are dropped)."""
        return len(self._conns.done_at)

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    key: str,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
) -> Served:
    """Serve ``app`` on ``host:port`` (port 0: any free port) with ``limits``. An address
    that cannot be bound is a ConfigError naming the config ``key``."""
    limits = limits or Limits()
    conns = _Connections()
    app.middlewares.insert(0, _middleware(limits, conns))
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
        keepalive_timeout=limits.header_timeout,
        logger=cast(logging.Logger, _SERVER_LOG),
    )
    await runner.setup()
    site = _CappedSite(runner, host, port, ssl_context=ssl_context, limits=limits, conns=conns)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise listen_error(key, host, port, e) from None
    return Served(runner, host, site.bound_port, conns)
