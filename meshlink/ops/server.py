"""The operations HTTP server: /healthz, /readyz, /metrics (Prometheus), /api/status, and
/api/probe (the site connects to its exported endpoints, for `meshlink check`).

It knows nothing of the components: the runtime hands it callables. Binds to loopback by
default; the status API carries no secrets (no keys, no token material).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshlink import httpd

log = logging.getLogger(__name__)

StatusFn = Callable[[], Mapping[str, object]]
ReadyFn = Callable[[], tuple[bool, str]]
ProbeFn = Callable[[], Awaitable[Sequence[Mapping[str, object]]]]


class OpsServer:
    def __init__(
        self,
        *,
        status: StatusFn,
        ready: ReadyFn,
        registry: CollectorRegistry,
        probe: ProbeFn | None = None,
    ):
        self._status = status
        self._ready = ready
        self._probe = probe
        self._registry = registry
        self._served: httpd.Served | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._api_status)
        if self._probe is not None:
            app.router.add_get("/api/probe", self._api_probe)
        return app

    async def _healthz(self, _req: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _req: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.Response(
            text=f"{'ok' if ok else 'not ready'}: {why}\n", status=200 if ok else 503
        )

    async def _metrics(self, _req: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _api_status(self, _req: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(self._status(), indent=1, default=str),
            content_type="application/json",
        )

    async def _api_probe(self, _req: web.Request) -> web.Response:
        assert self._probe is not None
        return web.Response(
            text=json.dumps(list(await self._probe()), indent=1), content_type="application/json"
        )

    async def start(self, host: str, port: int) -> None:
        """Serve with meshlink's HTTP limits (``httpd``): head, idle and request timeouts,
        a connection cap, quiet 400s for malformed requests."""
        self._served = await httpd.serve(self._app(), host, port, key="ops.listen")
        self.port = self._served.port

    async def close(self) -> None:
        if self._served is not None:
            await self._served.close()
            self._served = None
