"""The MCS controller of one cluster: exports out of the API server, imports into it.

Export side: ServiceExports (and Services annotated ``meshlink.io/export: "true"``, for
which it creates and deletes the ServiceExport), their Services and EndpointSlices become
``ExportRecord``s handed to ``publish`` (always the full local set), and each ServiceExport
gets ``Valid``/``Ready``/``Conflict`` conditions.

Import side: for every service of the catalog (``update_catalog``) whose namespace exists
here, server-side apply of the derived Service, the ServiceImport (+ status) and the
EndpointSlices per source cluster; whatever meshlink manages and should not exist is
deleted. Everything is driven from watch caches through two keyed work queues, so event
bursts coalesce, concurrency is bounded, and an applied body whose hash did not change is
not sent again. A restarted controller rebuilds from the API server: the hash of each
applied body is kept in an annotation on the object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from kubernetes_asyncio.client import ApiClient

from meshlink.catalog.merge import MergedService, merge
from meshlink.catalog.records import ExportRecord, ServiceKey, ServiceType
from meshlink.catalog.view import (
    ClusterEndpoints,
    ImportedService,
    ImportView,
    ListenerSpec,
    OnView,
    PlatformStatus,
)
from meshlink.config import KubernetesConfig, SiteConfig, is_dns_label
from meshlink.errors import ConfigError
from meshlink.k8s import model
from meshlink.k8s.api import (
    CLUSTER_PROPERTY,
    ENDPOINT_SLICE,
    NAMESPACE,
    POD,
    SERVICE,
    SERVICE_EXPORT,
    SERVICE_IMPORT,
    Invalid,
    Kube,
    NotFound,
    Obj,
    Resource,
    Unavailable,
)
from meshlink.k8s.model import Condition
from meshlink.k8s.ports import PortAllocator, PortOwner
from meshlink.k8s.watch import ApiHealth, ObjKey, Watcher, trim_managed_fields
from meshlink.k8s.workqueue import WorkQueue

log = logging.getLogger(__name__)

CLUSTER_ID_PROPERTY: Final = "cluster.clusterset.k8s.io"
COALESCE_SECONDS: Final = 0.02
"""Publishing and the imports feed run at most this often: bursts become one call."""

PENDING_GRACE: Final = 1.0
"""Seconds an export may wait for the catalog before Ready=Pending is written."""

ConditionsHook = Callable[[ServiceKey, tuple[Condition, ...]], None]


def _slice_trim(obj: Obj) -> Obj:
    """Keep only what the controller reads from an EndpointSlice (memory at scale)."""
    m = obj.get("metadata") or {}
    return {
        "metadata": {
            k: m[k]
            for k in ("name", "namespace", "labels", "annotations", "resourceVersion", "uid")
            if k in m
        },
        "endpoints": [
            {k: ep[k] for k in ("addresses", "conditions", "hostname", "targetRef") if k in ep}
            for ep in obj.get("endpoints") or []
        ],
    }


class Controller:
    """One cluster's MCS controller. Drive it with ``run()`` and feed it ``update_catalog``."""

    def __init__(
        self,
        api: ApiClient,
        config: SiteConfig,
        *,
        publish: Callable[[Sequence[ExportRecord]], None],
        on_view: OnView | None = None,
        on_conditions: ConditionsHook | None = None,
        workers: int = 24,
    ):
        self.config = config
        self.kconfig = config.kubernetes or KubernetesConfig()
        host = getattr(getattr(api, "configuration", None), "host", "?")
        self.kube = Kube(api, self.kconfig.request_timeout)
        self.health = ApiHealth(str(host))
        self._publish_cb = publish
        self._on_view = on_view
        self._on_conditions = on_conditions
        self.cluster_id: str | None = None

        self.exports_w = self._watcher(SERVICE_EXPORT, self._on_export_event)
        self.services_w = self._watcher(SERVICE, self._on_service_event)
        self.slices_w = self._watcher(ENDPOINT_SLICE, self._on_slice_event, trim=_slice_trim)
        self.namespaces_w = self._watcher(NAMESPACE, self._on_namespace_event)
        self.imports_w = self._watcher(SERVICE_IMPORT, self._on_import_event)
        selector = ",".join(f"{k}={v}" for k, v in self.kconfig.gateway_selector)
        self.pods_w = self._watcher(
            POD,
            self._on_pod_event,
            namespace=self.kconfig.namespace,
            label_selector=selector,
        )
        self._watchers = (
            self.exports_w,
            self.services_w,
            self.slices_w,
            self.namespaces_w,
            self.imports_w,
            self.pods_w,
        )

        # Export side.
        self._records: dict[ServiceKey, ExportRecord] = {}
        self._evals: dict[ServiceKey, model.ExportEvaluation] = {}
        self._version = time.time_ns()
        self._local_slices: dict[ServiceKey, dict[str, Obj]] = {}
        self._publish_wanted = asyncio.Event()
        self._pending_since: dict[ServiceKey, float] = {}
        self.export_queue: WorkQueue[ServiceKey] = WorkQueue(
            "export", self._reconcile_export, workers, transient=self._transient
        )

        # Import side.
        self._catalog: dict[ServiceKey, tuple[ExportRecord, ...]] = {}
        self._merged: dict[ServiceKey, MergedService] = {}
        self._catalog_seen = asyncio.Event()
        self._managed_slices: dict[ServiceKey, set[str]] = {}
        self._applied: dict[tuple[str, str, str], str] = {}
        self._derived_ips: dict[ServiceKey, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._gateway: tuple[tuple[str, bool], ...] = ()
        self._imports: dict[ServiceKey, ImportedService] = {}
        self._listeners: dict[ServiceKey, tuple[ListenerSpec, ...]] = {}
        self.ports = PortAllocator(*self.kconfig.import_ports)
        self.import_queue: WorkQueue[ServiceKey] = WorkQueue(
            "import", self._reconcile_import, workers, transient=self._transient
        )
        self._synced = asyncio.Event()

    def _transient(self, e: Exception) -> bool:
        if isinstance(e, Unavailable):
            self.health.failed(e)  # one line while the API server is away, not one per key
            return True
        return False

    def _watcher(
        self,
        res: Resource,
        handler: Callable[[ObjKey, Obj | None, Obj | None], None],
        *,
        trim: Callable[[Obj], Obj] = trim_managed_fields,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> Watcher:
        return Watcher(
            self.kube,
            res,
            handler,
            self.health,
            namespace=namespace,
            label_selector=label_selector,
            trim=trim,
        )

    # ------------------------------------------------------------------ public interface

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
        new = {k: tuple(sorted(v, key=lambda r: r.origin)) for k, v in records.items() if v}
        old = self._catalog
        changed = [k for k, v in new.items() if old.get(k) != v]
        changed.extend(k for k in old if k not in new)
        self._catalog = new
        for key in changed:
            recs = new.get(key)
            if recs:
                self._merged[key] = merge(recs)
            else:
                self._merged.pop(key, None)
            self.import_queue.add(key)
            if key in self._evals:
                self.export_queue.add(key)
        self._catalog_seen.set()

    @property
    def records(self) -> tuple[ExportRecord, ...]:
        return tuple(self._records[k] for k in sorted(self._records))

    @property
    def imports(self) -> tuple[ImportedService, ...]:
        return tuple(self._imports[k] for k in sorted(self._imports))

    @property
    def listeners(self) -> tuple[ListenerSpec, ...]:
        """The gateway listeners the imports need: one per imported TCP port of every
        ClusterSetIP import, on ``kubernetes.importAddress`` and the port its derived
        Service targets. Changes are announced through ``on_view`` like the imports."""
        return tuple(spec for k in sorted(self._listeners) for spec in self._listeners[k])

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
            "exports": len(self._records),
            "imports": len(self._imports),
            "import_ports": len(self.ports),
            "queued": len(self.export_queue) + len(self.import_queue),
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
            for w in self._watchers:
                tg.create_task(w.run(), name=f"watch-{w.res.plural}")
            tg.create_task(self.export_queue.run(), name="export-queue")
            tg.create_task(self._startup(tg), name="controller-startup")

    async def _startup(self, tg: asyncio.TaskGroup) -> None:
        for w in self._watchers:
            await w.synced.wait()
        # Caches are complete: evaluate every export once from them, then publish the full
        # set (never a partial one, which peers would read as withdrawals).
        for ck in list(self.exports_w.cache):
            self._evaluate(ServiceKey(*ck))
        for ck, svc in list(self.services_w.cache.items()):
            if model.wants_export(svc):
                self.export_queue.add(ServiceKey(*ck))
        self._synced.set()
        tg.create_task(self._publisher(), name="publisher")
        self._publish_wanted.set()
        log.info(
            "cluster %s: initial lists done (%d exports, %d namespaces)",
            self.cluster_id,
            len(self.exports_w.cache),
            len(self.namespaces_w.cache),
        )
        self._seed_ports()
        # Imports wait for the first catalog: before it, every import would look orphaned.
        await self._catalog_seen.wait()
        for ikey in self._managed_keys() | set(self._catalog):
            self.import_queue.add(ikey)
        tg.create_task(self.import_queue.run(), name="import-queue")
        tg.create_task(self._resync(), name="resync")

    def _seed_ports(self) -> None:
        """Take the gateway ports recorded on existing derived Services, before the first
        import reconcile, so a restart moves no import to another port."""
        for svc in self.services_w.cache.values():
            key = self._import_key_of(svc) if model.is_managed(svc) else None
            if key is None:
                continue
            for proto, port, target in model.recorded_gateway_ports(svc):
                self.ports.claim(PortOwner(key, proto, port), target)
        log.info("cluster %s: %d import ports in use", self.cluster_id, len(self.ports))

    async def _resync(self) -> None:
        """Every ``resyncSeconds``, look at every key again: anything missed (an event lost
        to a bug, an object deleted by hand) is put back, anything orphaned goes. Unchanged
        objects cost no request (their applied hash matches)."""
        while True:
            await asyncio.sleep(self.kconfig.resync_seconds)
            for ck in list(self.exports_w.cache):
                self.export_queue.add(ServiceKey(*ck))
            for ikey in self._managed_keys() | set(self._catalog):
                self.import_queue.add(ikey)

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        """Where a flow that arrived over a link for our export ``namespace/name:port`` goes:
        the exported Service's ClusterIP (kube-proxy picks the endpoint), or for a headless
        export one ready endpoint address with the port's target. None if not exported."""
        key = ServiceKey(namespace, name)
        rec = self._records.get(key)
        svc = self.services_w.cache.get((namespace, name))
        if rec is None or svc is None or not any(p.port == port for p in rec.ports):
            return None
        spec = svc.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            return (str(cluster_ip), port)
        for ep in rec.endpoints:
            if ep.ready and ep.addresses:
                target = next(
                    (
                        p.get("targetPort")
                        for p in spec.get("ports") or ()
                        if p.get("port") == port and isinstance(p.get("targetPort"), int)
                    ),
                    port,
                )
                return (ep.addresses[0], int(target))
        return None

    def _managed_keys(self) -> set[ServiceKey]:
        keys: set[ServiceKey] = set(self._managed_slices)
        for (ns, name), si in self.imports_w.cache.items():
            if model.is_managed(si):
                keys.add(ServiceKey(ns, name))
        for svc in self.services_w.cache.values():
            if model.is_managed(svc) and (k := self._import_key_of(svc)) is not None:
                keys.add(k)
        return keys

    # ------------------------------------------------------------------ publishing

    async def _publisher(self) -> None:
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            try:
                self._publish_cb(self.records)
            except Exception:
                log.exception("publishing export records failed")
            await asyncio.sleep(COALESCE_SECONDS)

    def _view_changed(self) -> None:
        """Hand the consumer the new import view at once: it coalesces (building the view
        is a copy of two dicts' values, cheap even at thousands of imports)."""
        if self._on_view is not None:
            view = ImportView(
                tuple(self._imports.values()),
                tuple(itertools.chain.from_iterable(self._listeners.values())),
            )
            try:
                self._on_view(view)
            except Exception:
                log.exception("import view consumer failed")

    # ------------------------------------------------------------------ watch handlers

    def _on_export_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if self._synced.is_set():
            self._evaluate(ServiceKey(*key))

    def _on_service_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        obj = new or old or {}
        if model.is_managed(obj):
            ikey = self._import_key_of(obj)
            if ikey is None:
                return
            if new is None:
                self._applied.pop((SERVICE.plural, *key), None)
                self._derived_ips.pop(ikey, None)
                self.import_queue.add(ikey)
            elif old is None and not self._wanted(ikey):
                self.import_queue.add(ikey)
            return
        skey = ServiceKey(*key)
        if not self._synced.is_set():
            return
        if skey in self._evals or key in self.exports_w.cache:
            self._evaluate(skey)
        if model.wants_export(new) or model.wants_export(old):
            self.export_queue.add(skey)

    def _on_slice_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        obj = new or old or {}
        lab = model.labels(obj)
        if lab.get(model.SLICE_MANAGED_BY_LABEL) == model.SLICE_MANAGER:
            svc = lab.get(model.MCS_SERVICE_NAME)
            if svc:
                ikey = ServiceKey(key[0], svc)
                names = self._managed_slices.setdefault(ikey, set())
                if new is None:
                    names.discard(key[1])
                    if not names:
                        del self._managed_slices[ikey]
                    self._applied.pop((ENDPOINT_SLICE.plural, *key), None)
                    self.import_queue.add(ikey)
                else:
                    names.add(key[1])
                    if old is None and not self._wanted(ikey, lab.get(model.MCS_SOURCE_CLUSTER)):
                        self.import_queue.add(ikey)
            return
        svc = lab.get(model.K8S_SERVICE_NAME)
        if not svc:
            return
        skey = ServiceKey(key[0], svc)
        slices = self._local_slices.setdefault(skey, {})
        if new is None:
            slices.pop(key[1], None)
            if not slices:
                del self._local_slices[skey]
        else:
            slices[key[1]] = new
        if self._synced.is_set() and skey in self._evals:
            self._evaluate(skey)

    def _on_namespace_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if _ns_usable(old) == _ns_usable(new):
            return
        ns = key[1]
        if new is None:
            for k in [k for k in self._applied if k[1] == ns]:
                del self._applied[k]
        for skey in list(self._catalog) + list(self._managed_slices):
            if skey.namespace == ns:
                self.import_queue.add(skey)
        if _ns_usable(new) and self._synced.is_set():
            log.info("namespace %s appeared: importing its services", ns)

    def _on_import_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if new is None and old is not None and model.is_managed(old):
            self._applied.pop((SERVICE_IMPORT.plural, *key), None)
            self._applied.pop((SERVICE_IMPORT.plural + "/status", *key), None)
            self.import_queue.add(ServiceKey(*key))
        elif (
            old is None
            and new is not None
            and model.is_managed(new)
            and not self._wanted(ServiceKey(*key))
        ):
            self.import_queue.add(ServiceKey(*key))

    def _wanted(self, key: ServiceKey, source: str | None = None) -> bool:
        """Whether an import (or its slice from ``source``) should exist, as far as the
        catalog and namespaces say; a managed object that appears unwanted (it was being
        applied while its export went away) is reconciled, hence deleted."""
        merged = self._merged.get(key)
        if merged is None or not self._namespace_usable(key.namespace):
            return False
        return source is None or any(r.origin == source for r in merged.serving)

    def _on_pod_event(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        gateway = model.gateway_endpoints_of(self.pods_w.cache.values())
        if gateway == self._gateway:
            return
        self._gateway = gateway
        for skey, merged in self._merged.items():
            if merged.type == ServiceType.CLUSTERSET_IP:
                self.import_queue.add(skey)

    @staticmethod
    def _import_key_of(obj: Obj) -> ServiceKey | None:
        """The imported service a managed object belongs to (all carry the MCS label)."""
        name = model.labels(obj).get(model.MCS_SERVICE_NAME)
        if not name:
            return None
        return ServiceKey(str(model.meta(obj).get("namespace", "")), name)

    # ------------------------------------------------------------------ export side

    def _evaluate(self, key: ServiceKey) -> None:
        """Recompute one export's record from the caches (no I/O); queue its status."""
        assert self.cluster_id is not None
        ck = (key.namespace, key.name)
        svcex = self.exports_w.cache.get(ck)
        if svcex is None or model.meta(svcex).get("deletionTimestamp"):
            self._evals.pop(key, None)
            self._pending_since.pop(key, None)
            if self._records.pop(key, None) is not None:
                log.info("export %s withdrawn", key)
                self._publish_wanted.set()
            if model.wants_export(self.services_w.cache.get(ck)):
                self.export_queue.add(key)  # the annotation still asks for it
            return
        ev = model.evaluate_export(
            svcex,
            self.services_w.cache.get(ck),
            self._local_slices.get(key, {}).values(),
            origin=self.cluster_id,
            export_kube_system=self.kconfig.export_kube_system,
        )
        self._evals[key] = ev
        old = self._records.get(key)
        if ev.record is None:
            if old is not None:
                log.info("export %s withdrawn: %s", key, ev.valid.message)
                del self._records[key]
                self._publish_wanted.set()
        elif old is None or dataclasses.replace(old, version=0) != ev.record:
            self._version = max(self._version + 1, time.time_ns())
            self._records[key] = dataclasses.replace(ev.record, version=self._version)
            if old is None:
                log.info("export %s published (%s)", key, ev.record.type.value)
            self._publish_wanted.set()
        self.export_queue.add(key)

    async def _reconcile_export(self, key: ServiceKey) -> None:
        ck = (key.namespace, key.name)
        svc = self.services_w.cache.get(ck)
        svcex = self.exports_w.cache.get(ck)
        if model.wants_export(svc) and svcex is None:
            await self.kube.apply(SERVICE_EXPORT, model.service_export_body(*ck))
            log.info("created ServiceExport %s for its annotated Service", key)
            return
        if svcex is not None and model.is_auto_export(svcex) and not model.wants_export(svc):
            uid = model.meta(svcex).get("uid")
            await self.kube.delete(SERVICE_EXPORT, key.name, key.namespace, uid=uid)
            log.info("deleted ServiceExport %s: its Service is no longer annotated", key)
            return
        ev = self._evals.get(key)
        if svcex is None or ev is None:
            return
        rec = self._records.get(key)
        in_catalog = rec is not None and any(
            r.origin == rec.origin for r in self._catalog.get(key, ())
        )
        if rec is not None and not in_catalog:
            # The catalog normally confirms within milliseconds: write Ready=Pending only
            # if it does not, so a new export costs one status write, not two.
            now = time.monotonic()
            since = self._pending_since.setdefault(key, now)
            if now - since < PENDING_GRACE:
                loop = asyncio.get_running_loop()
                loop.call_later(PENDING_GRACE, self.export_queue.add, key)
                return
        else:
            self._pending_since.pop(key, None)
        conds = model.export_conditions(ev, in_catalog, self._merged.get(key))
        if self._on_conditions is not None:
            self._on_conditions(key, conds)
        status = svcex.get("status") or {}
        generation = int(model.meta(svcex).get("generation") or 0)
        new = model.next_conditions(
            status.get("conditions") or [], conds, generation, model.format_time(time.time())
        )
        if new is None:
            return
        try:
            obj = await self.kube.merge_patch(
                SERVICE_EXPORT, key.name, key.namespace, {"status": {"conditions": new}}, "status"
            )
        except NotFound:
            return
        # Keep the cache ahead of the watch so a re-run does not patch the same thing again.
        cur = self.exports_w.cache.get(ck)
        if cur is not None and model.meta(cur).get("uid") == model.meta(obj).get("uid"):
            self.exports_w.cache[ck] = trim_managed_fields(obj)

    # ------------------------------------------------------------------ import side

    def _namespace_usable(self, ns: str) -> bool:
        return _ns_usable(self.namespaces_w.cache.get(("", ns)))

    async def _apply_if_changed(self, res: Resource, cache: Watcher, body: Obj) -> Obj | None:
        """Apply unless this exact body was applied before (returns None then)."""
        m = body["metadata"]
        k = (res.plural, m["namespace"], m["name"])
        h = m["annotations"][model.SPEC_HASH_ANNOTATION]
        if self._applied.get(k) == h:
            return None
        cached = cache.cache.get((m["namespace"], m["name"]))
        if cached is not None and model.annots(cached).get(model.SPEC_HASH_ANNOTATION) == h:
            self._applied[k] = h
            return None
        obj = await self.kube.apply(res, body)
        self._applied[k] = h
        return obj

    async def _delete_import(self, key: ServiceKey) -> None:
        ns = key.namespace
        derived = model.derived_name(ns, key.name)
        deleted = 0
        for name in sorted(self._managed_slices.get(key, ())):
            deleted += await self.kube.delete(ENDPOINT_SLICE, name, ns)
            self._applied.pop((ENDPOINT_SLICE.plural, ns, name), None)
        si = self.imports_w.cache.get((ns, key.name))
        if si is not None and model.is_managed(si):
            deleted += await self.kube.delete(SERVICE_IMPORT, key.name, ns)
        svc = self.services_w.cache.get((ns, derived))
        if svc is not None and model.is_managed(svc):
            deleted += await self.kube.delete(SERVICE, derived, ns)
        for k in (
            (SERVICE.plural, ns, derived),
            (SERVICE_IMPORT.plural, ns, key.name),
            (SERVICE_IMPORT.plural + "/status", ns, key.name),
        ):
            self._applied.pop(k, None)
        self._derived_ips.pop(key, None)
        self.ports.release(key)
        listeners = self._listeners.pop(key, None)
        if self._imports.pop(key, None) is not None or listeners:
            self._view_changed()
        if deleted:
            log.info("import %s removed (%d objects)", key, deleted)

    async def _reconcile_import(self, key: ServiceKey) -> None:
        merged = self._merged.get(key)
        if merged is None or not self._namespace_usable(key.namespace):
            await self._delete_import(key)
            return
        ns = key.namespace
        derived = model.derived_name(ns, key.name)

        # 1. The derived Service: its ClusterIP(s) are the clusterset IPs, its target ports
        # the gateway ports of this import.
        targets = self._target_ports(merged)
        body = model.derived_service_body(merged, targets)
        current = self.services_w.cache.get((ns, derived))
        want_headless = merged.type == ServiceType.HEADLESS
        if (
            current is not None
            and ((current.get("spec") or {}).get("clusterIP") == "None") != want_headless
        ):
            # clusterIP is immutable: a type change needs a new Service.
            await self.kube.delete(SERVICE, derived, ns, uid=model.meta(current).get("uid"))
            self._applied.pop((SERVICE.plural, ns, derived), None)
            self._derived_ips.pop(key, None)
            self.services_w.cache.pop((ns, derived), None)
            current = None
        try:
            applied = await self._apply_if_changed(SERVICE, self.services_w, body)
        except Invalid as e:
            if "immutable" not in str(e):
                raise
            await self.kube.delete(SERVICE, derived, ns)
            self.services_w.cache.pop((ns, derived), None)
            applied = await self._apply_if_changed(SERVICE, self.services_w, body)
        # Only now that the Service points at the new ports may the old ones go back to
        # the pool (a failed apply leaves the Service, and its ports, as they were).
        self.ports.retain(key, {PortOwner(key, *t) for t in targets})
        source = applied or current
        if source is not None:
            spec = source.get("spec") or {}
            ips = tuple(i for i in spec.get("clusterIPs") or () if i and i != "None")
            fams = tuple(spec.get("ipFamilies") or ())
            self._derived_ips[key] = (ips, fams)
        ips, fams = self._derived_ips.get(key, ((), ()))
        if want_headless:
            ips, fams = (), tuple(merged.winner.ip_families)

        # 2. The ServiceImport and its status.
        si_body = model.service_import_body(merged, ips, fams)
        si = await self._apply_if_changed(SERVICE_IMPORT, self.imports_w, si_body)
        si_current = si or self.imports_w.cache.get((ns, key.name))
        ready = model.import_ready(merged, ips)
        sig = model.spec_hash({"c": list(merged.clusters), "r": dataclasses.astuple(ready)})
        skey = (SERVICE_IMPORT.plural + "/status", ns, key.name)
        if self._applied.get(skey) != sig:
            generation = int(model.meta(si_current or {}).get("generation") or 0)
            status = model.service_import_status(
                merged, ready, si_current, generation, model.format_time(time.time())
            )
            if status is not None:
                await self.kube.apply(SERVICE_IMPORT, status, sub="status")
            self._applied[skey] = sig

        # 3. EndpointSlices, one per source cluster (and address family).
        slices = model.endpoint_slice_bodies(merged, self._gateway, targets)
        want = {s["metadata"]["name"] for s in slices}
        await asyncio.gather(
            *(self._apply_if_changed(ENDPOINT_SLICE, self.slices_w, s) for s in slices)
        )
        for name in sorted(self._managed_slices.get(key, set()) - want):
            await self.kube.delete(ENDPOINT_SLICE, name, ns)
            self._applied.pop((ENDPOINT_SLICE.plural, ns, name), None)

        imported = ImportedService(
            namespace=ns,
            name=key.name,
            type=merged.type,
            ips=ips,
            ports=merged.ports,
            clusters=tuple(
                ClusterEndpoints(
                    r.origin, r.endpoints if merged.type == ServiceType.HEADLESS else ()
                )
                for r in sorted(merged.serving, key=lambda r: r.origin)
            ),
        )
        bind = self.kconfig.import_address
        listeners = tuple(
            ListenerSpec(key, bind, targets[(p.protocol, p.port)], p.port, origins)
            for p, origins in merged.port_origins
            if (p.protocol, p.port) in targets
        )
        changed = self._listeners.get(key, ()) != listeners
        if changed:
            self._listeners[key] = listeners
        if self._imports.get(key) != imported:
            if key not in self._imports:
                log.info(
                    "import %s materialised (%s, ips %s)",
                    key,
                    merged.type.value,
                    ",".join(ips) or "-",
                )
            self._imports[key] = imported
            changed = True
        if changed:
            self._view_changed()

    def _target_ports(self, merged: MergedService) -> dict[tuple[str, int], int]:
        """Gateway ports of a ClusterSetIP import's TCP ports (allocated on first use; the
        caller releases the ports it no longer has once its derived Service is applied).
        Headless imports have none: their traffic goes to the remote endpoints' own
        addresses."""
        if merged.type != ServiceType.CLUSTERSET_IP:
            return {}
        owners = [PortOwner(merged.key, p.protocol, p.port) for p in merged.ports]
        return {(o.protocol, o.port): self.ports.get(o) for o in owners if o.protocol == "TCP"}


def _ns_usable(ns: Obj | None) -> bool:
    if ns is None:
        return False
    return (
        not model.meta(ns).get("deletionTimestamp")
        and (ns.get("status") or {}).get("phase") != "Terminating"
    )
