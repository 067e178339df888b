"""The export side of the MCS controller: ServiceExports out of the API server, into the
catalog.

ServiceExports (and Services annotated ``meshlink.io/export: "true"``, for which it creates
and deletes the ServiceExport), their Services and EndpointSlices become ``ExportRecord``s
(``evaluate``, no I/O, on every event once the caches are complete), handed to ``publish``
(always the full local set, coalesced); each ServiceExport gets ``Valid``/``Ready``/
``Conflict`` conditions from its own work queue (``reconcile``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from meshlink.catalog.records import ExportRecord, ServiceKey, ServiceType
from meshlink.catalog.view import ExportTarget, Publish
from meshlink.errors import KubeError
from meshlink.k8s import model
from meshlink.k8s.api import EVENT, SERVICE_EXPORT, Kube, NotFound
from meshlink.k8s.caches import Caches
from meshlink.k8s.clusterset import ClustersetCatalog
from meshlink.k8s.model import Condition, Obj
from meshlink.k8s.watch import ObjKey
from meshlink.k8s.workqueue import WorkQueue
from meshlink.tasks import Coalescer

log = logging.getLogger(__name__)

COALESCE_SECONDS: Final = 0.02
"""Publishing runs at most this often: bursts become one call."""

EVENT_CONTROLLER: Final = "meshlink.io/controller"
"""reportingController of the Events meshlink records."""

PENDING_GRACE: Final = 1.0
"""Seconds an export may wait for the catalog before Ready=Pending is written."""

ConditionsHook = Callable[[ServiceKey, tuple[Condition, ...]], None]


class ExportReconciler:
    """See the module docstring. ``start`` once the caches are complete."""

    def __init__(
        self,
        kube: Kube,
        caches: Caches,
        catalog: ClustersetCatalog,
        *,
        publish: Publish,
        export_kube_system: bool,
        workers: int,
        transient: Callable[[Exception], bool],
        on_conditions: ConditionsHook | None = None,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.kube = kube
        self._leading = leading
        self.caches = caches
        self.catalog = catalog
        self._publish = publish
        self._export_kube_system = export_kube_system
        self._on_conditions = on_conditions
        self.origin: str | None = None
        """This cluster's id; set by ``start``."""
        self.started = False
        self._records: dict[ServiceKey, ExportRecord] = {}
        self._evals: dict[ServiceKey, model.ExportEvaluation] = {}
        self._version = time.time_ns()
        self._local_slices: dict[ServiceKey, dict[str, Obj]] = {}
        self._pending_since: dict[ServiceKey, float] = {}
        self.publisher = Coalescer(self._publish_all, pause=lambda _: COALESCE_SECONDS)
        self.queue: WorkQueue[ServiceKey] = WorkQueue(
            "export", self.reconcile, workers, transient=transient
        )
        caches.subscribe(SERVICE_EXPORT, self._on_export)
        caches.subscribe(caches.services.res, self._on_service)
        caches.subscribe(caches.slices.res, self._on_slice)

    @property
    def records(self) -> tuple[ExportRecord, ...]:
        return tuple(self._records[k] for k in sorted(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def start(self, origin: str) -> None:
        """The caches are complete: evaluate every export once from them, and publish the
        full set (never a partial one, which peers would read as withdrawals)."""
        self.origin = origin
        for ck in list(self.caches.exports.cache):
            self._evaluate(ServiceKey(*ck))
        self.resync()
        self.started = True
        self.publisher.wake()

    def resync(self) -> None:
        for ck in list(self.caches.exports.cache):
            self.queue.add(ServiceKey(*ck))
        for ck, svc in list(self.caches.services.cache.items()):
            if model.wants_export(svc):
                self.queue.add(ServiceKey(*ck))

    def catalog_changed(self, keys: Iterable[ServiceKey]) -> None:
        """Ready and Conflict follow the catalog."""
        for key in keys:
            if key in self._evals:
                self.queue.add(key)

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        """Where a flow that arrived over a link for our export ``namespace/name:port`` goes
        (``model.local_endpoint``)."""
        rec = self._records.get(ServiceKey(namespace, name))
        return model.local_endpoint(rec, self.caches.services.get((namespace, name)), port)

    def export_targets(self) -> list[ExportTarget]:
        """Where flows for each TCP port of our exports go (``local_endpoint``); a port of
        an export with no ready endpoint has none."""
        out = []
        for key, rec in sorted(self._records.items()):
            for p in rec.ports:
                if p.protocol != "TCP":
                    continue
                target = self.local_endpoint(key.namespace, key.name, p.port)
                if rec.ready_endpoints == 0 and rec.type == ServiceType.CLUSTERSET_IP:
                    target = None
                why = None if target is not None else "the Service has no ready endpoint"
                out.append(ExportTarget(key, p.port, target, why))
        return out

    async def _publish_all(self) -> None:
        try:
            self._publish(self.records)
        except Exception:
            log.exception("publishing export records failed")

    # -- watch events --------------------------------------------------------------------

    def _on_export(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if self.started:
            self._evaluate(ServiceKey(*key))

    def _on_service(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if model.is_managed(new or old or {}) or not self.started:
            return  # derived Services are the import side's
        skey = ServiceKey(*key)
        if skey in self._evals or key in self.caches.exports.cache:
            self._evaluate(skey)
        if model.wants_export(new) or model.wants_export(old):
            self.queue.add(skey)

    def _on_slice(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        lab = model.labels(new or old or {})
        if lab.get(model.SLICE_MANAGED_BY_LABEL) == model.SLICE_MANAGER:
            return  # meshlink's own slices are the import side's
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
        if self.started and skey in self._evals:
            self._evaluate(skey)

    # -- reconciling ---------------------------------------------------------------------

    def _evaluate(self, key: ServiceKey) -> None:
        """Recompute one export's record from the caches (no I/O); queue its status."""
        assert self.origin is not None
        ck = (key.namespace, key.name)
        svcex = self.caches.exports.get(ck)
        if svcex is None or model.meta(svcex).get("deletionTimestamp"):
            self._evals.pop(key, None)
            self._pending_since.pop(key, None)
            if self._records.pop(key, None) is not None:
                log.info("export %s withdrawn", key)
                self.publisher.wake()
            if model.wants_export(self.caches.services.get(ck)):
                self.queue.add(key)  # the annotation still asks for it
            return
        ev = model.evaluate_export(
            svcex,
            self.caches.services.get(ck),
            self._local_slices.get(key, {}).values(),
            origin=self.origin,
            export_kube_system=self._export_kube_system,
        )
        self._evals[key] = ev
        old = self._records.get(key)
        if ev.record is None:
            if old is not None:
                log.info("export %s withdrawn: %s", key, ev.valid.message)
                del self._records[key]
                self.publisher.wake()
        elif old is None or dataclasses.replace(old, version=0) != ev.record:
            self._version = max(self._version + 1, time.time_ns())
            self._records[key] = dataclasses.replace(ev.record, version=self._version)
            if old is None:
                log.info("export %s published (%s)", key, ev.record.type.value)
            self.publisher.wake()
        self.queue.add(key)

    async def reconcile(self, key: ServiceKey) -> None:
        """The ServiceExport of an annotated Service, and every ServiceExport's status (by
        the Lease holder only: the others publish the same records, and write nothing)."""
        if not self._leading():
            return
        ck = (key.namespace, key.name)
        svc = self.caches.services.get(ck)
        svcex = self.caches.exports.get(ck)
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
        in_catalog = rec is not None and self.catalog.carries(rec)
        if rec is not None and not in_catalog:
            # The catalog normally confirms within milliseconds: write Ready=Pending only
            # if it does not, so a new export costs one status write, not two.
            now = time.monotonic()
            since = self._pending_since.setdefault(key, now)
            if now - since < PENDING_GRACE:
                loop = asyncio.get_running_loop()
                loop.call_later(PENDING_GRACE, self.queue.add, key)
                return
        else:
            self._pending_since.pop(key, None)
        conds = model.export_conditions(ev, in_catalog, self.catalog.merged.get(key))
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
        # Ahead of the watch, so a re-run does not patch the same thing again.
        self.caches.exports.wrote(obj)
        for spec in model.condition_events(status.get("conditions") or [], conds):
            await self._record_event(spec, obj)

    async def _record_event(self, spec: model.EventSpec, regarding: Obj) -> None:
        """Best effort, like kubelet's: an Event that cannot be written is not worth a retry."""
        body = model.event_body(
            spec,
            regarding,
            controller=EVENT_CONTROLLER,
            instance=f"meshlink-{self.origin}",
            epoch=time.time(),
        )
        try:
            await self.kube.create(EVENT, body)
        except KubeError as e:
            log.debug("cannot record event %s on %s: %s", spec.reason, body["regarding"], e)
