"""Sites as real `meshlink run` processes on loopback, linked with real tokens via the CLI.

Backends are plain TCP servers in this process; clients connect to the import address a
site allocated, so every byte crosses two gateways and a TLS 1.3 link (three sites: two).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meshlink.links import decode_token
from tests.backends import (
    MB,
    Backend,
    connect,
    export,
    read_until_reset,
    running_backend,
    send_until_broken,
    sink_roundtrip,
    whoami,
)
from tests.sites import cli, free_port, sites, wait_until


@pytest.mark.timeout(120)
def test_two_sites_100mb_checksum_and_half_close(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        with connect(b) as s:
            try:
                sink_roundtrip(s, 100 * MB)
            finally:
                assert backend.bad_kinds == []
        st = b.status()
        assert [link["state"] for link in st["links"]] == ["up"]
        assert st["links"][0]["rtt_ms"] is not None


@pytest.mark.timeout(90)
def test_server_half_close_is_carried_and_client_can_still_send(
    tmp_path: Path, backend: Backend
) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        with connect(b) as s:
            s.sendall(b"H")
            got = b""
            while chunk := s.recv(65536):  # ends with the server's FIN, carried end to end
                got += chunk
            assert got == b"x" * 1000
            s.sendall(b"y" * 5000)  # our direction is still open
            s.shutdown(socket.SHUT_WR)
            wait_until(
                "server to see the client's bytes and FIN", lambda: backend.after_half_close == 5000
            )


@pytest.mark.timeout(90)
def test_reset_is_propagated(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        with connect(b) as s:
            s.sendall(b"R")
            with pytest.raises(ConnectionResetError):
                read_until_reset(s)


@pytest.mark.timeout(120)
def test_200_concurrent_flows(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        addr = wait_until("import", lambda: b.import_addr("test/svc"))[0]

        def one(i: int) -> bool:
            payload = os.urandom(32 * 1024 + i)
            with socket.create_connection((addr, 9000), timeout=60) as s:
                s.sendall(b"E" + payload)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            return got == payload

        with ThreadPoolExecutor(max_workers=200) as pool:
            results = list(pool.map(one, range(200)))
        assert all(results), f"{results.count(False)} of 200 flows corrupted or cut"


@pytest.mark.timeout(120)
def test_three_sites_two_hops_and_withdrawal_within_seconds(
    tmp_path: Path, backend: Backend
) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", []), ("c", [])) as (a, b, c):
        b.link_to(a)
        c.link_to(b)
        with connect(c) as s:
            sink_roundtrip(s, 8 * MB)
        hops = {x["site"]: x["hops"] for x in c.status()["sites"]}
        assert hops == {"c": 0, "b": 1, "a": 2}
        a.kill()
        t0 = time.monotonic()
        wait_until("c to withdraw a's export", lambda: not c.import_addr("test/svc"), timeout=10)
        withdrawn = time.monotonic() - t0
        assert withdrawn < 10  # the bound of wait_until; the measured figure is in the report
        print(f"withdrawal at c after killing a: {withdrawn:.2f} s")


@pytest.mark.timeout(150)
def test_killed_gateway_mid_transfer_then_link_comes_back(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        s = connect(b)
        s.sendall(b"S" + os.urandom(MB))
        a.kill()
        with pytest.raises((ConnectionResetError, BrokenPipeError, TimeoutError)):
            send_until_broken(s)
        s.close()
        wait_until("b to see the link down", lambda: b.link_state("a") != "up", timeout=10)
        a.start()  # same state dir: same identity; b redials by itself
        wait_until("link b->a back up by itself", lambda: b.link_state("a") == "up", timeout=20)
        with connect(b) as s2:
            sink_roundtrip(s2, 4 * MB)


@pytest.mark.timeout(90)
def test_reused_and_expired_tokens_refused_with_their_own_messages(tmp_path: Path) -> None:
    with sites(tmp_path, ("a", []), ("b", []), ("c", [])) as (a, b, c):
        tok = a.token()
        b.redeem(tok)
        again = c.redeem(tok, check=False)
        assert again.returncode == 1
        assert "used" in again.stderr.lower(), again.stderr
        assert again.stderr.count("\n") == 1, "one line, no traceback"
        expired = a.token("--expiry", "1s")
        exp = decode_token(expired.read_text().strip()).exp
        wait_until("the token's expiry to pass", lambda: time.time() > exp, timeout=5)
        late = c.redeem(expired, check=False)
        assert late.returncode == 1
        assert "expired" in late.stderr.lower(), late.stderr
        assert "Traceback" not in late.stderr
        garbage = tmp_path / "garbage"
        garbage.write_text("meshlink-token-v1.bm90IGpzb24")
        bad = c.redeem(garbage, check=False)
        assert bad.returncode == 1
        assert "token" in bad.stderr.lower()
        assert "Traceback" not in bad.stderr


@pytest.mark.timeout(90)
def test_revoked_peer_is_dropped_and_refused(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        wait_until("import at b", lambda: b.import_addr("test/svc"))
        cli("peer", "revoke", "b", "--config", str(a.config))
        wait_until(
            "b's link refused after revocation", lambda: b.link_state("a") != "up", timeout=10
        )
        wait_until("import withdrawn at b", lambda: not b.import_addr("test/svc"), timeout=10)


@pytest.mark.timeout(120)
def test_demo_runs_end_to_end() -> None:
    out = cli("demo", timeout=110)
    assert "hello from site a" in out.stdout, out.stdout + out.stderr
    assert "demo OK" in out.stdout


def test_status_and_check_render(tmp_path: Path, backend: Backend) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        wait_until("import at b", lambda: b.import_addr("test/svc"))
        assert a.status()["exports"] == [{"service": "test/svc", "ports": [9000]}]
        assert b.status()["exports"] == []
        out = cli("status", "--config", str(b.config)).stdout
        assert "LINKS" in out
        assert "svc.test.svc.clusterset.local" in out
        chk = cli("check", "--config", str(b.config), check=False)
        assert chk.returncode == 0, chk.stdout
        assert "PASS  link to a is up" in chk.stdout
        assert f"PASS  DNS at 127.0.0.1:{b.ports['dns']} answers dns-version" in chk.stdout
        a.kill()
        wait_until("link down", lambda: b.link_state("a") != "up", timeout=10)
        chk = cli("check", "--config", str(b.config), check=False)
        assert chk.returncode == 1
        assert "FAIL" in chk.stdout


def test_import_listener_that_cannot_bind_is_reported_and_retried(
    tmp_path: Path, backend: Backend
) -> None:
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        # The first import of b's pool gets its second host address; something else
        # already listens there on the service's port.
        taken = str(ipaddress.ip_network(b.pool)[2])
        squatter = socket.create_server((taken, 9000))
        try:
            b.link_to(a)
            err = wait_until(
                "b reports the listener it cannot open",
                lambda: b.status()["listener_errors"],
            )
            assert err == [
                {
                    "address": f"{taken}:9000",
                    "service": "test/svc",
                    "port": 9000,
                    "error": "Address already in use",
                }
            ]
            chk = cli("check", "--config", str(b.config), check=False)
            assert chk.returncode == 1
            assert f"cannot listen on {taken}:9000: Address already in use" in chk.stdout
        finally:
            squatter.close()
        # Freed: the state loop retries (every 5 s) and traffic flows.
        wait_until("listener opened on retry", lambda: not b.status()["listener_errors"], 15)
        with connect(b) as s:
            s.sendall(b"Ex")  # echo protocol, then one byte to echo
            assert s.recv(1) == b"x"


def test_broken_config_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("site: a\ngateway: {listen: nowhere}\n")
    out = cli("run", "--config", str(cfg), check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == f"meshlink: {cfg}: gateway.listen: 'nowhere' is not HOST:PORT"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_failover_to_another_exporting_site_within_seconds(tmp_path: Path, how: str) -> None:
    """kill: the peer's sockets close at once. freeze (SIGSTOP): the peer goes silent with
    its sockets open, as in a partition; only the heartbeats (0.3 s x 3 here) can tell."""
    with (
        running_backend("a") as back_a,
        running_backend("c") as back_c,
        sites(tmp_path, ("a", export(back_a)), ("b", []), ("c", export(back_c))) as (a, b, c),
    ):
        b.link_to(a)
        b.link_to(c)
        addr = wait_until(
            "both exporters reachable from b",
            lambda: (found := b.import_addr("test/svc")) and len(found[1]) == 2 and found,
        )[0]
        first = whoami(addr)
        serving, other = (a, c) if first == "a" else (c, a)
        t0 = time.monotonic()
        if how == "kill":
            serving.kill()
        else:
            assert serving.proc is not None
            serving.proc.send_signal(signal.SIGSTOP)

        def served_by_other() -> bool:
            try:
                return whoami(addr) == other.name
            except OSError:
                return False

        try:
            wait_until("new connections served by the other site", served_by_other, timeout=10)
            took = time.monotonic() - t0
            print(f"failover ({how}) from {serving.name} to {other.name}: {took:.2f} s")
            assert b.link_state(serving.name) != "up"
        finally:
            if how == "freeze" and serving.proc is not None:
                serving.proc.send_signal(signal.SIGCONT)


@pytest.mark.timeout(60)
def test_standalone_dns_command_serves_a_records_file_to_dig(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    records = tmp_path / "records.yaml"
    records.write_text(
        "services:\n"
        "  - {name: web, namespace: shop, ips: [10.96.0.10],"
        " ports: [{port: 80, name: http}], clusters: [{cluster: east}]}\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshlink",
            "dns",
            "--records",
            str(records),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        dig = shutil.which("dig")
        assert dig, "dig is required (Debian package dnsutils)"

        def ask(*extra: str) -> str:
            out = subprocess.run(
                [dig, "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=1", *extra],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return "" if out.startswith(";;") else out  # ";;" lines: not up yet

        assert wait_until("dig answer", lambda: ask("web.shop.svc.clusterset.local") or None) == (
            "10.96.0.10"
        )
        assert ask("+tcp", "_http._tcp.web.shop.svc.clusterset.local", "SRV") == (
            "0 100 80 web.shop.svc.clusterset.local."
        )
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


@pytest.mark.timeout(120)
def test_link_certificate_renews_over_the_link(tmp_path: Path, backend: Backend) -> None:
    """The issuer signs 60 s link certificates (backdated 5 min, so a third of the lifetime
    is always left: renewal is due at once); the redeemer renews over the live link, and a
    restarted redeemer links again with the renewed certificate."""
    from meshlink.pki import load_cert

    with sites(tmp_path, ("a", export(backend)), ("b", []), extra={"linkCertLifetime": 60}) as (
        a,
        b,
    ):
        b.link_to(a)
        cert_path = b.state_dir / "links" / "a.crt"
        first = load_cert(cert_path).serial_number
        wait_until(
            "b's link certificate renewed by a over the link",
            lambda: load_cert(cert_path).serial_number != first,
            timeout=30,
        )
        # The file is stored before the line is logged: wait for the line, do not race it.
        wait_until(
            "b logs the renewal",
            lambda: "link certificate for a renewed" in b.log_tail(200),
            timeout=10,
        )
        b.stop()
        b.start()
        wait_until("b relinks with the renewed certificate", lambda: b.link_state("a") == "up")
        with connect(b) as s:
            sink_roundtrip(s, MB)
