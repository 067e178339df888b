"""The import view: what a site materialises for each service exported in the clusterset.

This is the one interface between the catalog and its consumers (DNS, import listeners),
and ``Platform`` the one interface of the producers (local mode, the Kubernetes
controller): a platform publishes this site's exports, receives the catalog, and after
applying namespace sameness and the merge rules hands over an ``ImportView``: a tuple of
``ImportedService`` and a tuple of ``ListenerSpec`` (the gateway listeners that carry the
imports' traffic), which consumers treat as immutable snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

from meshlink.catalog.records import Endpoint, ExportRecord, Port, ServiceKey, ServiceType
from meshlink.config import SiteConfig


@dataclass(frozen=True, slots=True)
class ClusterEndpoints:
    """Endpoints one source cluster contributes to an imported service."""

    cluster: str
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportedService:
    """One imported service as DNS and listeners see it.

    ``ips`` are the clusterset IPs (ClusterSetIP only; empty for Headless), one per family.
    ``ports`` is the union of exported ports. ``clusters`` lists every exporting cluster
    that has a live path; for Headless services it carries their endpoints.
    """

    namespace: str
    name: str
    type: ServiceType
    ips: tuple[str, ...]
    ports: tuple[Port, ...]
    clusters: tuple[ClusterEndpoints, ...]


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One import listener of the gateway: a connection to ``address:port`` becomes a flow to
    port ``service_port`` of the service, on one of ``origins`` (the sites exporting that
    port). In local mode ``port`` is the service port on the import's own address; in
    Kubernetes mode it is the gateway target port allocated to that service port."""

    key: ServiceKey
    address: str
    port: int
    service_port: int
    origins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ImportView:
    """Everything a site materialises for the clusterset at one moment, handed as one value
    from the platform to the import plane (listeners first, then DNS). No order is implied
    (consumers that show it sort it)."""

    imports: tuple[ImportedService, ...] = ()
    listeners: tuple[ListenerSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Conflict:
    """An imported service whose exports disagree (the KEP's conflict resolution: the
    oldest export wins)."""

    service: ServiceKey
    reasons: tuple[str, ...]
    winner: str
    """The site whose export wins."""


class ReplicaPod(TypedDict):
    """One of a Kubernetes site's meshlink pods, as the controller's pod cache sees it."""

    name: str
    ip: str | None
    node: str | None
    ready: bool


class PlatformStatus(TypedDict, total=False):
    """What a platform shows of itself in the site status (Kubernetes mode: the API server
    and the controller; before the controller has started only the first three keys)."""

    api_server: str | None
    cluster_id: str | None
    reachable: bool | None
    unreachable_for_s: float | None
    synced: bool
    exports: int
    imports: int
    import_ports: int
    queued: int
    writes: int
    """Writes this replica sent to the API server."""
    fenced: int
    """Writes it did not send, not holding the Lease."""
    replica: str
    leading: bool
    leader: str | None
    lease_transitions: int
    replicas: list[ReplicaPod]
    """Every meshlink pod of this site (this one included), for `meshlink status`."""


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """Where flows for one port of one of this site's exports go: what ``meshlink check``
    probes."""

    service: ServiceKey
    port: int
    address: tuple[str, int] | None
    """The endpoint (host, port); None when nothing serves the port."""
    why: str | None = None
    """Why nothing serves it (``address`` None)."""


Publish = Callable[[Sequence[ExportRecord]], None]
"""Hands the catalog this site's exports (always the full set)."""
OnView = Callable[[ImportView], None]
"""Hands the import plane a new import view (cheap: the plane coalesces)."""


class Platform(Protocol):
    """Where a site's exports come from and its imports go: local mode (``LocalSite``) or
    Kubernetes (``KubernetesPlatform``). The runtime holds exactly one."""

    mode: str
    """"local" or "kubernetes" (shown in the status)."""
    import_range: str
    """The config key of the addresses import listeners use (named when one cannot bind)."""

    async def run(self, publish: Publish, on_view: OnView) -> None:
        """Publish this site's exports and announce import views until cancelled (returns
        early when there is nothing to watch)."""

    def catalog_changed(self, services: Mapping[ServiceKey, Sequence[ExportRecord]]) -> None:
        """Every live export of the clusterset (ours included), grouped by service."""

    def local_endpoint(self, namespace: str, name: str, port: int) -> tuple[str, int] | None:
        """Where a flow that arrived for our export ``namespace/name:port`` connects to;
        None if we do not export it (or nothing serves it)."""

    def reload(self, config: SiteConfig) -> None:
        """Take a configuration read again (SIGHUP): local mode applies its exports and
        namespaces at once; ConfigError when it cannot."""

    def export_targets(self) -> list[ExportTarget]:
        """Every endpoint flows for this site's exports go to, per TCP port (each ready
        endpoint in local mode; the exported Service's ClusterIP in Kubernetes mode)."""

    def not_ready(self) -> str | None:
        """Why the site must not be called ready yet (None: the platform is ready)."""

    def status(self) -> PlatformStatus | None: ...

    def conflicts(self) -> list[Conflict]: ...
