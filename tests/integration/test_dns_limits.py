"""The DNS server's TCP connection cap against a client that holds connections idle: a
real `meshlink dns` process, real sockets, dig as the resolver. At the cap (256) a new
TCP query is still answered (the quietest connection is closed for it), and UDP is
answered throughout."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest

from meshlink.dns.server import MAX_TCP_CONNECTIONS
from tests.sites import free_port, wait_until

pytestmark = pytest.mark.timeout(60)

NAME = "web.shop.svc.clusterset.local"


@pytest.fixture
def dns_port(tmp_path: Path) -> Iterator[int]:
    records = tmp_path / "records.yaml"
    records.write_text(
        "services:\n  - {name: web, namespace: shop, ips: [10.96.0.10], ports: [{port: 80}],"
        " clusters: [{cluster: east}]}\n"
    )
    port = free_port()
    log = (tmp_path / "dns.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "meshlink", "dns"),
            *("--records", str(records), "--listen", f"127.0.0.1:{port}"),
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        wait_until("the DNS server answers", lambda: dig(port) == "10.96.0.10" or None)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in (tmp_path / "dns.log").read_text()


def dig(port: int, *extra: str) -> str:
    exe = shutil.which("dig")
    assert exe, "dig is required (Debian package dnsutils)"
    out = subprocess.run(
        [exe, "@127.0.0.1", "-p", str(port), "+short", "+time=2", "+tries=1", *extra, NAME],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip() if out.returncode == 0 else f"dig failed: {out.stdout.strip()}"


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def tcp_query(s: socket.socket) -> str:
    """Ask NAME A on an open TCP connection; the first address answered."""
    wire = dns.message.make_query(NAME, "A").to_wire()
    s.setblocking(True)
    s.sendall(len(wire).to_bytes(2, "big") + wire)
    size = int.from_bytes(recv_exactly(s, 2), "big")
    reply = dns.message.from_wire(recv_exactly(s, size))
    return str(reply.answer[0][0])


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_idle_tcp_connections_cannot_lock_out_new_queries(dns_port: int) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_TCP_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", dns_port), timeout=5))
        # The first one asks a question: the second is now the quietest.
        assert tcp_query(held[0]) == "10.96.0.10"
        # At the cap: a new TCP query is still answered, and UDP throughout.
        assert dig(dns_port, "+tcp") == "10.96.0.10"
        assert dig(dns_port) == "10.96.0.10"
        wait_until("the quietest connection closed", lambda: closed_by_server(held[1]), 5)
        # Only as many as needed were closed, and not the active one.
        assert not any(closed_by_server(s) for s in held[2:])
        assert tcp_query(held[0]) == "10.96.0.10"
    finally:
        for s in held:
            s.close()
