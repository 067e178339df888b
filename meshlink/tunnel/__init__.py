"""The gateway data plane: TLS links, dialer with backoff, heartbeats, TCP flow forwarding.

Modules: `gateway` (links, dialing, routing, relaying), `link` (one TLS link and its
multiplexed streams), `splice` (flow ends and backpressure), `importer` (import
listeners), `types` (dial specs, routes, status, flow errors).

Multiplexing vs a per-flow TLS pool was decided by measurement; see `gateway`'s docstring
and benchmarks/tunnel.py.
"""

from meshlink.tunnel.gateway import Gateway
from meshlink.tunnel.importer import ImportListener
from meshlink.tunnel.splice import Flow
from meshlink.tunnel.types import (
    DialSpec,
    FlowError,
    FlowRefused,
    GatewayHandler,
    LinkStatus,
    LocalRoute,
    NoRoute,
    NoRouteError,
    PeerRoute,
    Route,
)

__all__ = [
    "DialSpec",
    "Flow",
    "FlowError",
    "FlowRefused",
    "Gateway",
    "GatewayHandler",
    "ImportListener",
    "LinkStatus",
    "LocalRoute",
    "NoRoute",
    "NoRouteError",
    "PeerRoute",
    "Route",
]
