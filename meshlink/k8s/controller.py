"""The MCS controller of one cluster: a composition of the watch caches and two reconcilers.

``ExportReconciler`` (k8s/exports.py) turns ServiceExports into the export records handed
to ``publish``; ``ImportReconciler`` (k8s/imports.py) turns the clusterset's catalog
(``update_catalog``) into derived Services, ServiceImports and EndpointSlices, and import
views handed to ``on_view``. Each has its own work queue and state; both read the watch
caches (k8s/caches.py) and the catalog as last received (k8s/clusterset.py). The
controller checks the cluster id, runs the watches and queues, and orders the start:
caches complete, then exports evaluated and published (never a partial set), then imports
once the first catalog is in (before it, every import would look orphaned).

With ``kubernetes.leaderElection`` several replicas run this controller and only the holder
of the Lease writes (k8s/lease.py): every write goes through a fenced ``Kube``, and the
reconcilers of the others observe instead (their caches and views stay warm, so a new
holder starts from them). Each replica publishes the same export records either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Final

from kubernetes_asyncio.client import ApiClient

from meshlink.catalog.records import ExportRecord, ServiceKey
from meshlink.catalog.view import ImportedService, ListenerSpec, OnView, PlatformStatus, Publish
from meshlink.config import KubernetesConfig, SiteConfig
from meshlink.errors import ConfigError
from meshlink.k8s import model
from meshlink.k8s.api import CLUSTER_PROPERTY, Kube, NotFound, NotLeader, Unavailable
from meshlink.k8s.caches import Caches
from meshlink.k8s.clusterset import ClustersetCatalog
from meshlink.k8s.exports import ConditionsHook, ExportReconciler
from meshlink.k8s.imports import ImportReconciler
from meshlink.k8s.lease import LeaderElection, replica_id
from meshlink.k8s.ports import PortAllocator
from meshlink.k8s.watch import ApiHealth
from meshlink.k8s.workqueue import WorkQueue
from meshlink.names import is_dns_label

log = logging.getLogger(__name__)

CLUSTER_ID_PROPERTY: Final = "cluster.clusterset.k8s.io"


class Controller:
    """One cluster's MCS controller. Drive it with ``run()`` and feed it ``update_catalog``."""

    def __init__(
        self,
        api: ApiClient,
        config: SiteConfig,
        *,
        publish: Publish,
        on_view: OnView | None = None,
        on_conditions: ConditionsHook | None = None,
        workers: int = 24,
    ):
        self.config = config
        self.kconfig = config.kubernetes or KubernetesConfig()
        host = getattr(getattr(api, "configuration", None), "host", "?")
        self.election: LeaderElection | None = None
        if self.kconfig.leader_election:
            self.election = LeaderElection(
                Kube(api, self.kconfig.request_timeout),
                self.kconfig.namespace,
                replica_id(),
                duration=self.kconfig.lease_duration,
                on_change=self._leadership,
            )
        self.kube = Kube(
            api,
            self.kconfig.request_timeout,
            fence=self.election.leading if self.election is not None else None,
        )
        self.health = ApiHealth(str(host))
        self.cluster_id: str | None = None
        self.caches = Caches(self.kube, self.health, self.kconfig)
        self.catalog = ClustersetCatalog()
        self._catalog_seen = asyncio.Event()
        self._synced = asyncio.Event()
        self.ports = PortAllocator(*self.kconfig.import_ports)
        self.export_side = ExportReconciler(
            self.kube,
            self.caches,
            self.catalog,
            publish=publish,
            export_kube_system=self.kconfig.export_kube_system,
            workers=workers,
            transient=self._transient,
            on_conditions=on_conditions,
            leading=self.leading,
        )
        self.import_side = ImportReconciler(
            self.kube,
            self.caches,
            self.catalog,
            ports=self.ports,
            bind=self.kconfig.import_address,
            workers=workers,
            transient=self._transient,
            on_view=on_view,
            owner_namespace=self.kconfig.namespace,
            leading=self.leading,
        )

    def leading(self) -> bool:
        """Whether this replica writes (always, without leader election)."""
        return self.election is None or self.election.leading()

    def _leadership(self, leading: bool) -> None:
        if leading and self._synced.is_set():
            self.import_side.became_leader()
            self.export_side.resync()

    def _transient(self, e: Exception) -> bool:
        if isinstance(e, NotLeader):
            return True  # the next run observes instead
        if isinstance(e, Unavailable):
            self.health.failed(e)  # one line while the API server is away, not one per key
            return True
        return False

    # ------------------------------------------------------------------ public interface

    @property
    def export_queue(self) -> WorkQueue[ServiceKey]:
        return self.export_side.queue

    @property
    def import_queue(self) -> WorkQueue[ServiceKey]:
        return self.import_side.queue

    @property
    def records(self) -> tuple[ExportRecord, ...]:
        return self.export_side.records

    @property
    def imports(self) -> tuple[ImportedService, ...]:
        return self.import_side.imports

    @property
    def listeners(self) -> tuple[ListenerSpec, ...]:
        """The gateway listeners the imports need: one per imported TCP port of every
        ClusterSetIP import, on ``kubernetes.importAddress`` and the port its derived
        Service targets. Changes are announced through ``on_view`` like the imports."""
        return self.import_side.listeners

    async def resolve_cluster_id(self) -> str:
        """The MCS cluster id: the ClusterProperty ``cluster.clusterset.k8s.io`` when it
        exists (it must then equal the configured site id, which the gateway certificate
        carries), else the configured site id."""
        site = self.config.site
        try:
            prop = await self.kube.get(CLUSTER_PROPERTY, CLUSTER_ID_PROPERTY)
        except NotFound:
            self.cluster_id = site
            return site
        value = (prop.get("spec") or {}).get("value")
        if not is_dns_label(value):
            raise ConfigError(
                f"ClusterProperty {CLUSTER_ID_PROPERTY} has value {value!r}, which is not a "
                "DNS label of at most 63 characters; fix the ClusterProperty"
            )
        if value != site:
            raise ConfigError(
                f"ClusterProperty {CLUSTER_ID_PROPERTY} says the cluster id is {value!r} but "
                f"this site is configured as {site!r} (the id its gateway certificate carries);"
                " make them equal",
                key="site",
                source=self.config.source,
            )
        self.cluster_id = value
        return value

    async def wait_synced(self) -> None:
        """Returns once every initial list is done and the cluster id is known."""
        await self._synced.wait()

    def update_catalog(self, records: Mapping[ServiceKey, Sequence[ExportRecord]]) -> None:
        """Every live record of the clusterset (ours included), grouped by service."""
        changed = self.catalog.update(records)
        self.import_side.catalog_changed(changed)
        self.export_side.catalog_changed(changed)
        self._catalog_seen.set()

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        """Where a flow that arrived over a link for our export ``namespace/name:port`` goes
        (the exported Service's ClusterIP, or a ready endpoint of a headless one)."""
        return self.export_side.local_endpoint(namespace, name, port)

    def status(self) -> PlatformStatus:
        """What `meshlink status` and `meshlink check` show of the controller."""
        # Unreachable once announced (failing for a couple of seconds), not at one failure.
        down = self.health.down and self.health.announced
        down_for = time.monotonic() - self.health.down_since if down else None
        return {
            "api_server": self.health.name,
            "cluster_id": self.cluster_id,
            "reachable": not down,
            "unreachable_for_s": None if down_for is None else round(down_for, 1),
            "synced": self._synced.is_set(),
            "exports": len(self.export_side),
            "imports": len(self.import_side),
            "import_ports": len(self.import_side.ports),
            "queued": len(self.export_queue) + len(self.import_queue),
            "writes": sum(n for k, n in self.kube.requests.items() if _is_write(k)),
            "fenced": sum(n for k, n in self.kube.requests.items() if k.startswith("fenced ")),
            "replicas": model.replica_pods(self.caches.pods.cache.values()),
            **self._leader_status(),
        }

    def _leader_status(self) -> PlatformStatus:
        if self.election is None:
            return {}
        view = self.election.view
        return {
            "replica": self.election.identity,
            "leading": self.election.leading(),
            "leader": view.holder,
            "lease_transitions": view.transitions,
        }

    def idle(self) -> bool:
        """No reconcile queued or running (for tests and benchmarks)."""
        return not len(self.export_queue) and not len(self.import_queue)

    async def run(self) -> None:
        """Watch and reconcile until cancelled."""
        delay = 0.2
        while self.cluster_id is None:
            try:
                await self.resolve_cluster_id()
            except Unavailable as e:
                self.health.failed(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.info(
            "controller for cluster %s starting (API server %s)", self.cluster_id, self.health.name
        )
        async with asyncio.TaskGroup() as tg:
            for w in self.caches.all:
                tg.create_task(w.run(), name=f"watch-{w.res.plural}")
            tg.create_task(self.export_queue.run(), name="export-queue")
            tg.create_task(self._startup(tg), name="controller-startup")

    async def _startup(self, tg: asyncio.TaskGroup) -> None:
        await self.caches.synced()
        assert self.cluster_id is not None
        self.export_side.start(self.cluster_id)
        self._synced.set()
        self.import_side.synced = True
        tg.create_task(self.export_side.publisher.run(), name="publisher")
        if self.election is not None:
            # Only a replica whose caches are complete may lead: it writes from them.
            tg.create_task(self.election.run(), name="leader-election")
        log.info(
            "cluster %s: initial lists done (%d exports, %d namespaces)",
            self.cluster_id,
            len(self.caches.exports.cache),
            len(self.caches.namespaces.cache),
        )
        self.import_side.seed_ports()
        log.info("cluster %s: %d import ports in use", self.cluster_id, len(self.import_side.ports))
        await self._catalog_seen.wait()
        self.import_side.requeue_all()
        tg.create_task(self.import_queue.run(), name="import-queue")
        tg.create_task(self._resync(), name="resync")

    async def _resync(self) -> None:
        """Every ``resyncSeconds``, look at every key again: anything missed (an event lost
        to a bug, an object deleted by hand) is put back, anything orphaned goes. Unchanged
        objects cost no request (their applied hash matches)."""
        while True:
            await asyncio.sleep(self.kconfig.resync_seconds)
            self.export_side.resync()
            self.import_side.requeue_all()


def _is_write(request: str) -> bool:
    return request.split(" ", 1)[0] in {"apply", "patch", "create", "update", "delete"}
