"""The process runtime of `meshlink run`: builds a site's parts, runs them as named tasks of
one TaskGroup, and tears them down; also signals, readiness and the status it serves.

The parts, each an object with its own state (``meshlink.site``):
- the platform (``LocalSite`` or ``KubernetesPlatform``): exports in, import views out;
- the catalog and its ``ControlChannel`` (the gateway's handler: link up and down, control
  messages, renewal), which hands the platform the clusterset's services;
- the ``Router`` (where a flow goes) and the ``Gateway`` (links and flows);
- the ``ImportPlane`` (the platform's import views become listeners and DNS);
- the ``LinkSet`` (the link records the CLI writes) and the periodic jobs;
- the grant endpoint and the ops server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from typing import Final

from meshlink import links, pki, status
from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import Platform
from meshlink.config import SiteConfig
from meshlink.dns import run as dns_run
from meshlink.errors import MeshlinkError
from meshlink.local.site import LocalSite
from meshlink.ops.server import OpsServer
from meshlink.site import (
    CatalogMemory,
    ControlChannel,
    CurrentIdentity,
    ImportPlane,
    LinkCerts,
    LinkSet,
    Metrics,
    Router,
    peer_authorizer,
)
from meshlink.site.memory import SAVE_EVERY
from meshlink.tasks import cancel_on_signals, every
from meshlink.tunnel import Gateway

log = logging.getLogger(__name__)

ALL_COMPONENTS: Final = frozenset({"gateway", "controller", "dns", "ops", "grant"})
LINK_POLL: Final = 0.5
"""Seconds between looks at the link and peer records the CLI writes."""
RENEW_CHECK: Final = 10.0
IDENTITY_RELOAD: Final = 3600.0
LISTENER_RETRY: Final = 5.0
GRACE_CHECK: Final = 1.0
"""Seconds between looks for records whose grace period is over."""


def make_platform(config: SiteConfig, components: frozenset[str]) -> Platform:
    if config.kubernetes is None:
        return LocalSite(config)
    from meshlink.k8s.platform import KubernetesPlatform  # kubernetes_asyncio is heavy

    return KubernetesPlatform(config, controller="controller" in components)


class SiteRuntime:
    """One site: every component of `meshlink run` in one event loop."""

    def __init__(self, config: SiteConfig, components: frozenset[str] = ALL_COMPONENTS):
        self.config = config
        self.components = components
        self.started = time.time()
        self.metrics = Metrics()
        self.identity = CurrentIdentity(config.state_dir, config.site)
        self.platform = make_platform(config, components)
        self.catalog = Catalog(
            config.site,
            gateway_endpoints=[str(a) for a in config.advertise],
            grace=config.import_grace_period,
        )
        self.memory = CatalogMemory(config.state_dir, self.catalog)
        self.control = ControlChannel(
            self.catalog,
            identity=self.identity,
            renewals=links.Renewals(
                config.state_dir, lifetime=timedelta(seconds=config.link_cert_lifetime)
            ),
            metrics=self.metrics,
            on_services=self.platform.catalog_changed,
            on_unlinked=lambda peer: self.links.unlinked_by(peer),
        )
        self.router = Router(config.site, self.catalog, self.platform)
        ident = self.identity.current
        # Peers present client certificates our CA signed at redemption: trust only it. The
        # context follows the files (the hourly reload may re-issue the gateway certificate)
        # and is rebuilt only when they change, as the grant endpoint's is.
        tls = pki.ReloadingServerContext(
            lambda: links.gateway_server_context(self.identity.current),
            [ident.gateway_cert_path, ident.gateway_key_path, ident.ca_cert_path],
        )
        self.gateway = Gateway(
            config.site,
            listen=(config.gateway_listen.host, config.gateway_listen.port),
            server_context=tls.refresh,
            authorize=peer_authorizer(config.state_dir),
            handler=self.control,
            route=self.router.route,
            heartbeat_interval=config.heartbeat_interval,
            max_streams=config.max_streams_per_link,
            new_flows_per_second=config.new_flows_per_second,
        )
        self.control.attach(self.gateway)
        self.router.attach(self.gateway)
        self.imports = ImportPlane(
            self.gateway,
            self.router.candidates,
            zone=config.dns.zone,
            ttl=config.dns.ttl,
            import_range=self.platform.import_range,
            metrics=self.metrics,
        )
        self.links = LinkSet(
            config, self.identity, self.gateway, self.catalog.peers, self.control.unlink
        )
        self.certs = LinkCerts(config.state_dir, self.identity, self.gateway.live_peers)
        self.ops: OpsServer | None = None
        self._ready_reason = "starting"

    # -- what the ops server serves ------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._ready_reason != "ok":
            return (False, self._ready_reason)
        if not self.control.synced:
            # Until then the platform has no catalog: DNS would answer NXDOMAIN for names
            # a peer exports (and resolvers would cache that).
            waiting = ", ".join(self.control.waiting_for) or "its peers"
            return (False, f"waiting for the catalog of {waiting}")
        why = self.platform.not_ready()
        return (False, why) if why is not None else (True, "ok")

    def status(self) -> status.SiteStatus:
        return status.collect(
            config=self.config,
            mode=self.platform.mode,
            started=self.started,
            dns_served=self.imports.dns is not None,
            ca_pin=self.identity.current.pin,
            links=self.gateway.status(),
            catalog=self.catalog,
            imports=self.imports.imports,
            listeners=self.imports.listeners(),
            listener_errors=self.imports.errors(),
            conflicts=self.platform.conflicts(),
            platform=self.platform.status(),
            identity=self.identity.current,
            link_certs=self.certs.states(),
            peers=self.links.peer_records,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        grant: links.RunningGrant | None = None
        self.memory.load()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.gateway.run(), name="gateway")
                await self.gateway.started()
                if "grant" in self.components:
                    grant = await self._start_grant()
                if "dns" in self.components and cfg.dns.enabled:
                    await self.imports.start_dns(cfg.dns.listen.host, cfg.dns.listen.port)
                if "ops" in self.components:
                    self.ops = OpsServer(
                        status=self.status,
                        ready=self.ready,
                        registry=self.metrics.registry,
                        probe=lambda: status.probe_exports(self.platform.export_targets()),
                    )
                    await self.ops.start(cfg.ops_listen.host, cfg.ops_listen.port)
                self._spawn_jobs(tg)
                tg.create_task(self.control.run(self.links.on_record), name="catalog-feed")
                tg.create_task(self.imports.run(), name="imports")
                tg.create_task(
                    self.platform.run(self.control.publish, self.imports.apply), name="platform"
                )
                self._ready_reason = "ok"
                dns_run.settle_heap()  # keep full GCs off the DNS answer path
                log.info(
                    "site %s up: gateway %s, grant %s, dns %s, ops %s",
                    cfg.site,
                    cfg.gateway_listen,
                    cfg.grant_listen if grant else "off",
                    cfg.dns.listen if self.imports.dns else "off",
                    cfg.ops_listen if self.ops else "off",
                )
        finally:
            self.memory.save()
            await self.imports.close()
            if self.ops is not None:
                await self.ops.close()
            if grant is not None:
                await grant.cleanup()

    def _spawn_jobs(self, tg: asyncio.TaskGroup) -> None:
        def renew() -> None:
            self.control.renew(self.links.records)

        def observe_links() -> None:
            self.metrics.observe_links(self.gateway.status())

        async def link_certs() -> None:
            await self.certs.check(self.links.records)

        jobs = (
            ("link-records", LINK_POLL, self.links.poll, 0.0),
            ("link-metrics", LINK_POLL, observe_links, 0.0),
            # After the first poll has read the records (each job is its own task).
            ("renewal", RENEW_CHECK, renew, LINK_POLL),
            ("link-certificates", RENEW_CHECK, link_certs, LINK_POLL),
            ("grace-period", GRACE_CHECK, self.control.expire, GRACE_CHECK),
            ("catalog-memory", SAVE_EVERY, self.memory.save, SAVE_EVERY),
            # Re-issues the gateway certificate when two thirds of its life are used.
            ("identity", IDENTITY_RELOAD, self.identity.reload, IDENTITY_RELOAD),
            ("listener-retry", LISTENER_RETRY, self.imports.retry, LISTENER_RETRY),
        )
        for name, interval, job, first in jobs:
            tg.create_task(every(interval, job, first=first), name=name)

    async def _start_grant(self) -> links.RunningGrant:
        cfg = self.config
        server = links.GrantServer(
            self.identity.current,
            cfg.state_dir,
            [str(a) for a in cfg.advertise],
            cert_lifetime=timedelta(seconds=cfg.link_cert_lifetime),
        )
        return await links.start_grant_server(server, cfg.grant_listen.host, cfg.grant_listen.port)


def _expected_error(group: BaseExceptionGroup[BaseException]) -> MeshlinkError | None:
    """The first MeshlinkError of a TaskGroup's group when every error in it is one (a
    listener that cannot bind, a bad ClusterProperty, ...): the one line to show. A group
    with anything else in it is a bug and keeps its traceback."""
    match, rest = group.split(MeshlinkError)
    if match is None or rest is not None:
        return None
    first: BaseException = match
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, MeshlinkError)
    return first


async def run_site(config: SiteConfig, components: frozenset[str] = ALL_COMPONENTS) -> None:
    """Run a site until SIGINT/SIGTERM."""
    runtime = SiteRuntime(config, components)
    cancel_on_signals()
    try:
        await runtime.run()
    except asyncio.CancelledError:
        log.info("site %s stopped", config.site)
    except BaseExceptionGroup as group:
        err = _expected_error(group)
        if err is None:
            raise
        raise err from None


async def run_dns(path: str, host: str, port: int, *, zone: str, ttl: int) -> None:
    """`meshlink dns`: serve a records file (reloaded when it changes) until SIGINT/SIGTERM."""
    cancel_on_signals()
    with contextlib.suppress(asyncio.CancelledError):
        await dns_run.serve_file(path, host, port, zone=zone, ttl=ttl)
