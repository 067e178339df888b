"""The site's Prometheus metrics: one registry, served by the ops server at /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshlink.tunnel import LinkStatus


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.links_up = Gauge("meshlink_links_up", "Live links to peers", registry=r)
        self.rtt = Gauge("meshlink_link_rtt_seconds", "Heartbeat RTT", ["peer"], registry=r)
        self.sites = Gauge("meshlink_sites_reachable", "Sites with a live path", registry=r)
        self.services = Gauge("meshlink_imported_services", "Imported services", registry=r)
        self.refused = Counter(
            "meshlink_catalog_refused_total", "Catalog entries refused from peers", registry=r
        )
        self.propagation = Histogram(
            "meshlink_catalog_propagation_seconds",
            "Delay from an export change at its origin, or from the link-up that carried it "
            "when that came later, to this site (clock-skew sensitive)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

    def observe_links(self, statuses: Sequence[LinkStatus]) -> None:
        """The link gauges from the gateway's view of its links."""
        for st in statuses:
            if st.rtt_ms is not None:
                self.rtt.labels(st.peer_site).set(st.rtt_ms / 1000)
        self.links_up.set(sum(1 for st in statuses if st.state == "up"))
