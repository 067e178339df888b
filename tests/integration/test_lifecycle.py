"""Link lifecycle as a user meets it in the first week, with real `meshlink run` processes on
loopback driven by the CLI: deleting a link, linking the same sites again, revocation seen
from both sides, an issuer away longer than the link certificate's life, and what
`meshlink check` says about each, and exports changed by SIGHUP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.backends import Backend, connect, export, running_backend, sink_roundtrip
from tests.sites import SiteProc, cli, sites, wait_until

pytestmark = pytest.mark.timeout(120)


def imported(site: SiteProc, service: str = "test/svc") -> bool:
    """Whether ``site`` shows the import at all (reachable or not)."""
    return any(i["service"] == service for i in site.status()["imports"])


def log_count(site: SiteProc, text: str) -> int:
    return (site.dir / "meshlink.log").read_text(errors="replace").count(text)


def test_link_delete_drops_the_link_and_what_it_carried(tmp_path: Path, backend: Backend) -> None:
    """`meshlink link delete` on the redeeming site: the link goes from both sites' status,
    the imports learned through it go at once (an unlink is not an outage: no grace
    period), `check` fails with "no links", and nothing is logged over and over."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        wait_until("import at b", lambda: b.import_addr("test/svc"))
        cli("link", "delete", "a", "--config", str(b.config))
        t0 = time.monotonic()
        wait_until("b's link to a gone from its status", lambda: b.link_state("a") is None)
        wait_until("a's link from b gone from its status", lambda: a.link_state("b") is None)
        wait_until("the import learned through the link gone at b", lambda: not imported(b))
        print(f"link delete -> gone from both sites: {time.monotonic() - t0:.2f} s")
        out = cli("check", "--config", str(b.config), check=False)
        assert out.returncode == 1
        assert "FAIL  no links" in out.stdout, out.stdout
        # Two more link-record polls (0.5 s each) must add nothing about that link.
        lines = log_count(b, "dropping")
        mark = log_count(b, "site b up")  # unchanged: a marker the wait can use
        wait_until("two more polls", lambda: time.monotonic() - t0 > 2.0, timeout=5)
        assert log_count(b, "dropping") == lines <= 1, b.log_tail(20)
        assert log_count(b, "revoked") == 0, b.log_tail(20)
        assert log_count(b, "site b up") == mark


def test_relink_after_delete_with_a_fresh_token(tmp_path: Path, backend: Backend) -> None:
    """Unlinking is symmetric: after `link delete` on b, a forgets b as a peer (b told it
    over the link), so a fresh token of a links the same two sites again, and traffic
    flows."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        wait_until("import at b", lambda: b.import_addr("test/svc"))
        cli("link", "delete", "a", "--config", str(b.config))
        wait_until(
            "a forgets its peer b",
            lambda: "b" not in cli("peer", "list", "--config", str(a.config)).stdout.split(),
            timeout=10,
        )
        b.link_to(a)
        with connect(b) as s:
            sink_roundtrip(s, 1 << 20)


def test_relink_after_a_delete_the_issuer_never_heard_of(tmp_path: Path, backend: Backend) -> None:
    """b deletes its link while a is down, so a still has b as a peer: a fresh token of a
    still links them again, since a accepts the same site (the CA it pinned for b, and b's
    gateway key, proved with b's gateway certificate) in place of the old peer record."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        a.stop()
        cli("link", "delete", "a", "--config", str(b.config))
        a.start()
        assert "b" in cli("peer", "list", "--config", str(a.config)).stdout.split()
        b.link_to(a)
        with connect(b) as s:
            sink_roundtrip(s, 1 << 20)
        assert "site b linked again with token" in a.log_tail(50)


def test_revoke_is_told_to_the_revoked_site(tmp_path: Path, backend: Backend) -> None:
    """`meshlink peer revoke b` on a: b hears of it over the link, drops its link record
    and the imports it carried, says so once, and links again with a new token alone."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        wait_until("import at b", lambda: b.import_addr("test/svc"))
        cli("peer", "revoke", "b", "--config", str(a.config))
        wait_until("b's link record gone", lambda: b.link_state("a") is None, timeout=10)
        wait_until("b's import from a gone", lambda: not imported(b), timeout=10)
        assert "a links the two sites again" in b.log_tail(30)
        assert not (b.state_dir / "links" / "a.json").exists()
        b.link_to(a)
        with connect(b) as s:
            sink_roundtrip(s, 1 << 20)


def check_lines(site: SiteProc) -> tuple[int, list[str]]:
    out = cli("check", "--config", str(site.config), check=False)
    return out.returncode, out.stdout.splitlines()


def test_an_issuer_away_longer_than_the_link_certificate_re_authenticates(
    tmp_path: Path, backend: Backend
) -> None:
    """a signs 30 s link certificates and goes away for longer: b's certificate expires
    meanwhile. b's check warns while it still can; when a is back, b gets a new link
    certificate from a's grant endpoint by proving its identity with its gateway
    certificate (no token, no command), and the link comes back by itself."""
    from meshlink.pki import load_cert

    with sites(tmp_path, ("a", export(backend)), ("b", []), extra={"linkCertLifetime": 30}) as (
        a,
        b,
    ):
        b.link_to(a)
        cert_path = b.state_dir / "links" / "a.crt"
        a.stop()
        expires = load_cert(cert_path).not_valid_after_utc.timestamp()
        wait_until(
            "b's check warns of the link certificate",
            lambda: any(
                line.startswith("WARN  the link certificate for a expires in")
                and "the link is down" in line
                for line in check_lines(b)[1]
            ),
            timeout=20,
        )
        wait_until("b's link certificate expired", lambda: time.time() > expires + 1, timeout=40)
        code, lines = check_lines(b)
        assert code == 1
        assert any("the link certificate for a expired at" in line for line in lines), lines
        a.start()
        t0 = time.monotonic()
        wait_until("b linked to a again by itself", lambda: b.link_state("a") == "up", timeout=40)
        took = time.monotonic() - t0
        print(f"issuer back -> link up again with a re-issued certificate: {took:.1f} s")
        assert load_cert(cert_path).not_valid_after_utc.timestamp() > time.time()
        assert "re-authenticated without a token" in b.log_tail(40)
        assert "re-authenticated with its gateway certificate" in a.log_tail(40)
        with connect(b) as s:
            sink_roundtrip(s, 1 << 20)


def test_check_says_a_peer_revoked_us_and_a_new_token_is_the_fix(
    tmp_path: Path, backend: Backend
) -> None:
    """b is away when a revokes it (so b is never told): back, b is refused; `check` says
    so and what to do, not "check that the peer runs"."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        b.stop()
        cli("peer", "revoke", "b", "--config", str(a.config))
        b.start()

        def refused() -> str | None:
            lines = check_lines(b)[1]
            return next((line for line in lines if "refused this site" in line), None)

        line = wait_until("b's check names the refusal", refused, timeout=20)
        assert line.startswith("FAIL  site a refused this site: its link was revoked or deleted")
        assert "`meshlink token create` on a" in line
        assert not any("check that the peer runs" in x for x in check_lines(b)[1])


def test_check_fails_an_exported_endpoint_nobody_answers(tmp_path: Path) -> None:
    """a exports a service whose endpoint is dead: `check` on a fails it, naming the
    endpoint (the site itself connects to it), instead of passing every probe."""
    with running_backend() as live:
        port = live.server_address[1]
        with sites(tmp_path, ("a", export(live)), ("b", [])) as (a, b):
            b.link_to(a)
            code, lines = check_lines(a)
            assert "PASS  every exported endpoint answers (1 probed)" in lines, lines
            live.shutdown()
            live.server_close()
            code, lines = check_lines(a)
            assert code == 1
            assert (
                f"FAIL  export test/svc port 9000: 127.0.0.1:{port}: Connection refused; flows "
                "from other sites to it fail: check the endpoint (is it running?)"
            ) in lines, lines
            # Loopback addresses work here, and only here: check says so.
            assert any(
                line.startswith("WARN  gateway.advertise is 127.0.0.1:")
                and "only sites on this very host" in line
                for line in lines
            ), lines


def test_sighup_applies_local_exports_with_links_and_flows_up(
    tmp_path: Path, backend: Backend
) -> None:
    """Local mode: the exports change in the file and SIGHUP applies them. A new export is
    imported at b and a removed one goes, while the link stays up (same since) and a flow
    opened before keeps flowing; a broken file is one ERROR line and changes nothing."""
    with sites(tmp_path, ("a", export(backend)), ("b", [])) as (a, b):
        b.link_to(a)
        assert a.proc is not None
        since = next(lk["since"] for lk in b.status()["links"] if lk["peer"] == "a")
        flow = connect(b)
        flow.sendall(b"E1")  # echo
        assert flow.recv(1) == b"1"
        a.exports = export(backend) + export(backend, name="more")
        a.write_config()
        a.proc.send_signal(signal.SIGHUP)
        wait_until("the new export imported at b", lambda: b.import_addr("test/more"))
        a.exports = export(backend)
        a.write_config()
        a.proc.send_signal(signal.SIGHUP)
        wait_until("the removed export gone at b", lambda: not imported(b, "test/more"), timeout=10)
        flow.sendall(b"2")
        assert flow.recv(1) == b"2"  # the flow opened before the reloads still flows
        flow.close()
        assert next(lk["since"] for lk in b.status()["links"] if lk["peer"] == "a") == since
        assert log_count(b, "link down") == 0
        a.config.write_text("site: a\nexports: nope\n")
        a.proc.send_signal(signal.SIGHUP)
        wait_until("one error line", lambda: log_count(a, "SIGHUP: the configuration is not"))
        assert a.proc.poll() is None
        assert b.import_addr("test/svc")
        assert "Traceback" not in a.log_tail(200)
