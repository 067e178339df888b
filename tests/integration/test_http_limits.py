"""The ops and grant HTTP servers of a real `meshlink run` process against slow and
hostile clients (raw sockets): unfinished requests and idle keep-alive connections are
closed after the head timeout, the connection cap closes idle connections for new ones,
and an over-long request line is a quiet 400."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlink.httpd import HEADER_TIMEOUT, MAX_CONNECTIONS
from tests.sites import SiteProc, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SiteProc]:
    a = SiteProc("a", tmp_path).start()
    try:
        yield a
    finally:
        a.stop()


def connect(site: SiteProc, port: str = "ops") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", site.ports[port]), timeout=10)
    if port == "grant":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(s)
    return s


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.001)
    try:
        return s.recv(1) == b""
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except (ConnectionResetError, ssl.SSLError):
        return True


def get(s: socket.socket, path: str = "/healthz") -> bytes:
    """One keep-alive request; the response head and body (small bodies only)."""
    s.settimeout(10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_unfinished_requests_and_idle_connections_are_closed(site: SiteProc) -> None:
    half = []
    for _ in range(20):
        s = connect(site)
        s.sendall(b"GET /heal")  # half a request line, never finished
        half.append(s)
    idle = connect(site)
    assert get(idle).startswith(b"HTTP/1.1 200")  # then nothing more: an idle keep-alive
    t0 = time.monotonic()
    try:
        wait_until(
            "the server to close unfinished and idle connections",
            lambda: all(closed_by_server(s) for s in [*half, idle]),
            timeout=HEADER_TIMEOUT + 10,
        )
    finally:
        for s in [*half, idle]:
            s.close()
    assert time.monotonic() - t0 >= HEADER_TIMEOUT - 2  # by the timer, not at once


def test_connection_cap_closes_idle_connections_for_new_ones(site: SiteProc) -> None:
    """MAX_CONNECTIONS + 30 unfinished requests: the 30 oldest are closed at once (well
    before the head timeout), and a new request is still served."""
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 30):
            s = connect(site)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the head never ends
            held.append(s)
        t0 = time.monotonic()
        wait_until(
            "the 30 oldest connections closed",
            lambda: all(closed_by_server(s) for s in held[:30]),
            timeout=HEADER_TIMEOUT / 2,
        )
        assert time.monotonic() - t0 < HEADER_TIMEOUT / 2
        fresh = connect(site)
        try:
            assert get(fresh).startswith(b"HTTP/1.1 200")
        finally:
            fresh.close()
        # The newest are still open: the cap closes only what it needs.
        assert not any(closed_by_server(s) for s in held[-50:])
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("port", ["ops", "grant"])
def test_overlong_request_line_is_a_quiet_400(site: SiteProc, port: str) -> None:
    s = connect(site, port)
    try:
        s.sendall(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        reply = s.recv(65536)
    finally:
        s.close()
    assert reply.split(b"\r\n", 1)[0].split()[1:2] == [b"400"], reply[:100]
    # Still serving, and nothing above DEBUG (no ERROR, no traceback) in the site's log.
    ok = connect(site)
    try:
        assert get(ok).startswith(b"HTTP/1.1 200")
    finally:
        ok.close()
    log = (site.dir / "meshlink.log").read_text()
    assert "LineTooLong" not in log
    assert "Traceback" not in log
    assert " ERROR " not in log


async def test_per_connection_bookkeeping_stays_bounded() -> None:
    """Many short connections (a probe every second, for days): the server remembers only
    about as many as its cap, not one per connection ever made."""
    import asyncio

    from aiohttp import web

    from meshlink import httpd

    async def ok(_req: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    served = await httpd.serve(
        app, "127.0.0.1", 0, key="test.listen", limits=httpd.Limits(max_connections=4)
    )
    try:
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
        assert served.remembered <= 2 * 4 + 1
    finally:
        await served.close()
