"""`meshlink run` as a user starts it, against the mistakes of a first week: a listen address
that is taken or not on this host, a config file that is not UTF-8. Each is one line on
stderr naming the key, exit code 1, no traceback. And the state directory the site creates
is private (0700), parents included."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
import yaml

from tests.sites import SiteProc, cli, free_port

pytestmark = pytest.mark.timeout(60)

COMPONENTS = ("gateway", "grant", "dns", "ops")
HINTS = {
    "busy": "the address is in use (another process listens there: stop it, or choose "
    "another port)",
    "foreign": "that IP address is not on this host (use one of its addresses, or 0.0.0.0)",
}


def write_config(tmp_path: Path, listen: dict[str, str]) -> Path:
    cfg = {"site": "a", "stateDir": str(tmp_path / "state")}
    cfg.update({k: {"listen": v} for k, v in listen.items()})
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("how", ["busy", "foreign"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_listen_address_unusable_is_one_line(tmp_path: Path, component: str, how: str) -> None:
    listen = {k: f"127.0.0.1:{free_port()}" for k in COMPONENTS}
    holder = socket.socket()
    try:
        if how == "busy":
            port = int(listen[component].rsplit(":", 1)[1])
            holder.bind(("127.0.0.1", port))
            holder.listen()
        else:
            listen[component] = "192.0.2.1:7443"  # TEST-NET-1: on no host
        cfg = write_config(tmp_path, listen)
        out = cli("run", "--config", str(cfg), "--log-level", "warning", check=False)
    finally:
        holder.close()
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == [
        f"meshlink: {component}.listen: cannot listen on {listen[component]}: {HINTS[how]}"
    ], out.stderr


def test_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_bytes(b"site: a\n# caf\xe9 (latin-1)\n")
    out = cli("run", "--config", str(cfg), check=False)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"meshlink: {cfg}: not UTF-8 text (byte 0xe9 on line 2); save the file as UTF-8"
    ]


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def test_state_directory_is_created_private(tmp_path: Path) -> None:
    """Created by `meshlink run` (and its parents that did not exist), and by a CLI command
    run before the site ever ran."""
    site = SiteProc("a", tmp_path)
    site.extra = {"stateDir": str(tmp_path / "new" / "deeper" / "state")}
    site.write_config()
    site.start()
    try:
        state = tmp_path / "new" / "deeper" / "state"
        for d in (tmp_path / "new", tmp_path / "new" / "deeper", state, *state.iterdir()):
            if d.is_dir():
                assert mode(d) == "0o700", d
    finally:
        site.stop()
    fresh = SiteProc("b", tmp_path)
    fresh.extra = {"stateDir": str(tmp_path / "b-state")}
    fresh.write_config()
    cli("token", "create", "--config", str(fresh.config), "-o", str(tmp_path / "t"))
    assert mode(tmp_path / "b-state") == "0o700"
