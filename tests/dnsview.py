"""Import views for the DNS tests: one way to write an imported service, so each test file
states only the services its assertions are about."""

from __future__ import annotations

from collections.abc import Iterable

from meshlink.catalog.records import Endpoint, Port, ServiceType
from meshlink.catalog.view import ClusterEndpoints, ImportedService

Ep = Endpoint


def clusterset_ip(
    name: str,
    ips: tuple[str, ...],
    ports: Iterable[Port],
    clusters: Iterable[str] = ("east",),
    namespace: str = "default",
) -> ImportedService:
    """A ClusterSetIP import served by ``clusters``."""
    return ImportedService(
        namespace,
        name,
        ServiceType.CLUSTERSET_IP,
        ips,
        tuple(ports),
        tuple(ClusterEndpoints(c) for c in clusters),
    )


def headless(
    name: str,
    ports: Iterable[Port],
    clusters: dict[str, Iterable[Endpoint]],
    namespace: str = "default",
) -> ImportedService:
    """A Headless import: each cluster with its endpoints."""
    return ImportedService(
        namespace,
        name,
        ServiceType.HEADLESS,
        (),
        tuple(ports),
        tuple(ClusterEndpoints(c, tuple(eps)) for c, eps in clusters.items()),
    )
