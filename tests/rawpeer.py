"""A linked peer that speaks the tunnel protocol frame by frame: for hostile-input tests.

The peer is a real site's state (redeemed with `meshlink link create`, as a user would) that
never runs: the test dials the issuer's gateway itself over TLS 1.3 with the link
certificate, and writes whatever frames it likes. Every read is bounded by a deadline.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from meshlink import links, pki
from meshlink.errors import ErrorCode
from meshlink.proto import FlowTarget
from meshlink.proto import frames as F
from tests.sites import SiteProc


@dataclass(frozen=True)
class Frame:
    type: int
    stream: int
    payload: bytes


class RawPeer:
    """One TLS connection to a site's gateway, as the linked site ``peer``."""

    def __init__(self, issuer: SiteProc, peer: SiteProc) -> None:
        rec = links.find_link_to(peer.state_dir, issuer.name)
        assert rec is not None, f"{peer.name} has no link to {issuer.name}"
        identity = pki.SiteIdentity.load_or_create(peer.state_dir, peer.name)
        ctx = links.link_client_context(identity, rec)
        raw = socket.create_connection(("127.0.0.1", issuer.ports["gateway"]), timeout=10)
        self.sock = ctx.wrap_socket(raw)
        self.buf = b""
        self.next_sid = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, ftype: int, sid: int, payload: bytes = b"") -> None:
        self.sock.sendall(F.frame(ftype, sid, payload))

    def hello(self, sid: int = 0) -> None:
        self.send(F.FrameType.HELLO, sid, F.encode_hello(1, F.DEFAULT_MAX_FRAME, 1 << 20))

    def open(self, target: FlowTarget) -> int:
        """Send an OPEN (whatever the site's limit says); returns the stream id."""
        sid = self.next_sid
        self.next_sid += 2
        self.send(F.FrameType.OPEN, sid, F.encode_open(target, 0))
        return sid

    def read(self, timeout: float = 10) -> Frame | None:
        """The next frame; None when the site closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= F.HEADER_SIZE:
                length, ftype, _flags, sid = F.HEADER.unpack_from(self.buf)
                if len(self.buf) >= F.HEADER_SIZE + length:
                    payload = self.buf[F.HEADER_SIZE : F.HEADER_SIZE + length]
                    self.buf = self.buf[F.HEADER_SIZE + length :]
                    return Frame(ftype, sid, payload)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame from the site within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk

    def read_until(self, ftype: int, timeout: float = 10) -> Frame:
        """Skip frames until one of ``ftype`` (PINGs and the like), bounded in time."""
        deadline = time.monotonic() + timeout
        while True:
            frm = self.read(max(0.01, deadline - time.monotonic()))
            if frm is None:
                raise AssertionError(f"the site closed the connection before a {ftype} frame")
            if frm.type == ftype:
                return frm


def goaway(frm: Frame) -> tuple[ErrorCode, str]:
    assert frm.type == F.FrameType.GOAWAY, frm
    return F.decode_goaway(frm.payload)


def linked_peer(issuer: SiteProc, name: str = "peer") -> SiteProc:
    """A site that redeemed one of ``issuer``'s tokens and is not running (its state only)."""
    peer = SiteProc(name, issuer.root)
    peer.redeem(issuer.token())
    return peer
