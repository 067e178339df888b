"""The process runtime of `meshlink run`: owns the event loop, signals and the root TaskGroup.

It wires the components of one site together and owns nothing else:
- the gateway (tunnel) and the catalog: link up/down and control messages feed the
  catalog; catalog output goes back over the links; flows are routed by the catalog;
- the platform adapter (local mode or the Kubernetes controller) publishes this site's
  exports and consumes the clusterset's; the import view it derives feeds DNS and the
  import listeners;
- the grant endpoint, the ops server, and the link/peer records on disk (written by the
  CLI, picked up here within a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshlink import links, pki, status
from meshlink.catalog import control
from meshlink.catalog.records import ExportRecord
from meshlink.catalog.sync import Catalog, Send
from meshlink.catalog.view import ImportedService, ImportView, ListenerSpec, Platform
from meshlink.config import SiteConfig
from meshlink.dns import run as dns_run
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import SnapshotBuilder
from meshlink.errors import MeshlinkError
from meshlink.local.site import LocalSite
from meshlink.ops.server import OpsServer
from meshlink.proto import FlowTarget
from meshlink.tunnel import (
    DialSpec,
    Gateway,
    ImportListener,
    LocalRoute,
    NoRoute,
    PeerRoute,
    Route,
)

log = logging.getLogger(__name__)

ALL_COMPONENTS: Final = frozenset({"gateway", "controller", "dns", "ops", "grant"})
STATE_POLL: Final = 0.5
"""Seconds between looks at the link and peer records the CLI writes."""


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.links_up = Gauge("meshlink_links_up", "Live links to peers", registry=r)
        self.rtt = Gauge("meshlink_link_rtt_seconds", "Heartbeat RTT", ["peer"], registry=r)
        self.sites = Gauge("meshlink_sites_reachable", "Sites with a live path", registry=r)
        self.services = Gauge("meshlink_imported_services", "Imported services", registry=r)
        self.refused = Counter(
            "meshlink_catalog_refused_total", "Catalog entries refused from peers", registry=r
        )
        self.propagation = Histogram(
            "meshlink_catalog_propagation_seconds",
            "Delay from an export change at its origin to this site (clock-skew sensitive)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )


class SiteRuntime:
    """One site: every component of `meshlink run` in one event loop."""

    def __init__(self, config: SiteConfig, components: frozenset[str] = ALL_COMPONENTS):
        self.config = config
        self.site = config.site
        self.components = components
        self.started = time.time()
        self.metrics = _Metrics()
        self.identity = pki.SiteIdentity.load_or_create(config.state_dir, config.site)
        self.catalog = Catalog(config.site, gateway_endpoints=[str(a) for a in config.advertise])
        self.platform: Platform
        if config.kubernetes is None:
            self.platform = LocalSite(config)
        else:
            from meshlink.k8s.platform import KubernetesPlatform

            self.platform = KubernetesPlatform(config, controller="controller" in components)
        self.renewals = links.Renewals(
            config.state_dir, lifetime=timedelta(seconds=config.link_cert_lifetime)
        )
        self.gateway = Gateway(
            config.site,
            listen=(config.gateway_listen.host, config.gateway_listen.port),
            server_context=self._server_context,
            authorize=self._authorize,
            handler=self,
            heartbeat_interval=config.heartbeat_interval,
            max_streams=config.max_streams_per_link,
            new_flows_per_second=config.new_flows_per_second,
        )
        self.dns: DnsServer | None = None
        self._dns_builder = SnapshotBuilder(zone=config.dns.zone, ttl=config.dns.ttl)
        self.ops: OpsServer | None = None
        self.imports: tuple[ImportedService, ...] = ()
        self._listeners: dict[tuple[str, int], ImportListener] = {}
        self._listener_specs: dict[tuple[str, int], ListenerSpec] = {}
        self._listener_errors: dict[tuple[str, int], str] = {}
        self._listeners_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._view = ImportView()
        self._view_dirty = asyncio.Event()
        self._seen_generation = -1
        self._ready_reason = "starting"

    # -- TLS and authorization -----------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        # Peers present client certificates our CA signed at redemption: trust only it.
        return links.gateway_server_context(self.identity)

    def _authorize(self, peer: str) -> bool:
        allowed = links.is_peer_allowed(self.config.state_dir, peer)
        if not allowed:
            log.warning("refused link from %s: not a linked peer (revoked or never linked)", peer)
        return allowed

    # -- GatewayHandler ------------------------------------------------------------------

    def link_up(self, peer_site: str) -> None:
        log.info("link up: %s", peer_site)
        self._send(self.catalog.peer_up(peer_site))
        self._changed()

    def link_down(self, peer_site: str, reason: str) -> None:
        log.info("link down: %s (%s)", peer_site, reason)
        self._send(self.catalog.peer_down(peer_site))
        self._changed()

    def control_received(self, peer_site: str, payload: bytes) -> None:
        try:
            msg = control.decode(payload)
            if isinstance(msg, control.Update):
                sends, refused = self.catalog.receive(peer_site, msg)
                self._observe_propagation(msg)
                for line in refused:
                    self.metrics.refused.inc()
                    log.warning("catalog entry refused %s", line)
                self._send(sends)
                self._changed()
            elif isinstance(msg, control.RenewRequest):
                answer = self.renewals.answer(self.identity, peer_site, msg)
                for frame in control.encode(answer):
                    self.gateway.send_control(peer_site, frame)
            else:
                self.renewals.store(self.identity, peer_site, msg)
        except MeshlinkError as e:
            log.warning("bad control message from %s: %s", peer_site, e)

    def _renew_links(self, records: Sequence[links.LinkRecord]) -> None:
        for rec in self.renewals.due(records, self.gateway.live_peers()):
            frames = control.encode(self.renewals.request(self.identity))
            if all(self.gateway.send_control(rec.peer_site, f) for f in frames):
                self.renewals.asked(rec.peer_site)

    def route(self, target: FlowTarget) -> Route:
        if target.site == self.site:
            endpoint = self._local_endpoint(target)
            if endpoint is None:
                return NoRoute(f"{target.namespace}/{target.name}:{target.port} is not served here")
            return LocalRoute(*endpoint)
        hop = self.catalog.next_hop(target.site)
        if hop is None:
            return NoRoute(f"no live path to site {target.site}")
        return PeerRoute(hop)

    def _local_endpoint(self, target: FlowTarget) -> tuple[str, int] | None:
        return self.platform.local_endpoint(target.namespace, target.name, target.port)

    # -- catalog plumbing ----------------------------------------------------------------

    def _send(self, sends: Sequence[Send]) -> None:
        for s in sends:
            for payload in control.encode(s.message):
                self.gateway.send_control(s.peer, payload)

    def _observe_propagation(self, msg: control.Update) -> None:
        now = time.time_ns()
        for entry in msg.add:
            rec = entry.get("rec") if isinstance(entry, dict) else None
            if isinstance(rec, dict) and isinstance(rec.get("version"), int):
                delay = (now - rec["version"]) / 1e9
                if 0 <= delay < 3600:
                    self.metrics.propagation.observe(delay)

    def _changed(self) -> None:
        self._dirty.set()

    def publish(self, records: Sequence[ExportRecord]) -> None:
        """Called by the platform adapter with the full set of this site's exports."""
        self._send(self.catalog.set_local(records))
        self._changed()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if self.catalog.generation == self._seen_generation:
                continue
            self._seen_generation = self.catalog.generation
            self.platform.catalog_changed(self.catalog.services())
            self.metrics.sites.set(len(self.catalog.sites()))

    def on_view(self, view: ImportView) -> None:
        """The platform's import state changed: DNS and listeners follow (in that task,
        listeners first, so a name never resolves before its traffic has a listener)."""
        self._view = view
        self._view_dirty.set()

    async def _imports_loop(self) -> None:
        while True:
            await self._view_dirty.wait()
            self._view_dirty.clear()
            t0 = time.monotonic()
            await self._set_imports(self._view.imports, self._view.listeners)
            # At thousands of imports a DNS snapshot takes tens of ms to build: wait as
            # long as the last update took, so a burst of changes costs at most half a core.
            await asyncio.sleep(min(time.monotonic() - t0, 1.0))

    def _set_dns(self, imports: tuple[ImportedService, ...]) -> None:
        self.imports = imports
        self.metrics.services.set(len(imports))
        if self.dns is not None:
            self.dns.update(self._dns_builder.build(imports))

    async def _set_imports(
        self, imports: tuple[ImportedService, ...], specs: Sequence[ListenerSpec]
    ) -> None:
        await self._apply_listeners({(s.address, s.port): s for s in specs})
        self._set_dns(imports)

    async def _apply_listeners(
        self, wanted: dict[tuple[str, int], ListenerSpec] | None = None
    ) -> None:
        """Close the listeners no longer wanted, open the missing ones. One that cannot bind
        is logged once, shown by status and `meshlink check`, and retried by the state loop
        (``wanted`` None: the current specs, read under the lock, so a retry can never
        bring back a set that a newer update replaced while it waited)."""
        async with self._listeners_lock:
            if wanted is None:
                wanted = dict(self._listener_specs)
            for addr in [a for a in self._listeners if a not in wanted]:
                listener = self._listeners.pop(addr)
                await listener.close()
                log.info("import listener closed: %s:%d", *addr)
            self._listener_specs = dict(wanted)
            self._listener_errors = {a: e for a, e in self._listener_errors.items() if a in wanted}
            for addr, spec in wanted.items():
                if addr in self._listeners:
                    continue
                listener = ImportListener(self.gateway, addr, self._chooser(addr))
                try:
                    await listener.start()
                except OSError as e:
                    # asyncio rewords bind errors ("error while attempting to bind ..."):
                    # the errno's own text is the one line that says it.
                    why = os.strerror(e.errno) if e.errno else str(e)
                    if self._listener_errors.get(addr) != why:
                        log.error(
                            "cannot listen on %s:%d for %s: %s (check %s; retrying)",
                            addr[0],
                            addr[1],
                            spec.key,
                            why,
                            self.platform.import_range,
                        )
                    self._listener_errors[addr] = why
                    continue
                self._listener_errors.pop(addr, None)
                self._listeners[addr] = listener
                log.info(
                    "import listener: %s:%d -> %s port %d",
                    addr[0],
                    addr[1],
                    spec.key,
                    spec.service_port,
                )

    def _chooser(self, addr: tuple[str, int]) -> Callable[[], list[FlowTarget]]:
        def choose() -> list[FlowTarget]:
            spec = self._listener_specs.get(addr)
            if spec is None:
                return []
            # Per flow: look up only the exporting sites (the catalog holds every record).
            routes = [r for o in spec.origins if (r := self.catalog.route_to(o)) is not None]
            if len(routes) > 1:
                # Prefer this site, then fewer hops, then the lower RTT of the first hop.
                routes.sort(key=lambda r: (r.hops, self._rtt(r.via), r.site))
            return [
                FlowTarget(r.site, spec.key.namespace, spec.key.name, spec.service_port)
                for r in routes
            ]

        return choose

    def _rtt(self, peer: str | None) -> float:
        rtt = self.gateway.rtt_ms(peer) if peer is not None else None
        return 0.0 if rtt is None else rtt

    # -- link and peer records -----------------------------------------------------------

    def _dial_specs(self, records: Sequence[links.LinkRecord]) -> list[DialSpec]:
        return [
            DialSpec(
                name=rec.name,
                peer_site=rec.peer_site,
                endpoints=tuple(rec.endpoints),
                ssl_context=self._client_context_factory(rec),
            )
            for rec in records
        ]

    def _client_context_factory(self, rec: links.LinkRecord) -> Callable[[], ssl.SSLContext]:
        # Built per dial from the files, so a renewed link certificate applies at once.
        return lambda: links.link_client_context(self.identity, rec)

    async def _state_loop(self) -> None:
        """Pick up links created/deleted and peers revoked by the CLI; renew certificates."""
        ticks = 0
        while True:
            ticks += 1
            try:
                records = links.list_links(self.config.state_dir)
                self.gateway.set_dials(self._dial_specs(records))
                if ticks % 20 == 1:
                    self._renew_links(records)
                if ticks % 7200 == 0:  # hourly: re-issues the gateway cert when 2/3 used
                    self.identity = pki.SiteIdentity.load_or_create(
                        self.config.state_dir, self.config.site
                    )
                dialled = {r.peer_site for r in records}
                for peer in self.catalog.peers():
                    if peer not in dialled and not links.is_peer_allowed(
                        self.config.state_dir, peer
                    ):
                        log.info("peer %s was revoked: dropping its link", peer)
                        self.gateway.drop_peer(peer, "revoked")
            except MeshlinkError as e:
                log.warning("link records: %s", e)
            statuses = self.gateway.status()
            for st in statuses:
                if st.rtt_ms is not None:
                    self.metrics.rtt.labels(st.peer_site).set(st.rtt_ms / 1000)
            self.metrics.links_up.set(sum(1 for st in statuses if st.state == "up"))
            if self._listener_errors and ticks % 10 == 0:  # every 5 s
                await self._apply_listeners()
            await asyncio.sleep(STATE_POLL)

    # -- status --------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._ready_reason != "ok":
            return (False, self._ready_reason)
        why = self.platform.not_ready()
        return (False, why) if why is not None else (True, "ok")

    def status(self) -> status.SiteStatus:
        return status.collect(
            config=self.config,
            mode=self.platform.mode,
            started=self.started,
            dns_served=self.dns is not None,
            ca_pin=self.identity.pin,
            links=self.gateway.status(),
            catalog=self.catalog,
            imports=self.imports,
            listeners=[self._listener_specs[a] for a in self._listeners],
            listener_errors=[
                (self._listener_specs[a], e) for a, e in self._listener_errors.items()
            ],
            conflicts=self.platform.conflicts(),
            platform=self.platform.status(),
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        grant_runner = None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.gateway.run(), name="gateway")
                await self.gateway.started()
                if "grant" in self.components:
                    server = links.GrantServer(
                        self.identity,
                        cfg.state_dir,
                        [str(a) for a in cfg.advertise],
                        cert_lifetime=timedelta(seconds=cfg.link_cert_lifetime),
                    )
                    grant_runner = await links.start_grant_server(
                        server, cfg.grant_listen.host, cfg.grant_listen.port
                    )
                if "dns" in self.components and cfg.dns.enabled:
                    self.dns = await dns_run.start_server(
                        self._dns_builder.build(()),
                        cfg.dns.listen.host,
                        cfg.dns.listen.port,
                    )
                if "ops" in self.components:
                    self.ops = OpsServer(
                        status=self.status, ready=self.ready, registry=self.metrics.registry
                    )
                    await self.ops.start(cfg.ops_listen.host, cfg.ops_listen.port)
                tg.create_task(self._state_loop(), name="link-records")
                tg.create_task(self._reconcile_loop(), name="reconcile")
                tg.create_task(self._imports_loop(), name="imports")
                tg.create_task(self.platform.run(self.publish, self.on_view), name="platform")
                self._ready_reason = "ok"
                dns_run.settle_heap()  # keep full GCs off the DNS answer path
                log.info(
                    "site %s up: gateway %s, grant %s, dns %s, ops %s",
                    self.site,
                    cfg.gateway_listen,
                    cfg.grant_listen if grant_runner else "off",
                    cfg.dns.listen if self.dns else "off",
                    cfg.ops_listen if self.ops else "off",
                )
        finally:
            for listener in self._listeners.values():
                await listener.close()
            self._listeners.clear()
            if self.dns is not None:
                await self.dns.close()
            if self.ops is not None:
                await self.ops.close()
            if grant_runner is not None:
                await grant_runner.cleanup()


async def run_site(config: SiteConfig, components: frozenset[str] = ALL_COMPONENTS) -> None:
    """Run a site until SIGINT/SIGTERM."""
    runtime = SiteRuntime(config, components)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        await runtime.run()
    except asyncio.CancelledError:
        log.info("site %s stopped", config.site)


async def run_dns(path: str, host: str, port: int, *, zone: str, ttl: int) -> None:
    """`meshlink dns`: serve a records file (reloaded when it changes) until SIGINT/SIGTERM."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await dns_run.serve_file(path, host, port, zone=zone, ttl=ttl)
