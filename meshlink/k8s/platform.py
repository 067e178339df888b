"""The Kubernetes ``Platform`` of a site: the API client, the cluster id check, and the
controller's life.

It builds the ApiClient from ``kubernetes.kubeconfig`` (or the in-cluster service account),
checks that the ClusterProperty ``cluster.clusterset.k8s.io`` (when present) names this
site, and runs the ``Controller``, which publishes exports and announces import views. The
catalog is handed over as it changes, also before the controller exists (it gets the last
one when it starts). A process without the controller component (``--components``) has
this platform too, idle: no exports, no imports, no Kubernetes status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshlink.catalog.records import ExportRecord, ServiceKey
from meshlink.catalog.view import Conflict, ExportTarget, OnView, PlatformStatus, Publish
from meshlink.config import KubernetesConfig, SiteConfig
from meshlink.errors import MeshlinkError
from meshlink.k8s.controller import Controller


class KubernetesPlatform:
    """Kubernetes mode (see the module docstring)."""

    mode = "kubernetes"
    import_range = "kubernetes.importPorts"

    def __init__(self, config: SiteConfig, *, controller: bool = True) -> None:
        self.config = config
        self.kube: KubernetesConfig = config.kubernetes or KubernetesConfig()
        self.with_controller = controller
        self.controller: Controller | None = None
        self._services: Mapping[ServiceKey, Sequence[ExportRecord]] | None = None

    async def run(self, publish: Publish, on_view: OnView) -> None:
        if not self.with_controller:
            publish([])  # no export source here: say so, or the catalog never speaks
            return
        from kubernetes_asyncio import config as kconfig
        from kubernetes_asyncio.client import ApiClient

        if self.kube.kubeconfig is None:
            kconfig.load_incluster_config()  # type: ignore[no-untyped-call]
            api = ApiClient()
        else:
            api = await kconfig.new_client_from_config(
                str(self.kube.kubeconfig), context=self.kube.context
            )
        async with api:
            self.controller = Controller(api, self.config, publish=publish, on_view=on_view)
            site_id = await self.controller.resolve_cluster_id()
            if site_id != self.config.site:
                raise MeshlinkError(
                    f"cluster id {site_id} (ClusterProperty) differs from site {self.config.site}"
                )
            # Imports (and orphan clean-up) start with the first catalog view, even empty.
            if self._services is not None:
                self.controller.update_catalog(self._services)
            await self.controller.run()

    def catalog_changed(self, services: Mapping[ServiceKey, Sequence[ExportRecord]]) -> None:
        self._services = services
        if self.controller is not None:
            self.controller.update_catalog(services)

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        if self.controller is None:
            return None
        return self.controller.local_endpoint(namespace, name, port)

    def reload(self, config: SiteConfig) -> None:
        """Nothing to take here: exports come from the API server (a change of the
        ``kubernetes`` section takes a restart, which the reload says)."""

    def export_targets(self) -> list[ExportTarget]:
        if self.controller is None:
            return []
        return self.controller.export_side.export_targets()

    def not_ready(self) -> str | None:
        status = self.status()
        if status is not None and not status.get("synced"):
            # Until its first lists are done the import state is empty: DNS would answer
            # NXDOMAIN for every clusterset name (and resolvers would cache that).
            return "the Kubernetes controller has not finished its first lists"
        return None

    def status(self) -> PlatformStatus | None:
        if not self.with_controller:
            return None
        if self.controller is None:  # not started yet
            return {"api_server": None, "reachable": None, "synced": False}
        return self.controller.status()

    def conflicts(self) -> list[Conflict]:
        return []  # shown on each ServiceExport's Conflict condition instead
