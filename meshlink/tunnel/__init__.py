"""The gateway data plane: TLS links, dialer with backoff, heartbeats, TCP flow forwarding.

Modules: `gateway` (links, dialing, routing, relaying), `link` (one TLS link and its
multiplexed streams), `splice` (flow ends and backpressure), `importer` (import
listeners), `types` (dial specs, routes, status, flow errors).

Decision: multiplexed streams over one TLS 1.3 connection per peer, not a warm pool
-----------------------------------------------------------------------------------
Measured with `python benchmarks/tunnel.py` on the shared 2-core machine (other engineers'
work running, load average 2-5), 3 interleaved runs, medians; two gateway processes on
uvloop vs a stunnel4 client/server pair, both mutual TLS 1.3:

===================================  =========  =========  =========  ==================
metric                               direct     meshlink   stunnel4   meshlink/stunnel
===================================  =========  =========  =========  ==================
iperf3, 1 flow                       22.4 Gb/s  3.30 Gb/s  4.37 Gb/s  0.75x
iperf3, 8 flows                      23.8 Gb/s  5.36 Gb/s  6.45 Gb/s  0.83x
tunnel CPU-seconds per GB, 1 flow    -          2.32       2.12       1.09x
tunnel CPU-seconds per GB, 8 flows   -          2.16       1.89       1.14x
wrk -t2 -c50, requests/s             65.9k      28.2k      15.8k      1.78x
wrk p99                              1.7 ms     3.3 ms     7.1 ms     0.47x
setup (connect, request, close)      0.14 ms    0.70 ms    1.79 ms    0.39x
setup while a bulk flow runs, p99    0.39 ms    18.2 ms    10.8 ms    1.68x
===================================  =========  =========  =========  ==================

- A full mutual TLS 1.3 handshake (P-256, both ends, uvloop) costs 1.4 ms of CPU: at most
  ~700 new TLS connections per second per core. A warm pool hands out one connection per
  flow and must replace it with a new handshake, so under churn (the setup benchmark opens
  over 1,000 flows/s) refilling it would need more than a core, and setup falls back to
  handshake latency (stunnel: 1.8 ms with its session cache, 5 ms without). Opening a
  stream is one OPEN frame: 0.70 ms end to end, mostly the two extra process hops. Import
  listeners with a single candidate send data before the ACCEPT (one round trip saved).
- Throughput: the gateways spend about the same CPU per byte as stunnel (within 15%;
  Python is under 10% of a gateway's profile, the rest is OpenSSL and socket I/O inside
  uvloop). The gap is parallelism: a gateway is one thread, stunnel a thread per
  connection. Credit was the first limit found: 1 MiB stream windows held one flow near
  1-2 Gb/s (the WINDOW round trip crosses two busy processes); 4 MiB fixed it, 8 MiB gave
  nothing more.
- Head-of-line blocking: streams share one TCP connection, so a small flow can queue
  behind bulk data. Parked streams are drained round robin in 64 KiB quanta, the TLS write
  buffer is 1 MiB and the link sockets' buffers 4 MiB; before the quanta, a small flow's p99
  behind a bulk flow was 286 ms, now 18 ms (stunnel, one TCP connection per flow: 11 ms).

Not reached: the targets of 1.5x stunnel throughput and setup at 0.1x stunnel's. Next
steps: a second TLS connection per link driven by its own thread (OpenSSL releases the
GIL, so a link could use both cores) and a separate connection for small flows.
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
    RouteFn,
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
    "RouteFn",
]
