"""Active/active in local mode (issue 12 item 3): two `meshlink run` processes of one site
sharing a state directory, each with its own gateway, both linked to a peer site.

Site a runs instances a-1 and a-2 (``gateway.replicas: 2``, both advertising both
gateways); site b redeems a token from a and dials until it holds a link with each. A
client at b opens a new connection through b's import every 50 ms while one instance of a
is killed (-9), and a bulk flow through the other instance runs across the kill. What must
hold: new flows succeed again within 2 s (the longest gap and the failure share are
printed), the bulk flow keeps its checksum, and b sees no withdrawal: its import view (the
address, the reachable clusters) never changes and a never becomes unreachable there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.backends import Backend, export
from tests.sites import SiteProc, wait_until

pytestmark = pytest.mark.timeout(180)

PORT = 9000


def instances(root: Path, exports: list[dict[str, Any]], n: int = 2) -> list[SiteProc]:
    """``n`` instances of site a, one state directory, every gateway advertised by each."""
    procs = [SiteProc("a", root / f"a-{i + 1}", exports) for i in range(n)]
    gateways = [f"127.0.0.1:{p.ports['gateway']}" for p in procs]
    for i, p in enumerate(procs):
        p.extra = {
            "stateDir": str(root / "a-state"),
            "gateway": {
                "listen": gateways[i],
                "advertise": gateways,
                "replicas": n,
                "instance": f"a-{i + 1}",
            },
        }
        p.write_config()
    return procs


def links_to(site: SiteProc, peer: str) -> dict[str, dict[str, Any]]:
    """The up links of ``site`` with instances of ``peer``, by instance."""
    return {
        str(link.get("instance")): dict(link)
        for link in site.status()["links"]
        if link["peer"] == peer and link["state"] == "up"
    }


@contextmanager
def running(*procs: SiteProc) -> Iterator[None]:
    try:
        for p in procs:
            p.start()
        yield
    except BaseException:
        for p in procs:
            print(f"--- log of {p.dir.name}:\n{p.log_tail(60)}")
        raise
    finally:
        for p in procs:
            p.stop()


class NewFlows(threading.Thread):
    """A new connection every 50 ms through an import (echo a few bytes), recording
    (start time, success) of each, until stopped."""

    def __init__(self, addr: str) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.results: list[tuple[float, bool]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            t = time.monotonic()
            ok = False
            try:
                with socket.create_connection((self.addr, PORT), timeout=1) as s:
                    s.settimeout(1)
                    s.sendall(b"Eping")
                    ok = s.recv(4) == b"ping"
            except OSError:
                pass
            self.results.append((t, ok))

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)

    def longest_gap(self, since: float) -> float:
        """The longest time from ``since`` (or a success) to the next success."""
        last, gap = since, 0.0
        for t, ok in self.results:
            if t >= since and ok:
                gap, last = max(gap, t - last), t
        return gap

    def failed_share(self, since: float) -> float:
        after = [ok for t, ok in self.results if t >= since]
        return 1 - sum(after) / len(after)


class BulkFlow(threading.Thread):
    """One long flow into the sha256 sink, 64 KiB every 10 ms, until stopped; then the
    digest and byte count the far end reports are checked against what was sent."""

    def __init__(self, addr: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((addr, PORT), timeout=30)
        self.sent = 0
        self.digest = hashlib.sha256()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.reply = b""

    def run(self) -> None:
        try:
            self.sock.sendall(b"S")
            while not self.stopped.wait(0.01):
                block = os.urandom(64 * 1024)
                self.sock.sendall(block)
                self.digest.update(block)
                self.sent += len(block)
            self.sock.shutdown(socket.SHUT_WR)
            while len(self.reply) < 40 and (chunk := self.sock.recv(40 - len(self.reply))):
                self.reply += chunk
        except OSError as e:
            self.error = e
        finally:
            self.sock.close()

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=30)
        assert self.error is None, f"the bulk flow broke: {self.error!r}"
        assert len(self.reply) == 40, "no digest from the far end"
        assert struct.unpack("!Q", self.reply[32:])[0] == self.sent
        assert self.reply[:32] == self.digest.digest()


def carrying(procs: list[SiteProc], peer: str) -> SiteProc:
    """The one instance whose link with ``peer`` carries a flow now."""
    busy = [p for p in procs if any(lk["flows"] for lk in links_to(p, peer).values())]
    assert len(busy) == 1, [p.dir.name for p in busy]
    return busy[0]


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_an_instance_lost_new_flows_go_to_the_other_with_no_withdrawal(
    tmp_path: Path, backend: Backend, fault: str
) -> None:
    """kill: -9 (its sockets close at once); freeze: SIGSTOP, an instance gone silent as
    behind a cut network (only the heartbeat finds it: 3 x 0.3 s here)."""
    a1, a2 = instances(tmp_path, export(backend))
    b = SiteProc("b", tmp_path, [])
    with running(a1, a2, b):
        b.link_to(a1)
        wait_until(
            "b linked with both instances of a",
            lambda: (
                set(links_to(b, "a"))
                == {
                    "a-1",
                    "a-2",
                }
            ),
        )
        assert {lk["replicas"] for lk in links_to(b, "a").values()} == {2}
        assert a2.status()["instance"] == "a-2"
        addr = wait_until("the import at b", lambda: b.import_addr("test/svc"))[0]
        view = b.status()["imports"]
        bulk = BulkFlow(addr)
        bulk.start()
        survivor = wait_until("the bulk flow on one instance", lambda: carrying([a1, a2], "b"))
        victim = a2 if survivor is a1 else a1
        flows = NewFlows(addr)
        flows.start()
        try:
            wait_until("new flows succeed", lambda: sum(ok for _, ok in flows.results) >= 10)
            t_kill = time.monotonic()
            assert victim.proc is not None
            if fault == "kill":
                victim.kill()
            else:
                victim.proc.send_signal(signal.SIGSTOP)
            lost = victim.extra["gateway"]["instance"]
            wait_until(
                "b's link with the killed instance gone", lambda: lost not in links_to(b, "a")
            )
            views = []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # b's view through the 3 s after the kill
                views.append(b.status()["imports"])
                wait_until("a success", lambda: flows.results and flows.results[-1][1], timeout=2)
        finally:
            flows.stop()
        bulk.finish()
        gap, failed = flows.longest_gap(t_kill), flows.failed_share(t_kill)
        n = len([t for t, _ in flows.results if t >= t_kill])
        print(
            f"{fault} of one of two instances: longest gap for new flows {gap:.3f} s, "
            f"failed {failed:.1%} of {n} new connections; bulk flow of {bulk.sent} bytes "
            "through the other instance kept its checksum"
        )
        assert gap < 2.0
        assert all(v == view for v in views), "b's import view changed"
        assert view[0]["reachable"] == ["a"]
        assert set(links_to(b, "a")) == {survivor.extra["gateway"]["instance"]}
        assert "is unreachable" not in b.log_tail(200)
        assert "link down: a (" not in b.log_tail(200)  # the site stayed up at b
        # The lost instance comes back: b links with it again, the view still the same.
        if fault == "kill":
            victim.start()
        else:
            victim.proc.send_signal(signal.SIGCONT)
        wait_until("b linked with both again", lambda: len(links_to(b, "a")) == 2, timeout=30)
        assert b.status()["imports"] == view
