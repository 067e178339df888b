"""Restart safety in local mode, with real `meshlink run` processes and a real DNS client
polling every 100 ms for the whole fault: an exporting site killed (-9) and restarted, or
frozen (SIGSTOP), changes nothing an importer's clients can see but the endpoints, for the
grace period; after it the import goes."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from tests.backends import Backend, connect, export, sink_roundtrip
from tests.dnspoll import DnsPoller
from tests.sites import SiteProc, sites, wait_until

pytestmark = pytest.mark.timeout(180)

NAME = "svc.test.svc.clusterset.local"


def the_import(site: SiteProc) -> dict[str, object] | None:
    return next((i for i in site.status()["imports"] if i["service"] == "test/svc"), None)


def refused_within(addr: str, port: int, limit: float) -> float:
    """Open a flow to an import whose exporter is away: it must end (refused or reset)
    within ``limit`` seconds, not hang. Returns how long it took."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((addr, port), timeout=limit) as s:
            s.settimeout(limit)
            s.sendall(b"E")
            assert s.recv(10) == b""
    except (ConnectionResetError, ConnectionRefusedError):
        pass
    took = time.monotonic() - t0
    assert took < limit
    return took


@pytest.mark.parametrize("fault", ["kill-restart", "freeze"])
def test_an_exporter_away_for_seconds_changes_no_name_or_address(
    tmp_path: Path, backend: Backend, fault: str
) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        addr = wait_until("import at b", lambda: b.import_addr("test/svc"))[0]
        assert a.proc is not None
        with DnsPoller("127.0.0.1", b.ports["dns"], NAME) as dns:
            wait_until("the poller's first answer", lambda: dns.answers, timeout=5)
            t0 = time.monotonic()
            if fault == "kill-restart":
                a.kill()
            else:
                a.proc.send_signal(signal.SIGSTOP)
            try:
                imp = wait_until(
                    "b marks a's endpoints not ready",
                    lambda: (i := the_import(b)) is not None and not i["reachable"] and i,
                    timeout=10,
                )
                assert imp["ips"] == [addr]
                took = refused_within(addr, 9000, 2.0)
                print(f"{fault}: a flow to the import meanwhile ended after {took:.2f} s")
                if fault == "kill-restart":
                    a.start()
            finally:
                if fault == "freeze":
                    a.proc.send_signal(signal.SIGCONT)
            wait_until("a reachable from b again", lambda: b.import_addr("test/svc"), timeout=30)
            outage = time.monotonic() - t0
            with connect(b) as s:
                sink_roundtrip(s, 1 << 20)
        answers = dns.summary()
        print(f"{fault}: {outage:.1f} s away; b's DNS answers meanwhile: {dict(answers)}")
        assert answers == {(addr,): len(dns.answers)}, answers
        assert len(dns.answers) >= outage / 0.1 * 0.5  # the poller kept polling
        assert b.import_addr("test/svc") == (addr, ["a"])


def test_after_the_grace_period_the_import_goes(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", []), extra={"importGracePeriod": 2}) as (
        a,
        b,
    ):
        b.link_to(a)
        addr = wait_until("import at b", lambda: b.import_addr("test/svc"))[0]
        with DnsPoller("127.0.0.1", b.ports["dns"], NAME) as dns:
            a.kill()
            t0 = time.monotonic()
            wait_until("the import gone from b", lambda: the_import(b) is None, timeout=15)
            gone = time.monotonic() - t0
            wait_until("NXDOMAIN at b", lambda: dns.answers[-1][1] == "NXDOMAIN", timeout=5)
        print(f"import gone {gone:.1f} s after a was killed (grace period 2 s)")
        assert gone >= 2.0
        first_nx = next(t for t, ans in dns.answers if ans == "NXDOMAIN")
        assert first_nx - t0 >= 2.0
        assert {ans for t, ans in dns.answers if t < t0 + 2.0} == {(addr,)}
        assert "grace period over for unreachable site a" in b.log_tail(30)


def test_an_importer_restarted_while_its_exporter_is_away_keeps_the_name(
    tmp_path: Path, backend: Backend
) -> None:
    """b is killed (-9) and restarted while a, its only exporter, is away: b keeps what it
    knew (its state directory), so its DNS answers the same address as soon as it serves
    again (SERVFAIL before it knows, never NXDOMAIN), endpoints not ready until a is back."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        addr = wait_until("import at b", lambda: b.import_addr("test/svc"))[0]
        memory = b.state_dir / "catalog.json"
        wait_until("b keeps its catalog", lambda: '"svc"' in memory.read_text(), timeout=15)
        a.kill()
        with DnsPoller("127.0.0.1", b.ports["dns"], NAME) as dns:
            wait_until("b marks a not ready", lambda: not b.import_addr("test/svc"), timeout=10)
            b.kill()
            b.start()
            imp = the_import(b)
            assert imp is not None
            assert (imp["ips"], imp["reachable"]) == ([addr], [])
            wait_until("b's DNS answers", lambda: dns.answers[-1][1] == (addr,), timeout=5)
            a.start()
            wait_until("a reachable from b again", lambda: b.import_addr("test/svc"), timeout=30)
        seen = dns.summary()
        print(f"b's DNS through its restart: {dict(seen)}")
        assert "NXDOMAIN" not in seen, seen
        assert set(seen) <= {(addr,), "SERVFAIL", "timeout"}, seen
        assert b.import_addr("test/svc") == (addr, ["a"])
        with connect(b) as s:
            sink_roundtrip(s, 1 << 20)
