"""The import side of the MCS controller: the clusterset's services, into the API server.

For every service of the catalog whose namespace exists here, server-side apply of the
derived Service, the ServiceImport (+ status) and the EndpointSlices per source cluster;
whatever meshlink manages and should not exist is deleted. One keyed work queue drives it
(bursts coalesce, concurrency is bounded), and an applied body whose hash did not change
is not sent again; a restarted controller rebuilds from the API server (the hash of each
applied body is kept in an annotation on the object). Each reconcile that changes what the
site serves hands ``on_view`` a new ``ImportView`` (the imports and their gateway
listeners).

With several replicas only the Lease holder writes (``leading``). The others *observe*:
their import views come from what the holder wrote (the derived Service's ClusterIPs and
recorded gateway ports), so every replica serves the same listeners and DNS answers, and
a replica that becomes the holder takes the ports it finds (``became_leader``) and
rewrites nothing that is already right.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable

from meshlink.catalog.merge import MergedService
from meshlink.catalog.records import ServiceKey, ServiceType
from meshlink.catalog.view import ImportedService, ImportView, ListenerSpec, OnView
from meshlink.k8s import model
from meshlink.k8s.api import ENDPOINT_SLICE, SERVICE, SERVICE_IMPORT, Invalid, Kube
from meshlink.k8s.caches import Caches
from meshlink.k8s.clusterset import ClustersetCatalog
from meshlink.k8s.model import Obj
from meshlink.k8s.ports import PortAllocator, PortOwner
from meshlink.k8s.watch import ObjKey, Watcher
from meshlink.k8s.workqueue import WorkQueue

log = logging.getLogger(__name__)

AppliedKey = tuple[str, str, str]
"""(resource plural, or plural + "/status"; namespace; name)."""


class ImportReconciler:
    """See the module docstring. Just over 300 lines: ``reconcile`` applies three kinds of
    objects in order (the Service's IPs feed the ServiceImport), which reads best whole."""

    def __init__(
        self,
        kube: Kube,
        caches: Caches,
        catalog: ClustersetCatalog,
        *,
        ports: PortAllocator,
        bind: str,
        workers: int,
        transient: Callable[[Exception], bool],
        on_view: OnView | None = None,
        owner_namespace: str | None = None,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.kube = kube
        self._leading = leading
        self._owner_namespace = owner_namespace
        """meshlink's own namespace: every object made here is owned by it (garbage
        collected once it goes, as on uninstall)."""
        self.caches = caches
        self.catalog = catalog
        self.ports = ports
        self._bind = bind
        self._on_view = on_view
        self.synced = False
        """The caches are complete (namespace events are then worth a log line)."""
        self._managed_slices: dict[ServiceKey, set[str]] = {}
        self._applied: dict[AppliedKey, str] = {}
        self._derived_ips: dict[ServiceKey, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._gateway: tuple[tuple[str, bool], ...] = ()
        self._imports: dict[ServiceKey, ImportedService] = {}
        self._listeners: dict[ServiceKey, tuple[ListenerSpec, ...]] = {}
        self.queue: WorkQueue[ServiceKey] = WorkQueue(
            "import", self.reconcile, workers, transient=transient
        )
        caches.subscribe(caches.services.res, self._on_service)
        caches.subscribe(caches.slices.res, self._on_slice)
        caches.subscribe(caches.namespaces.res, self._on_namespace)
        caches.subscribe(caches.imports.res, self._on_service_import)
        caches.subscribe(caches.pods.res, self._on_pod)

    @property
    def imports(self) -> tuple[ImportedService, ...]:
        return tuple(self._imports[k] for k in sorted(self._imports))

    @property
    def listeners(self) -> tuple[ListenerSpec, ...]:
        return tuple(spec for k in sorted(self._listeners) for spec in self._listeners[k])

    def __len__(self) -> int:
        return len(self._imports)

    def seed_ports(self) -> None:
        """Take the gateway ports recorded on existing derived Services, before the first
        import reconcile, so a restart moves no import to another port."""
        for svc in self.caches.services.cache.values():
            key = model.import_key(svc) if model.is_managed(svc) else None
            if key is None:
                continue
            for proto, port, target in model.recorded_gateway_ports(svc):
                self.ports.claim(PortOwner(key, proto, port), target)

    def became_leader(self) -> None:
        """This replica holds the Lease now: take the gateway ports as the API server has
        them (the last holder may have allocated some since), and look at everything."""
        self.ports = PortAllocator(self.ports.first, self.ports.last)
        self._applied.clear()  # what another replica applied is known only from the objects
        self.seed_ports()
        self.requeue_all()

    def requeue_all(self) -> None:
        """Look at every import that exists or should again (start, resync)."""
        for key in self._all_keys():
            self.queue.add(key)

    def _all_keys(self) -> set[ServiceKey]:
        """Every import that exists or should: managed objects and the catalog's services."""
        keys: set[ServiceKey] = set(self._managed_slices) | set(self.catalog.records)
        for (ns, name), si in self.caches.imports.cache.items():
            if model.is_managed(si):
                keys.add(ServiceKey(ns, name))
        for svc in self.caches.services.cache.values():
            if model.is_managed(svc) and (k := model.import_key(svc)) is not None:
                keys.add(k)
        return keys

    def catalog_changed(self, keys: Iterable[ServiceKey]) -> None:
        for key in keys:
            self.queue.add(key)

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

    # -- watch events --------------------------------------------------------------------

    def _wanted(self, key: ServiceKey, source: str | None = None) -> bool:
        """Whether an import (or its slice from ``source``) should exist, as far as the
        catalog and namespaces say; a managed object that appears unwanted (it was being
        applied while its export went away) is reconciled, hence deleted."""
        merged = self.catalog.merged.get(key)
        if merged is None or not self.caches.namespace_usable(key.namespace):
            return False
        return source is None or any(r.origin == source for r in merged.serving)

    def _on_service(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        obj = new or old or {}
        if not model.is_managed(obj):
            return  # exported Services are the export side's
        ikey = model.import_key(obj)
        if ikey is None:
            return
        if new is None:
            self._applied.pop((SERVICE.plural, *key), None)
            self._derived_ips.pop(ikey, None)
            self.queue.add(ikey)
        elif (old is None and not self._wanted(ikey)) or not self._leading():
            self.queue.add(ikey)  # a replica that does not write follows what was written

    def _on_slice(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        lab = model.labels(new or old or {})
        if lab.get(model.SLICE_MANAGED_BY_LABEL) != model.SLICE_MANAGER:
            return  # local slices are the export side's
        svc = lab.get(model.MCS_SERVICE_NAME)
        if not svc:
            return
        ikey = ServiceKey(key[0], svc)
        names = self._managed_slices.setdefault(ikey, set())
        if new is None:
            names.discard(key[1])
            if not names:
                del self._managed_slices[ikey]
            self._applied.pop((ENDPOINT_SLICE.plural, *key), None)
            self.queue.add(ikey)
        else:
            names.add(key[1])
            if old is None and not self._wanted(ikey, lab.get(model.MCS_SOURCE_CLUSTER)):
                self.queue.add(ikey)

    def _on_namespace(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if key[1] == self._owner_namespace and model.meta(old or {}).get("uid") != model.meta(
            new or {}
        ).get("uid"):
            # Every object made here names its owner's uid: a new owner, new bodies.
            self.requeue_all()
        if model.namespace_usable(old) == model.namespace_usable(new):
            return
        ns = key[1]
        if new is None:
            for k in [k for k in self._applied if k[1] == ns]:
                del self._applied[k]
        for skey in list(self.catalog.records) + list(self._managed_slices):
            if skey.namespace == ns:
                self.queue.add(skey)
        if model.namespace_usable(new) and self.synced:
            log.info("namespace %s appeared: importing its services", ns)

    def _on_service_import(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        if new is None and old is not None and model.is_managed(old):
            self._applied.pop((SERVICE_IMPORT.plural, *key), None)
            self._applied.pop((SERVICE_IMPORT.plural + "/status", *key), None)
            self.queue.add(ServiceKey(*key))
        elif (
            old is None
            and new is not None
            and model.is_managed(new)
            and not self._wanted(ServiceKey(*key))
        ):
            self.queue.add(ServiceKey(*key))

    def _on_pod(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        gateway = model.gateway_endpoints_of(self.caches.pods.cache.values())
        if gateway == self._gateway:
            return
        self._gateway = gateway
        for skey, merged in self.catalog.merged.items():
            if merged.type == ServiceType.CLUSTERSET_IP:
                self.queue.add(skey)

    # -- reconciling ---------------------------------------------------------------------

    async def _apply_if_changed(self, cache: Watcher, body: Obj) -> Obj | None:
        """Apply unless this exact body was applied before (returns None then)."""
        if self._owner_namespace:
            owner = self.caches.namespaces.get(("", self._owner_namespace))
            body = model.owned_by_namespace(body, owner)
        m = body["metadata"]
        k = (cache.res.plural, m["namespace"], m["name"])
        h = m["annotations"][model.SPEC_HASH_ANNOTATION]
        if self._applied.get(k) == h:
            return None
        cached = cache.get((m["namespace"], m["name"]))
        if cached is not None and model.annots(cached).get(model.SPEC_HASH_ANNOTATION) == h:
            self._applied[k] = h
            return None
        obj = await self.kube.apply(cache.res, body)
        self._applied[k] = h
        return obj

    async def _delete_service(self, ns: str, name: str, uid: str | None = None) -> None:
        """Delete a derived Service (to recreate it) and forget it at once."""
        await self.kube.delete(SERVICE, name, ns, uid=uid)
        self._applied.pop((SERVICE.plural, ns, name), None)
        self.caches.services.deleted((ns, name))

    async def delete(self, key: ServiceKey) -> None:
        """Remove everything meshlink made for an import that should not exist."""
        ns = key.namespace
        derived = model.derived_name(ns, key.name)
        deleted = 0
        for name in sorted(self._managed_slices.get(key, ())):
            deleted += await self.kube.delete(ENDPOINT_SLICE, name, ns)
            self._applied.pop((ENDPOINT_SLICE.plural, ns, name), None)
        si = self.caches.imports.get((ns, key.name))
        if si is not None and model.is_managed(si):
            deleted += await self.kube.delete(SERVICE_IMPORT, key.name, ns)
        svc = self.caches.services.get((ns, derived))
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

    async def reconcile(self, key: ServiceKey) -> None:
        if not self._leading():
            self.observe(key)
            return
        merged = self.catalog.merged.get(key)
        if merged is None or not self.caches.namespace_usable(key.namespace):
            await self.delete(key)
            return
        ns = key.namespace
        derived = model.derived_name(ns, key.name)

        # 1. The derived Service: its ClusterIP(s) are the clusterset IPs, its target ports
        # the gateway ports of this import.
        targets = self._target_ports(merged)
        body = model.derived_service_body(merged, targets)
        current = self.caches.services.get((ns, derived))
        want_headless = merged.type == ServiceType.HEADLESS
        if (
            current is not None
            and ((current.get("spec") or {}).get("clusterIP") == "None") != want_headless
        ):
            # clusterIP is immutable: a type change needs a new Service.
            await self._delete_service(ns, derived, uid=model.meta(current).get("uid"))
            self._derived_ips.pop(key, None)
            current = None
        try:
            applied = await self._apply_if_changed(self.caches.services, body)
        except Invalid as e:
            if "immutable" not in str(e):
                raise
            await self._delete_service(ns, derived)
            applied = await self._apply_if_changed(self.caches.services, body)
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
        si = await self._apply_if_changed(self.caches.imports, si_body)
        si_current = si or self.caches.imports.get((ns, key.name))
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
        await asyncio.gather(*(self._apply_if_changed(self.caches.slices, s) for s in slices))
        for name in sorted(self._managed_slices.get(key, set()) - want):
            await self.kube.delete(ENDPOINT_SLICE, name, ns)
            self._applied.pop((ENDPOINT_SLICE.plural, ns, name), None)

        # 4. What the site serves: DNS and the gateway listeners.
        imported = model.imported_service(merged, ips)
        listeners = model.import_listeners(merged, targets, self._bind)
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

    def observe(self, key: ServiceKey) -> None:
        """What a replica that does not write serves for an import: the view of what the
        Lease holder wrote (nothing until it has written the derived Service)."""
        merged = self.catalog.merged.get(key)
        ns = key.namespace
        svc = self.caches.services.get((ns, model.derived_name(ns, key.name)))
        if (
            merged is None
            or not self.caches.namespace_usable(ns)
            or svc is None
            or not model.is_managed(svc)
        ):
            listeners = self._listeners.pop(key, None)
            if self._imports.pop(key, None) is not None or listeners:
                self._view_changed()
            return
        wanted = {(p.protocol, p.port) for p in merged.ports}
        targets = {
            (proto, port): target
            for proto, port, target in model.recorded_gateway_ports(svc)
            if (proto, port) in wanted
        }
        spec = svc.get("spec") or {}
        ips = tuple(i for i in spec.get("clusterIPs") or () if i and i != "None")
        if merged.type == ServiceType.HEADLESS:
            ips, targets = (), {}
        imported = model.imported_service(merged, ips)
        listeners = model.import_listeners(merged, targets, self._bind)
        changed = self._listeners.get(key, ()) != listeners or self._imports.get(key) != imported
        self._listeners[key] = listeners
        self._imports[key] = imported
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
