"""Running the DNS server on its own: ``meshlink dns --records FILE`` (local mode).

``serve`` runs a DnsServer until cancelled; ``serve_file`` also reloads the records file
when it changes (a bad edit is logged in one line and the last good records stay served).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from pathlib import Path

from meshlink.config import listen_error
from meshlink.dns.server import DnsServer
from meshlink.dns.snapshot import Snapshot, build_snapshot
from meshlink.dns.static import load_services
from meshlink.errors import MeshlinkError

log = logging.getLogger(__name__)


async def start_server(snapshot: Snapshot, host: str, port: int) -> DnsServer:
    """Start a DnsServer; a busy or forbidden address becomes one clear ConfigError."""
    server = DnsServer(snapshot, host=host, port=port)
    try:
        await server.start()
    except OSError as e:
        raise listen_error("dns.listen", host, port, e) from None
    return server


async def serve(
    snapshot: Snapshot,
    host: str,
    port: int,
    *,
    on_started: Callable[[DnsServer], None] | None = None,
) -> None:
    """Serve ``snapshot`` until cancelled. ``on_started`` gets the running server (its
    ``update`` swaps snapshots, its ``bound_port`` is the port when ``port`` was 0)."""
    server = await start_server(snapshot, host, port)
    settle_heap()
    try:
        if on_started is not None:
            on_started(server)
        await asyncio.Event().wait()
    finally:
        await server.close()


async def serve_file(
    path: str | Path,
    host: str,
    port: int,
    *,
    zone: str = "clusterset.local",
    ttl: int = 5,
    reload_interval: float = 1.0,
    on_started: Callable[[DnsServer], None] | None = None,
) -> None:
    """Serve the records of ``path``, reloading it when its modification time changes."""
    p = Path(path)
    snapshot = build_snapshot(load_services(p), zone=zone, ttl=ttl)
    server = await start_server(snapshot, host, port)
    settle_heap()
    try:
        if on_started is not None:
            on_started(server)
        seen = _stamp(p)
        while True:
            await asyncio.sleep(reload_interval)
            stamp = _stamp(p)
            if stamp == seen:
                continue
            seen = stamp
            try:
                services = load_services(p)
            except MeshlinkError as e:
                log.warning("dns: keeping the previous records: %s", e)
                continue
            server.update(build_snapshot(services, zone=zone, ttl=ttl))
            settle_heap()
            log.info("dns: reloaded %s: %d services", p, len(services))
    finally:
        await server.close()


def settle_heap() -> None:
    """Collect, then move every live object (the snapshot included) out of the cyclic
    collector's reach (``gc.freeze``): a full collection over a 1,000-service snapshot's
    objects costs 20-40 ms here, frozen ~0. Frozen objects are still freed by reference
    counting when a snapshot is dropped. For a process that serves DNS on its own; the
    daemon's runtime may do the same once after startup."""
    gc.collect()
    gc.freeze()


def _stamp(p: Path) -> tuple[float, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size
