"""Routing: where a flow goes, in one policy.

``route(target)`` answers the gateway for a flow that arrived over a link (or from an
import listener): served here (the platform's local endpoint), or the next hop towards the
target's site (the catalog's best path). ``candidates(spec)`` orders the exporting sites of
an import listener for a new flow: this site first, then fewer hops, then the lower RTT of
the first hop. Both are asked per flow, so they look up only the sites involved.
"""

from __future__ import annotations

from typing import Protocol

from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import ListenerSpec, Platform
from meshlink.proto import FlowTarget
from meshlink.tunnel import LocalRoute, NoRoute, PeerRoute, Route


class RttSource(Protocol):
    def rtt_ms(self, peer: str) -> float | None: ...


class Router:
    """See the module docstring. ``attach`` the gateway (for RTTs) before flows arrive."""

    def __init__(self, site: str, catalog: Catalog, platform: Platform) -> None:
        self.site = site
        self.catalog = catalog
        self.platform = platform
        self._rtts: RttSource | None = None

    def attach(self, gateway: RttSource) -> None:
        self._rtts = gateway

    def route(self, target: FlowTarget) -> Route:
        if target.site == self.site:
            endpoint = self.platform.local_endpoint(target.namespace, target.name, target.port)
            if endpoint is None:
                return NoRoute(f"{target.namespace}/{target.name}:{target.port} is not served here")
            return LocalRoute(*endpoint)
        hop = self.catalog.next_hop(target.site)
        if hop is None:
            return NoRoute(f"no live path to site {target.site}")
        return PeerRoute(hop)

    def candidates(self, spec: ListenerSpec) -> list[FlowTarget]:
        routes = [r for o in spec.origins if (r := self.catalog.route_to(o)) is not None]
        if len(routes) > 1:
            routes.sort(key=lambda r: (r.hops, self._rtt(r.via), r.site))
        return [
            FlowTarget(r.site, spec.key.namespace, spec.key.name, spec.service_port) for r in routes
        ]

    def _rtt(self, peer: str | None) -> float:
        rtt = self._rtts.rtt_ms(peer) if peer is not None and self._rtts is not None else None
        return 0.0 if rtt is None else rtt
