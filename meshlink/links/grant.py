"""The grant endpoint: HTTPS (TLS 1.3, server certificate from the site CA, no client
certificate) with two routes:

- ``POST /v1/redeem`` carries ``issuer.decide_redeem``. Request: ``{token_id, secret,
  site, ca_pem, csr_pem, gateway_pem}`` (``gateway_pem``, the redeemer's gateway
  certificate, is needed only to link the same site again). Success (200): ``{site,
  ca_pem, cert_pem, endpoints}``.
- ``POST /v1/reauth`` carries ``issuer.decide_reauth``: a current peer whose link
  certificate expired proves its identity with its gateway certificate. Request: ``{site,
  gateway_pem, csr_pem}``. Success (200): ``{site, cert_pem}``.

Refusal: ``{error: <code>, message: <one line>}`` with the status of ``issuer.REFUSALS``.
Decisions are serialised by one asyncio lock, so a token's uses are consumed exactly once
each; file writes are atomic renames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from meshlink import httpd
from meshlink.config import HostPort, SiteConfig
from meshlink.errors import MeshlinkError
from meshlink.links.issuer import GrantRefused, decide_reauth, decide_redeem
from meshlink.names import split_hostport
from meshlink.pki import (
    LINK_CERT_LIFETIME,
    ReloadingServerContext,
    SiteIdentity,
    grant_server_context,
)
from meshlink.store import StateLike, as_store

log = logging.getLogger(__name__)

REDEEM_PATH: Final = "/v1/redeem"
REAUTH_PATH: Final = "/v1/reauth"
MAX_BODY: Final = 64 * 1024


def _refusal(code: str, status: int, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


class GrantServer:
    """The aiohttp application of the grant endpoint for one site."""

    def __init__(
        self,
        identity: SiteIdentity,
        state: StateLike,
        gateway_endpoints: Sequence[str],
        *,
        cert_lifetime: timedelta = LINK_CERT_LIFETIME,
        clock: Callable[[], float] = time.time,
    ):
        for ep in gateway_endpoints:
            split_hostport(ep, strict=True)  # ValueError here is a programming error of the caller
        self.identity = identity
        self.state = as_store(state)
        self.gateway_endpoints = tuple(gateway_endpoints)
        self.cert_lifetime = cert_lifetime
        self.clock = clock
        self._lock = asyncio.Lock()

    def make_app(self, middlewares: Iterable[Middleware] = ()) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=list(middlewares))
        app.router.add_post(REDEEM_PATH, self._redeem)
        app.router.add_post(REAUTH_PATH, self._reauth)
        return app

    async def _redeem(self, request: web.Request) -> web.Response:
        def decide(body: object) -> dict[str, Any]:
            return decide_redeem(
                self.identity,
                self.state,
                body,
                endpoints=self.gateway_endpoints,
                cert_lifetime=self.cert_lifetime,
                now=self.clock(),
            )

        return await self._decide(request, decide)

    async def _reauth(self, request: web.Request) -> web.Response:
        def decide(body: object) -> dict[str, Any]:
            return decide_reauth(self.identity, self.state, body, cert_lifetime=self.cert_lifetime)

        return await self._decide(request, decide)

    async def _decide(
        self, request: web.Request, decide: Callable[[object], dict[str, Any]]
    ) -> web.Response:
        peer = request.remote or "?"
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge:
            return _refusal("malformed_request", 400, f"the request is over {MAX_BODY} bytes")
        except (ValueError, UnicodeDecodeError):
            return _refusal("malformed_request", 400, "the request body is not JSON")
        async with self._lock:
            try:
                # In a thread: the records may live in the API server (a blocking request).
                answer = await asyncio.to_thread(decide, body)
            except GrantRefused as e:
                log.info("grant refused to %s: %s", peer, e.code)
                return _refusal(e.code, e.status, str(e))
            except MeshlinkError as e:  # e.g. a damaged record file: our side, say so
                log.warning("grant failed for %s: %s", peer, e)
                return _refusal("internal", 500, f"the issuing site failed: {e}")
        return web.json_response(answer)


@dataclass
class RunningGrant:
    """A started grant endpoint; ``await close()`` stops it."""

    served: httpd.Served
    tls: ReloadingServerContext

    @property
    def host(self) -> str:
        return self.served.host

    @property
    def port(self) -> int:
        return self.served.port

    @property
    def address(self) -> str:
        return str(HostPort(self.host, self.port))

    async def close(self) -> None:
        await self.served.close()

    async def cleanup(self) -> None:
        """The same as ``close`` (the name aiohttp's runners use)."""
        await self.served.close()


async def start_site_grant(identity: SiteIdentity, config: SiteConfig) -> RunningGrant:
    """The grant endpoint of a running site, as its configuration says."""
    server = GrantServer(
        identity,
        identity.state,
        [str(a) for a in config.advertise],
        cert_lifetime=timedelta(seconds=config.link_cert_lifetime),
    )
    return await start_grant_server(server, config.grant_listen.host, config.grant_listen.port)


async def start_grant_server(
    server: GrantServer,
    host: str,
    port: int,
    *,
    middlewares: Iterable[Middleware] = (),
) -> RunningGrant:
    """Serve ``server`` over TLS on ``host:port`` (port 0: any free port), with meshlink's
    HTTP limits (``httpd``).

    The certificate is read from the identity's files again on the first handshake after
    they change, so a renewed gateway certificate is served without a restart.
    """
    chain, key = server.identity.gateway_chain_path, server.identity.gateway_key_path
    tls = ReloadingServerContext(lambda: grant_server_context(chain, key), [chain, key])
    served = await httpd.serve(
        server.make_app(middlewares), host, port, key="grant.listen", ssl_context=tls.context
    )
    log.info("grant endpoint listening on %s:%s", host, served.port)
    return RunningGrant(served=served, tls=tls)
