"""The runtime's import listeners: applied under one lock, retried when they cannot bind."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from meshlink import config
from meshlink.catalog.records import ServiceKey
from meshlink.catalog.view import ListenerSpec
from meshlink.runtime import SiteRuntime


def _spec(port: int) -> ListenerSpec:
    return ListenerSpec(ServiceKey("shop", f"s{port}"), "127.0.0.1", port, 80, ("b",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_a_retry_never_brings_back_a_set_a_newer_update_replaced(tmp_path: Path) -> None:
    rt = SiteRuntime(config.parse({"site": "a", "stateDir": str(tmp_path)}))
    squatter = socket.create_server(("127.0.0.1", 0))
    busy = squatter.getsockname()[1]
    try:
        await rt._apply_listeners({("127.0.0.1", busy): _spec(busy)})
        assert list(rt._listener_errors) == [("127.0.0.1", busy)]
        new = _free_port()
        # An update and then a retry both wait for the lock; the update goes first.
        async with rt._listeners_lock:
            update = asyncio.create_task(rt._apply_listeners({("127.0.0.1", new): _spec(new)}))
            retry = asyncio.create_task(rt._apply_listeners())
            await asyncio.sleep(0)  # both are now queued on the lock
        await asyncio.wait_for(asyncio.gather(update, retry), 10)
        assert list(rt._listeners) == [("127.0.0.1", new)]
        assert list(rt._listener_specs) == [("127.0.0.1", new)]
        assert not rt._listener_errors
        with socket.create_connection(("127.0.0.1", new), timeout=5):
            pass
    finally:
        squatter.close()
        await rt._apply_listeners({})
    assert not rt._listeners
