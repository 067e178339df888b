"""The import view: what a site materialises for each service exported in the clusterset.

This is the one interface between the catalog and its consumers (DNS, import listeners,
the Kubernetes controller). Producers (local mode, the k8s controller) build a tuple of
``ImportedService`` after applying namespace sameness and the merge rules, and a tuple of
``ListenerSpec`` (the gateway listeners that carry the imports' traffic); consumers treat
both as immutable snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlink.catalog.records import Endpoint, Port, ServiceKey, ServiceType


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
