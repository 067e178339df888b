"""A linked but hostile peer against a real `meshlink run` process: the frames it may send
are bounded (streams per link, new flows per second), protocol violations are refused with
their wire code, and its text cannot forge lines in the site's log.

The peer is tests.rawpeer.RawPeer: a real redemption, then raw frames over TLS 1.3.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlink.errors import ErrorCode
from meshlink.proto import FlowTarget
from meshlink.proto import frames as F
from tests.rawpeer import Frame, RawPeer, goaway, linked_peer
from tests.sites import SiteProc, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def sink() -> Iterator[int]:
    """A TCP port whose listener never accepts: up to 2,048 connections complete in its
    backlog and are held open, like a slow service (no thread per connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(2048)
        yield s.getsockname()[1]


def exporting_site(root: Path, port: int, **gateway: object) -> SiteProc:
    exports = [
        {
            "name": "svc",
            "namespace": "test",
            "ports": [{"port": 9000, "targetPort": port}],
            "endpoints": ["127.0.0.1"],
        }
    ]
    site = SiteProc("a", root, exports)
    site.extra = {"gateway": {"listen": f"127.0.0.1:{site.ports['gateway']}", **gateway}}
    site.write_config()
    return site.start()


TARGET = FlowTarget(site="a", namespace="test", name="svc", port=9000)


def sockets_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def answers(peer: RawPeer, sids: set[int]) -> dict[int, Frame]:
    """The ACCEPT or RST of each stream id, in whatever order they come."""
    got: dict[int, Frame] = {}
    while len(got) < len(sids):
        frm = peer.read(20)
        assert frm is not None, f"the site closed the link after {len(got)} answers"
        if frm.stream in sids and frm.type in (F.FrameType.ACCEPT, F.FrameType.RST):
            got[frm.stream] = frm
    return got


def refusals(got: dict[int, Frame]) -> list[tuple[ErrorCode, str]]:
    return [F.decode_rst(f.payload) for f in got.values() if f.type == F.FrameType.RST]


def test_stream_limit_is_announced_and_the_excess_refused(tmp_path: Path, sink: int) -> None:
    """600 OPENs: the site announced 512 in its HELLO, accepts 512 (one upstream socket
    each) and refuses the other 88 with REFUSED_STREAM; its sockets stay bounded."""
    a = exporting_site(tmp_path, sink)
    try:
        peer = RawPeer(a, linked_peer(a))
        try:
            peer.hello()
            hello = peer.read_until(F.FrameType.HELLO)
            assert F.decode_hello(hello.payload).max_streams == 512
            assert a.proc is not None
            before = sockets_of(a.proc.pid)
            sids = {peer.open(TARGET) for _ in range(600)}
            got = answers(peer, sids)
            accepted = sorted(s for s, f in got.items() if f.type == F.FrameType.ACCEPT)
            assert len(accepted) == 512
            assert set(refusals(got)) == {
                (ErrorCode.REFUSED_STREAM, "more than 512 open streams on this link")
            }
            # 512 upstream connections, not 600 (a few sockets of slack for the site's own).
            assert sockets_of(a.proc.pid) - before <= 512 + 8
            # Closing streams frees their slots: reset 10, then 10 new ones are accepted.
            for sid in accepted[:10]:
                peer.send(F.FrameType.RST, sid, F.encode_rst(ErrorCode.CANCEL))
            again = answers(peer, {peer.open(TARGET) for _ in range(10)})
            assert {f.type for f in again.values()} == {F.FrameType.ACCEPT}
        finally:
            peer.close()
    finally:
        a.stop()


def test_new_flow_rate_is_limited_per_link(tmp_path: Path, sink: int) -> None:
    a = exporting_site(tmp_path, sink, newFlowsPerSecond=5)
    try:
        peer = RawPeer(a, linked_peer(a))
        try:
            peer.hello()
            peer.read_until(F.FrameType.HELLO)
            sids = {peer.open(TARGET) for _ in range(40)}
            refused = refusals(answers(peer, sids))
            # A burst of 5, plus what 5 a second refills while 40 OPENs are read.
            assert 40 - 10 <= len(refused) <= 40 - 5
            assert set(refused) == {(ErrorCode.REFUSED_STREAM, "a: more than 5 new flows a second")}
        finally:
            peer.close()
    finally:
        a.stop()


def test_hello_on_a_stream_is_refused_with_protocol_error(tmp_path: Path) -> None:
    a = SiteProc("a", tmp_path).start()
    try:
        peer = RawPeer(a, linked_peer(a))
        try:
            peer.hello(sid=7)
            peer.send(F.FrameType.PING, 0, b"12345678")
            frames = []
            while (frm := peer.read()) is not None:
                frames.append(frm)
            assert [f.type for f in frames] == [F.FrameType.HELLO, F.FrameType.GOAWAY]
            code, text = goaway(frames[1])
            assert code == ErrorCode.PROTOCOL_ERROR
            assert "HELLO frame on stream 7" in text
            assert a.link_state("peer") is None  # never came up
        finally:
            peer.close()
    finally:
        a.stop()


FORGED = "\n\x1b[31mFAKE LOG LINE \u2028 and \r more"


def test_peer_text_cannot_forge_log_lines(tmp_path: Path) -> None:
    """A GOAWAY reason with a newline, an ANSI escape and a Unicode line separator reaches
    the site's text log escaped, within the lines that report it."""
    a = SiteProc("a", tmp_path).start()
    try:
        peer = RawPeer(a, linked_peer(a))
        try:
            peer.hello()
            peer.read_until(F.FrameType.HELLO)
            wait_until("the raw peer's link up", lambda: a.link_state("peer") == "up")
            peer.send(F.FrameType.GOAWAY, 0, F.encode_goaway(ErrorCode.INTERNAL_ERROR, FORGED))
            wait_until(
                "the GOAWAY reason in the log",
                lambda: "FAKE LOG LINE" in (a.dir / "meshlink.log").read_text(),
            )
        finally:
            peer.close()
    finally:
        a.stop()
    raw = (a.dir / "meshlink.log").read_bytes()
    assert b"\x1b" not in raw
    assert "\u2028".encode() not in raw
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    reports = [ln for ln in lines if "FAKE LOG LINE" in ln]
    assert reports
    for line in reports:  # the link's, the gateway's and the runtime's line
        assert (
            "peer closed the link: INTERNAL_ERROR (\\n\\x1b[31mFAKE LOG LINE \\u2028 and \\r more)"
            in line
        )
    assert all(ln.startswith("20") for ln in lines)  # every line is a timestamped record
