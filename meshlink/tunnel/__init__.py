"""The gateway data plane: TLS links, dialer with backoff, heartbeats, TCP flow forwarding.

Modules: `gateway` (links, dialing, routing, relaying), `link` (one TLS link and its
multiplexed streams), `splice` (flow ends and backpressure), `importer` (import
listeners), `types` (dial specs, routes, status, flow errors).

Decision: multiplexed streams over one TLS 1.3 connection per peer, not a warm pool
-----------------------------------------------------------------------------------
Measured on the shared 2-core machine (other work running: load average 3-9), with
`python benchmarks/tunnel.py` (3 interleaved runs, medians; two gateway processes on
uvloop vs a stunnel4 client/server pair, both mTLS TLS 1.3):

=============================  ========  ==========  =========  ===================
metric                         direct    meshlink    stunnel4   meshlink / stunnel
=============================  ========  ==========  =========  ===================
iperf3, 1 flow                 23.3 Gb/s  2.75 Gb/s  3.75 Gb/s  0.73x
iperf3, 8 flows                20.8 Gb/s  3.01 Gb/s  3.75 Gb/s  0.80x
tunnel CPU per GB, 1 flow      -         1.99 s      1.90 s     1.05x (quick runs)
wrk -t2 -c50, requests/s       39.3k     20.7k       12.1k      1.71x
wrk p99                        3.5 ms    15.6 ms     18.5 ms    0.84x
setup: connect+req+close, mean 0.12 ms   0.78 ms     2.14 ms    0.36x
=============================  ========  ==========  =========  ===================

- A full mutual TLS 1.3 handshake (P-256, both ends, uvloop) costs 1.4 ms of CPU, i.e. at
  most ~700 new TLS connections per second per core. A warm pool hands out one connection
  per flow and must replace it with a new handshake, so under churn (the setup benchmark
  opens ~1,000 flows/s) refilling the pool alone would need more than a core, and setup
  falls back to handshake latency (stunnel: 2.1-5 ms). Opening a stream is one OPEN frame:
  0.78 ms end to end here, most of it the two extra process hops, with no crypto per flow.
- Throughput: the gateways need about the same CPU per byte as stunnel (1.99 vs 1.90
  CPU-seconds per GB for one flow; Python work is under 10% of a gateway's profile, the rest
  is OpenSSL and socket I/O inside uvloop). What is missing is parallelism: each gateway is
  one thread, while stunnel runs a thread per connection, so on a busy machine it gets
  more CPU. Per-stream credit was the other limit: 1 MiB windows held one flow near 1-2 Gb/s
  (the WINDOW round trip crosses two busy processes), 4 MiB roughly doubled it.
- Head-of-line blocking: streams share one TCP connection, so a small flow can wait behind
  queued bulk data. That wait is bounded by a 2 MiB TLS write buffer, per-stream windows,
  and round-robin draining of parked streams; the integration tests check that small
  request/responses complete while a bulk flow saturates the link.

Not reached (targets were 1.5x stunnel throughput, setup <= 0.1x stunnel): next steps would
be a second TLS connection per link driven by its own thread (OpenSSL releases the GIL, so
one link could use both cores), and fewer copies on the receive path.
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
