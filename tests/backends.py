"""Test backends behind real sites: a threaded TCP server whose first byte picks a protocol
(sha256 sink, echo, who-are-you, reset, half-close), the local-mode export that points a site
at it, and the client helpers that reach it through a site's import address."""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.sites import SiteProc, wait_until

MB = 1024 * 1024


class _Handler(socketserver.BaseRequestHandler):
    """Protocols by first byte: 'S' sha256 sink, 'E' echo, 'R' reset, 'H' server half-close."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        kind = sock.recv(1)
        if kind == b"S":  # read to EOF, answer the digest and byte count
            h, n = hashlib.sha256(), 0
            while chunk := sock.recv(256 * 1024):
                h.update(chunk)
                n += len(chunk)
            sock.sendall(h.digest() + struct.pack("!Q", n))
        elif kind == b"E":
            while chunk := sock.recv(65536):
                sock.sendall(chunk)
        elif kind == b"W":  # who are you
            sock.sendall(self.server.name.encode())  # type: ignore[attr-defined]
        elif kind == b"R":  # abortive close: RST (closed here, before socketserver's FIN)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif kind == b"H":  # send, half-close, keep reading, then report what arrived
            sock.sendall(b"x" * 1000)
            sock.shutdown(socket.SHUT_WR)
            n = 0
            while chunk := sock.recv(65536):
                n += len(chunk)
            # Peer finished too; nothing more can be sent, record for the test.
            self.server.after_half_close = n  # type: ignore[attr-defined]
        else:
            self.server.bad_kinds.append(kind)  # type: ignore[attr-defined]


class Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    after_half_close = -1

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.bad_kinds: list[bytes] = []
        self.name = ""


@contextmanager
def running_backend(name: str = "") -> Iterator[Backend]:
    srv = Backend(("127.0.0.1", 0), _Handler)
    srv.name = name
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    with running_backend() as srv:
        yield srv


def export(backend: Backend, name: str = "svc") -> list[dict[str, object]]:
    port = backend.server_address[1]
    return [
        {
            "name": name,
            "namespace": "test",
            "ports": [{"name": "tcp", "port": 9000, "targetPort": port}],
            "endpoints": ["127.0.0.1"],
        }
    ]


def connect(site: SiteProc, service: str = "test/svc", timeout: float = 20) -> socket.socket:
    found = wait_until(
        f"{service} importable at {site.name}", lambda: site.import_addr(service), timeout
    )
    return socket.create_connection((found[0], 9000), timeout=30)


def read_until_reset(s: socket.socket) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not s.recv(100):
            raise AssertionError("got a clean EOF where the server sent a reset")
    raise AssertionError("no reset within 10 s")


def send_until_broken(s: socket.socket) -> None:
    s.settimeout(15)
    block = os.urandom(64 * 1024)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        s.sendall(block)
    raise AssertionError("flow survived its gateway being killed for 15 s")


def sink_roundtrip(s: socket.socket, total: int) -> None:
    block = os.urandom(MB)
    h = hashlib.sha256()
    s.sendall(b"S")
    sent = 0
    while sent < total:
        s.sendall(block)
        h.update(block)
        sent += len(block)
    s.shutdown(socket.SHUT_WR)  # half-close: the server sees EOF, still answers
    reply = b""
    while len(reply) < 40:
        chunk = s.recv(40 - len(reply))
        assert chunk, "connection closed before the digest arrived"
        reply += chunk
    assert struct.unpack("!Q", reply[32:])[0] == total
    assert reply[:32] == h.digest()


def whoami(addr: str) -> str:
    with socket.create_connection((addr, 9000), timeout=5) as s:
        s.settimeout(5)
        s.sendall(b"W")
        return s.recv(100).decode()
