"""The import plane: listeners follow the newest view, a listener that cannot bind is
retried, and a retry never brings back a set a newer view replaced; DNS follows, after the
listeners."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import dns.message
import dns.query
import pytest

from meshlink import config
from meshlink.catalog.records import Port, ServiceKey, ServiceType
from meshlink.catalog.view import ClusterEndpoints, ImportedService, ImportView, ListenerSpec
from meshlink.runtime import SiteRuntime
from meshlink.site import ImportPlane
from tests.sites import free_port

pytestmark = pytest.mark.timeout(60)


def _spec(port: int) -> ListenerSpec:
    return ListenerSpec(ServiceKey("shop", f"s{port}"), "127.0.0.1", port, 80, ("b",))


def _view(*ports: int) -> ImportView:
    imports = tuple(
        ImportedService(
            "shop",
            f"s{p}",
            ServiceType.CLUSTERSET_IP,
            ("127.0.0.1",),
            (Port(80),),
            (ClusterEndpoints("b"),),
        )
        for p in ports
    )
    return ImportView(imports, tuple(_spec(p) for p in ports))


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


@contextlib.asynccontextmanager
async def running_plane(tmp_path: Path) -> AsyncIterator[ImportPlane]:
    rt = SiteRuntime(config.parse({"site": "a", "stateDir": str(tmp_path)}))
    plane = rt.imports
    await plane.start_dns("127.0.0.1", 0)
    task = asyncio.create_task(plane.run())
    try:
        yield plane
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await plane.close()


def _ports(plane: ImportPlane) -> list[int]:
    return [s.port for s in plane.listeners()]


async def test_a_retry_never_brings_back_a_set_a_newer_update_replaced(tmp_path: Path) -> None:
    squatter = socket.create_server(("127.0.0.1", 0))
    busy = squatter.getsockname()[1]
    try:
        async with running_plane(tmp_path) as plane:
            plane.apply(_view(busy))
            await until(lambda: bool(plane.errors()), "the busy port's error")
            assert [s.port for s, _ in plane.errors()] == [busy]
            assert _ports(plane) == []
            new = free_port()
            # A newer view and a retry, both before the plane's task runs again.
            plane.apply(_view(new))
            plane.retry()
            await until(lambda: _ports(plane) == [new], "the new listener")
            assert not plane.errors()
            with socket.create_connection(("127.0.0.1", new), timeout=5):
                pass
            plane.apply(ImportView())
            await until(lambda: _ports(plane) == [], "every listener closed")
    finally:
        squatter.close()


async def test_a_listener_that_could_not_bind_opens_on_retry(tmp_path: Path) -> None:
    squatter = socket.create_server(("127.0.0.1", 0))
    busy = squatter.getsockname()[1]
    async with running_plane(tmp_path) as plane:
        plane.apply(_view(busy))
        await until(lambda: bool(plane.errors()), "the busy port's error")
        squatter.close()
        plane.retry()
        await until(lambda: _ports(plane) == [busy], "the listener on retry")
        assert not plane.errors()


async def test_dns_serves_the_view_once_applied(tmp_path: Path) -> None:
    async with running_plane(tmp_path) as plane:
        assert plane.dns is not None
        port = plane.dns.bound_port
        name = "s1.shop.svc.clusterset.local"

        def answer() -> list[str]:
            q = dns.message.make_query(name, "A")
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=2)
            return [rr.to_text() for rrset in r.answer for rr in rrset]

        assert await asyncio.to_thread(answer) == []
        view = _view(free_port())
        view = ImportView(
            (ImportedService("shop", "s1", ServiceType.CLUSTERSET_IP, ("127.0.0.9",), (), ()),),
            view.listeners,
        )
        plane.apply(view)
        await until(lambda: plane.imports == view.imports, "the view applied")
        assert await asyncio.to_thread(answer) == ["127.0.0.9"]
