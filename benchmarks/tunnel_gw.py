"""Benchmark helper: one meshlink gateway in its own process (uvloop), built from arguments.

    python benchmarks/tunnel_gw.py --site a --state DIR --peer-ca B_CA.pem \
        [--listen 127.0.0.1:PORT] [--dial b@127.0.0.1:PORT] \
        [--export ns/name/port=host:port ...] [--import LISTEN_PORT=site/ns/name/port ...]

Prints "READY" once listening and "LINK UP <peer>" when a link comes up, then serves until
SIGTERM/SIGINT. With --profile FILE, writes cProfile stats there on exit.
Bench-only code: it lives here, not in the meshlink package.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import signal
import sys
from pathlib import Path

import uvloop

from meshlink import pki
from meshlink.proto import FlowTarget
from meshlink.tunnel import (
    DialSpec,
    Gateway,
    ImportListener,
    LocalRoute,
    NoRoute,
    PeerRoute,
    Route,
)


class Handler:
    def __init__(self, site: str, exports: dict[tuple[str, str, int], tuple[str, int]]) -> None:
        self.site = site
        self.exports = exports

    def link_up(self, peer_site: str) -> None:
        print(f"LINK UP {peer_site}", flush=True)

    def link_down(self, peer_site: str, reason: str) -> None:
        pass  # stdout is a pipe nobody reads after start-up: stay quiet

    def control_received(self, peer_site: str, payload: bytes) -> None:
        pass

    def route(self, target: FlowTarget) -> Route:
        if target.site == self.site:
            ep = self.exports.get((target.namespace, target.name, target.port))
            return LocalRoute(*ep) if ep else NoRoute("not exported")
        return PeerRoute(target.site)


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(args: argparse.Namespace) -> None:
    ident = pki.SiteIdentity.load_or_create(Path(args.state), args.site)
    peer_ca = Path(args.peer_ca).read_bytes()
    exports = {}
    for e in args.export:
        key, _, dest = e.partition("=")
        ns, name, port = key.split("/")
        exports[(ns, name, int(port))] = hostport(dest)
    handler = Handler(args.site, exports)
    gw = Gateway(
        args.site,
        listen=hostport(args.listen) if args.listen else None,
        server_context=lambda: pki.server_context(
            ident.gateway_chain_path, ident.gateway_key_path, [ident.ca_pem, peer_ca]
        ),
        authorize=lambda site: True,
        handler=handler,
        route=handler.route,
    )
    if args.dial:
        peer, _, ep = args.dial.partition("@")
        gw.set_dials(
            [
                DialSpec(
                    name=f"to-{peer}",
                    peer_site=peer,
                    endpoints=(ep,),
                    ssl_context=lambda: pki.client_context(
                        ident.gateway_chain_path, ident.gateway_key_path, peer_ca
                    ),
                )
            ]
        )
    runner = asyncio.create_task(gw.run())
    await gw.started()
    listeners = []
    for imp in args.imports:
        port, _, dest = imp.partition("=")
        site, ns, name, tport = dest.split("/")
        target = FlowTarget(site, ns, name, int(tport))
        lst = ImportListener(gw, ("127.0.0.1", int(port)), lambda t=target: [t])
        await lst.start()
        listeners.append(lst)
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for lst in listeners:
        await lst.close()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--site", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--peer-ca", required=True)
    p.add_argument("--listen")
    p.add_argument("--dial")
    p.add_argument("--export", action="append", default=[])
    p.add_argument("--import", dest="imports", action="append", default=[])
    p.add_argument("--profile")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args()
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    prof = cProfile.Profile() if a.profile else None
    if prof is not None:
        prof.enable()
    try:
        uvloop.run(main(a))
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(a.profile)
    sys.exit(0)
