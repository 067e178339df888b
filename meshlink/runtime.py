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
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshlink import __version__, links, pki
from meshlink.catalog.records import ExportRecord
from meshlink.catalog.sync import Catalog, Send
from meshlink.catalog.view import ImportedService, ListenerSpec
from meshlink.config import SiteConfig
from meshlink.dns import run as dns_run
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import SnapshotBuilder
from meshlink.errors import CatalogError, MeshlinkError
from meshlink.local.site import LocalSite
from meshlink.ops.server import OpsServer
from meshlink.proto import MAX_CONTROL, FlowTarget
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
CONTROL_LIMIT: Final = MAX_CONTROL // 2
"""Catalog messages above this are split (control frames are at most 1 MiB; a record at
its limits, 1,000 endpoints, is about 80 KiB)."""


def encode_control(message: dict[str, Any], limit: int = CONTROL_LIMIT) -> list[bytes]:
    """JSON-encode a catalog update, halving its add/del lists until every part fits.

    An entry too large on its own (which the record limits make impossible in practice) is
    dropped with one log line rather than sent to be refused by the peer."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) <= limit:
        return [payload]
    adds, dels = message.get("add", []), message.get("del", [])
    if len(adds) + len(dels) <= 1:
        log.error("catalog entry of %d bytes exceeds %d: not sent", len(payload), limit)
        return []
    parts: list[bytes] = []
    for half in (
        {"add": adds[: len(adds) // 2], "del": dels[: len(dels) // 2]},
        {"add": adds[len(adds) // 2 :], "del": dels[len(dels) // 2 :]},
    ):
        msg = {"t": message["t"], **{k: v for k, v in half.items() if v}}
        if len(msg) > 1:
            parts += encode_control(msg, limit)
    return parts


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
        self.local = LocalSite(config) if config.kubernetes is None else None
        self.controller: Any = None
        self.gateway = Gateway(
            config.site,
            listen=(config.gateway_listen.host, config.gateway_listen.port),
            server_context=self._server_context,
            authorize=self._authorize,
            handler=self,
            heartbeat_interval=config.heartbeat_interval,
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
        self._controller_view: tuple[tuple[ImportedService, ...], tuple[ListenerSpec, ...]] = (
            (),
            (),
        )
        self._controller_dirty = asyncio.Event()
        self._seen_generation = -1
        self._ready_reason = "starting"
        self._renewal_pending: set[str] = set()

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
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise CatalogError("control message is not a JSON object")
            kind = msg.get("t")
            if kind == "update":
                sends, refused = self.catalog.receive(peer_site, msg)
                self._observe_propagation(msg)
                for line in refused:
                    self.metrics.refused.inc()
                    log.warning("catalog entry refused %s", line)
                self._send(sends)
                self._changed()
            elif kind == "renew":
                self._answer_renewal(peer_site, msg)
            elif kind == "renewed":
                self._store_renewal(peer_site, msg)
            else:
                raise CatalogError(f"unknown control message type {kind!r}")
        except (ValueError, MeshlinkError) as e:
            log.warning("bad control message from %s: %s", peer_site, e)

    # -- link certificate renewal over the link ------------------------------------------

    def _answer_renewal(self, peer_site: str, msg: dict[str, Any]) -> None:
        csr = msg.get("csr")
        if not isinstance(csr, str) or len(csr) > 16384:
            raise CatalogError("renew without a CSR")
        cert = links.sign_renewal(
            self.identity,
            self.config.state_dir,
            peer_site,
            csr,
            lifetime=timedelta(seconds=self.config.link_cert_lifetime),
        )
        self.gateway.send_control(peer_site, json.dumps({"t": "renewed", "cert": cert}).encode())
        log.info("renewed the link certificate of peer %s", peer_site)

    def _store_renewal(self, peer_site: str, msg: dict[str, Any]) -> None:
        cert = msg.get("cert")
        rec = links.find_link_to(self.config.state_dir, peer_site)
        if rec is None or not isinstance(cert, str) or len(cert) > 16384:
            raise CatalogError(f"unexpected renewed certificate from {peer_site}")
        links.store_renewed_cert(self.identity, self.config.state_dir, rec.name, cert)
        self._renewal_pending.discard(peer_site)
        log.info("link certificate for %s renewed", peer_site)

    def _renew_links(self, records: Sequence[links.LinkRecord]) -> None:
        live = set(self.gateway.live_peers())
        for rec in records:
            if (
                rec.peer_site in live
                and rec.peer_site not in self._renewal_pending
                and links.link_renewal_due(self.config.state_dir, rec.name)
            ):
                csr = links.renewal_csr(self.identity)
                payload = json.dumps({"t": "renew", "csr": csr}).encode()
                if self.gateway.send_control(rec.peer_site, payload):
                    self._renewal_pending.add(rec.peer_site)
                    log.info("asked %s to renew our link certificate", rec.peer_site)

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
        if self.local is not None:
            return self.local.local_endpoint(target.namespace, target.name, target.port)
        if self.controller is not None:
            found: tuple[str, int] | None = self.controller.local_endpoint(
                target.namespace, target.name, target.port
            )
            return found
        return None

    # -- catalog plumbing ----------------------------------------------------------------

    def _send(self, sends: Sequence[Send]) -> None:
        for s in sends:
            for payload in encode_control(s.message):
                self.gateway.send_control(s.peer, payload)

    def _observe_propagation(self, msg: dict[str, Any]) -> None:
        now = time.time_ns()
        for entry in msg.get("add", ()):
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
            services = self.catalog.services()
            if self.local is not None:
                if self.local.update(services):
                    await self._set_imports(self.local.imports, self.local.listeners)
            elif self.controller is not None:
                self.controller.update_catalog(services)
            self.metrics.sites.set(len(self.catalog.sites()))

    def on_controller_imports(self, imports: tuple[ImportedService, ...]) -> None:
        """The controller's import state changed: DNS and listeners follow (in that task,
        listeners first, so a name never resolves before its traffic has a listener)."""
        specs: tuple[ListenerSpec, ...] = self.controller.listeners if self.controller else ()
        self._controller_view = (imports, specs)
        self._controller_dirty.set()

    async def _controller_imports_loop(self) -> None:
        while True:
            await self._controller_dirty.wait()
            self._controller_dirty.clear()
            t0 = time.monotonic()
            await self._set_imports(*self._controller_view)
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
                            "imports.pool" if self.local is not None else "kubernetes.importPorts",
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
                if ticks % 1200 == 0:
                    self._renewal_pending.clear()  # retry unanswered renewals every 10 min
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
        k = self._kubernetes_status()
        if self._ready_reason == "ok" and k is not None and not k.get("synced"):
            # Until its first lists are done the import state is empty: DNS would answer
            # NXDOMAIN for every clusterset name (and resolvers would cache that).
            return (False, "the Kubernetes controller has not finished its first lists")
        return (self._ready_reason == "ok", self._ready_reason)

    def status(self) -> dict[str, Any]:
        sites = self.catalog.sites()
        services = self.catalog.services()
        return {
            "site": self.site,
            "version": __version__,
            "mode": "local" if self.local is not None else "kubernetes",
            "uptime_s": round(time.time() - self.started, 1),
            "gateway": str(self.config.gateway_listen),
            "grant": str(self.config.grant_address),
            "dns": str(self.config.dns.listen) if self.dns is not None else None,
            "zone": self.config.dns.zone,
            "ca_pin": self.identity.pin,
            "links": [
                {
                    "peer": st.peer_site,
                    "direction": st.direction,
                    "state": st.state,
                    "rtt_ms": st.rtt_ms,
                    "since": st.since,
                    "flows": st.flows_open,
                    "bytes_in": st.bytes_in,
                    "bytes_out": st.bytes_out,
                    "last_error": st.last_error,
                }
                for st in self.gateway.status()
            ],
            "sites": [
                {"site": r.site, "hops": r.hops, "via": r.via, "path": list(r.path)}
                for r in sorted(sites.values(), key=lambda r: (r.hops, r.site))
            ],
            "exports": [
                {"service": str(k), "ports": [p.port for p in r.ports]}
                for k, recs in sorted(services.items())
                for r in recs
                if r.origin == self.site
            ][:1000],
            "imports": [
                {
                    "service": f"{i.namespace}/{i.name}",
                    "name": f"{i.name}.{i.namespace}.svc.{self.config.dns.zone}",
                    "type": i.type.value,
                    "ips": list(i.ips),
                    "ports": [p.port for p in i.ports],
                    "clusters": [c.cluster for c in i.clusters],
                    "reachable": [c.cluster for c in i.clusters if c.cluster in sites],
                }
                for i in self.imports
            ][:1000],
            "listeners": [self._listener_row(a) for a in sorted(self._listeners)][:1000],
            "listener_errors": [
                self._listener_row(a) | {"error": err}
                for a, err in sorted(self._listener_errors.items())
            ][:100],
            "conflicts": self._conflicts(),
            "kubernetes": self._kubernetes_status(),
        }

    def _kubernetes_status(self) -> dict[str, Any] | None:
        if self.local is not None or "controller" not in self.components:
            return None
        if self.controller is None:  # not started yet
            return {"api_server": None, "reachable": None, "synced": False}
        status: dict[str, Any] = self.controller.status()
        return status

    def _listener_row(self, addr: tuple[str, int]) -> dict[str, Any]:
        # Every listener and listener error has its spec: _apply_listeners keeps both
        # within _listener_specs' keys (under the lock, with no await in between).
        spec = self._listener_specs[addr]
        return {
            "address": f"{addr[0]}:{addr[1]}",
            "service": str(spec.key),
            "port": spec.service_port,
        }

    def _conflicts(self) -> list[dict[str, Any]]:
        if self.local is None:
            return []
        return [
            {"service": str(k), "reasons": list(m.conflicts), "winner": m.winner.origin}
            for k, m in sorted(self.local.merged.items())
            if m.conflicts
        ]

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
                if self.local is not None:
                    self.publish(self.local.export_records())
                elif "controller" in self.components:
                    tg.create_task(self._run_controller(), name="controller")
                    tg.create_task(self._controller_imports_loop(), name="controller-imports")
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

    async def _run_controller(self) -> None:
        from kubernetes_asyncio import config as kconfig

        from meshlink.k8s import Controller

        kube = self.config.kubernetes
        assert kube is not None
        if kube.kubeconfig is None:
            kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
            from kubernetes_asyncio.client import ApiClient

            api = ApiClient()
        else:
            api = await kconfig.new_client_from_config(str(kube.kubeconfig), context=kube.context)
        async with api:
            self.controller = Controller(
                api, self.config, publish=self.publish, on_imports=self.on_controller_imports
            )
            site_id = await self.controller.resolve_cluster_id()
            if site_id != self.site:
                raise MeshlinkError(
                    f"cluster id {site_id} (ClusterProperty) differs from site {self.site}"
                )
            # Imports (and orphan clean-up) start with the first catalog view, even empty.
            self.controller.update_catalog(self.catalog.services())
            await self.controller.run()


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
