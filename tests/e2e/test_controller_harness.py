"""No tests here: helpers for the controller's end-to-end tests and benchmark (real API
servers, real controllers, and the in-process carrying of export records between them).

``InProcessClusterset`` stands where the gateway links stand in a deployment: each
controller's ``publish()`` lands here and every controller's ``update_catalog()`` receives
the union of live records grouped by service. Both ends are the real controller code; only
the transport (meshlink.catalog sync over mTLS links in production) is in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from kubernetes_asyncio import config as kconfig

from meshlink.catalog.records import ExportRecord, ServiceKey
from meshlink.catalog.view import ImportedService
from meshlink.config import KubernetesConfig, SiteConfig
from meshlink.k8s import Controller
from meshlink.k8s.api import Kube, NotFound, Resource
from meshlink.k8s.model import Obj
from tests.kube import async_wait_until

Grouped = dict[ServiceKey, list[ExportRecord]]


class InProcessClusterset:
    """Carries export records between the controllers of one process.

    The real deployment carries records over gateway links (catalog sync, with a lease
    tied to link liveness); this does the same hand-off in memory so that several real
    controllers, each on its own real API server, form one clusterset in a test.
    """

    def __init__(self) -> None:
        self.by_origin: dict[str, tuple[ExportRecord, ...]] = {}
        self.controllers: list[Controller] = []

    def publisher(self, origin: str) -> Callable[[Sequence[ExportRecord]], None]:
        def publish(records: Sequence[ExportRecord]) -> None:
            assert all(r.origin == origin for r in records), "a site publishes only its own"
            self.by_origin[origin] = tuple(records)
            self.broadcast()

        return publish

    def withdraw(self, origin: str) -> None:
        """The origin's lease ran out (no live path): its records leave the catalog."""
        self.by_origin.pop(origin, None)
        self.broadcast()

    def grouped(self) -> Grouped:
        out: Grouped = {}
        for records in self.by_origin.values():
            for r in records:
                out.setdefault(r.key, []).append(r)
        return out

    def broadcast(self) -> None:
        grouped = self.grouped()
        for c in self.controllers:
            c.update_catalog(grouped)

    def add(self, controller: Controller) -> None:
        self.controllers.append(controller)
        controller.update_catalog(self.grouped())

    def remove(self, controller: Controller) -> None:
        self.controllers.remove(controller)


def site_config(name: str, kubeconfig: Path, state_dir: Path, **kube: Any) -> SiteConfig:
    return SiteConfig(
        site=name,
        state_dir=state_dir,
        kubernetes=KubernetesConfig(kubeconfig=kubeconfig, request_timeout=5.0, **kube),
    )


@contextlib.asynccontextmanager
async def running_controller(
    clusterset: InProcessClusterset,
    name: str,
    kubeconfig: Path,
    state_dir: Path,
    *,
    sync_timeout: float = 30.0,
    on_imports: Callable[[tuple[ImportedService, ...]], None] | None = None,
    **kube: Any,
) -> AsyncIterator[Controller]:
    """A Controller for one cluster, running as a task until the block exits."""
    api = await kconfig.new_client_from_config(str(kubeconfig))
    try:
        ctl = Controller(
            api,
            site_config(name, kubeconfig, state_dir, **kube),
            publish=clusterset.publisher(name),
            on_view=(lambda view: on_imports(view.imports)) if on_imports else None,
        )
        clusterset.add(ctl)
        task = asyncio.create_task(ctl.run(), name=f"controller-{name}")
        try:
            synced = asyncio.create_task(ctl.wait_synced())
            done, _ = await asyncio.wait(
                {task, synced}, timeout=sync_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if synced not in done:
                synced.cancel()
                if task in done:
                    task.result()  # raises the controller's error
                raise AssertionError(f"controller {name} did not sync in {sync_timeout} s")
            yield ctl
        finally:
            clusterset.remove(ctl)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await api.close()


@contextlib.asynccontextmanager
async def api_for(kubeconfig: Path) -> AsyncIterator[Kube]:
    """A plain API client for the test's own reads and writes (not the controller's)."""
    api = await kconfig.new_client_from_config(str(kubeconfig))
    try:
        yield Kube(api, 10.0)
    finally:
        await api.close()


async def get(kube: Kube, res: Resource, namespace: str | None, name: str) -> Obj | None:
    try:
        return await kube.get(res, name, namespace)
    except NotFound:
        return None


async def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """tests.kube.async_wait_until for a predicate that may be sync or async."""

    async def probe() -> Any:
        value = predicate()
        return await value if asyncio.iscoroutine(value) else value

    return await async_wait_until(probe, timeout, what)
