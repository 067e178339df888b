"""The controller's watch caches: one ``Watcher`` per resource it reads, and who hears of
their events.

Every event of a resource goes to each subscriber in turn (the export and the import
reconciler each take the objects that are theirs and ignore the rest). Readers use the
caches; the only writes besides the watches' own are a reconciler's ``Watcher.wrote`` and
``Watcher.deleted`` (its own write, known before its event).
"""

from __future__ import annotations

from collections.abc import Callable

from meshlink.config import KubernetesConfig
from meshlink.k8s import model
from meshlink.k8s.api import (
    ENDPOINT_SLICE,
    NAMESPACE,
    POD,
    SERVICE,
    SERVICE_EXPORT,
    SERVICE_IMPORT,
    Kube,
    Resource,
)
from meshlink.k8s.model import Obj
from meshlink.k8s.watch import ApiHealth, ObjKey, Watcher, trim_managed_fields

EventHandler = Callable[[ObjKey, Obj | None, Obj | None], None]


class _Fanout:
    def __init__(self) -> None:
        self.handlers: list[EventHandler] = []

    def __call__(self, key: ObjKey, old: Obj | None, new: Obj | None) -> None:
        for handler in self.handlers:
            handler(key, old, new)


class Caches:
    """See the module docstring."""

    def __init__(self, kube: Kube, health: ApiHealth, kconfig: KubernetesConfig) -> None:
        self._fanouts: dict[str, _Fanout] = {}

        def watch(
            res: Resource,
            *,
            trim: Callable[[Obj], Obj] = trim_managed_fields,
            namespace: str | None = None,
            label_selector: str | None = None,
        ) -> Watcher:
            fanout = self._fanouts[res.plural] = _Fanout()
            return Watcher(
                kube,
                res,
                fanout,
                health,
                namespace=namespace,
                label_selector=label_selector,
                trim=trim,
            )

        self.exports = watch(SERVICE_EXPORT)
        self.services = watch(SERVICE)
        self.slices = watch(ENDPOINT_SLICE, trim=model.trim_slice)
        self.namespaces = watch(NAMESPACE)
        self.imports = watch(SERVICE_IMPORT)
        self.pods = watch(
            POD,
            namespace=kconfig.namespace,
            label_selector=",".join(f"{k}={v}" for k, v in kconfig.gateway_selector),
        )
        self.all = (
            self.exports,
            self.services,
            self.slices,
            self.namespaces,
            self.imports,
            self.pods,
        )

    def subscribe(self, res: Resource, handler: EventHandler) -> None:
        """``handler(key, old, new)`` for every event of ``res`` (in subscription order)."""
        self._fanouts[res.plural].handlers.append(handler)

    async def synced(self) -> None:
        """Returns once every initial list is done."""
        for w in self.all:
            await w.synced.wait()

    def namespace_usable(self, ns: str) -> bool:
        return model.namespace_usable(self.namespaces.get(("", ns)))
