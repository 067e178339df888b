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
import signal
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Final

from meshlink import links, status
from meshlink.catalog.records import ExportRecord
from meshlink.catalog.sync import Catalog
from meshlink.config import SiteConfig
from meshlink.dns import run as dns_run
from meshlink.errors import MeshlinkError
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
    make_platform,
    peer_authorizer,
)
from meshlink.site.memory import SAVE_EVERY
from meshlink.site.platforms import follow_store, instance_id, open_store
from meshlink.site.reload import reload
from meshlink.tasks import cancel_on_signals, every, expected_error, on_signal
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


class SiteRuntime:
    """One site: every component of `meshlink run` in one event loop. ``config_path``:
    where SIGHUP reads the configuration again (``site.reload``)."""

    def __init__(
        self,
        config: SiteConfig,
        components: frozenset[str] = ALL_COMPONENTS,
        config_path: Path | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.components = components
        self.started = time.time()
        self.instance = instance_id(config)
        self.metrics = Metrics()
        self.store = open_store(config)
        self.identity = CurrentIdentity(self.store, config.site)
        self.platform = make_platform(config, components)
        self.catalog = Catalog(
            config.site,
            gateway_endpoints=[str(a) for a in config.advertise],
            grace=config.import_grace_period,
            hold_until_local=True,  # the platform's first publish releases the snapshots
        )
        self.memory = CatalogMemory(config.state_dir, self.catalog)
        self.control = ControlChannel(
            self.catalog,
            identity=self.identity,
            renewals=links.Renewals(
                self.store, lifetime=timedelta(seconds=config.link_cert_lifetime)
            ),
            metrics=self.metrics,
            on_services=self.platform.catalog_changed,
            on_unlinked=lambda peer: self.links.unlinked_by(peer),
        )
        self.router = Router(config.site, self.catalog, self.platform)
        tls = links.reloading_gateway_context(lambda: self.identity.current)
        self.gateway = Gateway(
            config.site,
            listen=(config.gateway_listen.host, config.gateway_listen.port),
            server_context=tls.refresh,
            authorize=peer_authorizer(self.store),
            handler=self.control,
            route=self.router.route,
            heartbeat_interval=config.heartbeat_interval,
            max_streams=config.max_streams_per_link,
            new_flows_per_second=config.new_flows_per_second,
            instance=self.instance,
            replicas=config.replicas,
            open_links=False,  # opened by the platform's first publish (_publish)
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
            self.store, self.identity, self.gateway, self.catalog.peers, self.control.unlink
        )
        self.certs = LinkCerts(self.store, self.identity, self.gateway.live_peers)
        self.ops: OpsServer | None = None
        self._ready_reason = "starting"

    # -- what the ops server serves ------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        starting = self._ready_reason if self._ready_reason != "ok" else None
        why = starting or self.control.not_ready() or self.platform.not_ready()
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
            instance=self.instance,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        grant: links.RunningGrant | None = None
        self.memory.load()
        on_signal(signal.SIGHUP, self.reload)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.gateway.run(), name="gateway")
                await self.gateway.started()
                if "grant" in self.components:
                    grant = await links.start_site_grant(self.identity.current, cfg)
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
                    self.platform.run(self._publish, self.imports.apply), name="platform"
                )
                self._ready_reason = "ok"
                dns_run.settle_heap()  # keep full GCs off the DNS answer path
                log.info("site %s up: %s", cfg.site, self._served(grant is not None))
        finally:
            self.memory.save()
            await self.imports.close()
            if self.ops is not None:
                await self.ops.close()
            if grant is not None:
                await grant.cleanup()
            self.store.close()

    def _publish(self, records: Sequence[ExportRecord]) -> None:
        """This site's exports, from its platform. The first set opens the gateway: from
        then on this process can route the flows a link brings (and its catalog speaks)."""
        self.control.publish(records)
        self.gateway.open()

    def _served(self, grant: bool) -> str:
        c = self.config
        on = {"grant": grant, "dns": self.imports.dns is not None, "ops": self.ops is not None}
        addrs = {"grant": c.grant_listen, "dns": c.dns.listen, "ops": c.ops_listen}
        parts = [f"gateway {c.gateway_listen}"]
        return ", ".join(parts + [f"{k} {addrs[k] if on[k] else 'off'}" for k in addrs])

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what can be (``site.reload``)."""
        if self.config_path is None:
            log.warning("SIGHUP: this site was started without a configuration file to read")
            return
        self.config = reload(self.config_path, self.config, self.platform, self.catalog)

    def _spawn_jobs(self, tg: asyncio.TaskGroup) -> None:
        records, gateway = self.links.records, self.gateway
        jobs: tuple[tuple[str, float, Callable[[], object], float], ...] = (
            ("link-records", LINK_POLL, self.links.poll, 0.0),
            ("link-metrics", LINK_POLL, lambda: self.metrics.observe_links(gateway.status()), 0),
            # After the first poll has read the records (each job is its own task).
            ("renewal", RENEW_CHECK, lambda: self.control.renew(records()), LINK_POLL),
            ("link-certificates", RENEW_CHECK, lambda: self.certs.check(records()), LINK_POLL),
            ("grace-period", GRACE_CHECK, self.control.expire, GRACE_CHECK),
            ("catalog-memory", SAVE_EVERY, self.memory.save, SAVE_EVERY),
            # Re-issues the gateway certificate when two thirds of its life are used.
            ("identity", IDENTITY_RELOAD, self.identity.reload, IDENTITY_RELOAD),
            ("listener-retry", LISTENER_RETRY, self.imports.retry, LISTENER_RETRY),
        )
        for name, interval, job, first in jobs:
            tg.create_task(every(interval, job, first=first), name=name)
        tg.create_task(follow_store(self.store), name="state-refresh")


async def run_site(
    config: SiteConfig,
    components: frozenset[str] = ALL_COMPONENTS,
    config_path: Path | None = None,
) -> None:
    """Run a site until SIGINT/SIGTERM (SIGHUP reads ``config_path`` again)."""
    runtime = SiteRuntime(config, components, config_path)
    cancel_on_signals()
    try:
        await runtime.run()
    except asyncio.CancelledError:
        log.info("site %s stopped", config.site)
    except BaseExceptionGroup as group:
        err = expected_error(group, MeshlinkError)
        if err is None:
            raise
        raise err from None


async def run_dns(path: str, host: str, port: int, *, zone: str, ttl: int) -> None:
    """`meshlink dns`: serve a records file (reloaded when it changes) until SIGINT/SIGTERM."""
    cancel_on_signals()
    with contextlib.suppress(asyncio.CancelledError):
        await dns_run.serve_file(path, host, port, zone=zone, ttl=ttl)
