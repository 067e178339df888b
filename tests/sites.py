"""Real meshlink sites for tests: `meshlink run` processes on loopback, driven by the CLI.

Each SiteProc writes a config into its own directory, starts `python -m meshlink run`, and
waits on its /readyz. Links are made with `meshlink token create` / `meshlink link create`,
as a user would. Everything is bounded in time; helpers wait on conditions, never sleep.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from meshlink import status as site_status
from tests import kube

T = TypeVar("T")


_SITE_PORTS = (10000, 19999)
"""Where free_port looks: below Linux's ephemeral range (32768+), which bind(0) hands out and
outgoing connections take as well, and apart from tests.kube's API server ports and
meshlink's default import ports (20000+)."""
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP and UDP port free on ``host`` now and never handed out before in this process.
    (bind(0) twice can give the same port: a site was once given one port for its gateway
    and its DNS server.)"""
    for _ in range(500):
        port = random.randint(*_SITE_PORTS)
        if port in _handed_out:
            continue
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_SITE_PORTS} on {host}")


def wait_until(
    what: str, fn: Callable[[], T | None], timeout: float = 20.0, every: float = 0.05
) -> T:
    """tests.kube.wait_until, for checks that talk to a site that may not be up yet."""
    return kube.wait_until(
        fn,
        timeout,
        what,
        interval=every,
        ignore=(OSError, ValueError, KeyError, AssertionError, site_status.StatusUnavailable),
    )


def cli(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "meshlink", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"meshlink {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


_POOL = iter(range(100, 250))


@dataclass
class SiteProc:
    name: str
    root: Path
    exports: list[dict[str, Any]] = field(default_factory=list)
    heartbeat: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the process (POD_NAME: a replica's name)."""

    def __post_init__(self) -> None:
        self.dir = self.root / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in ("gateway", "grant", "dns", "ops")}
        self.pool = f"127.{next(_POOL)}.0.0/24"
        self.write_config()

    @property
    def config(self) -> Path:
        return self.dir / "site.yaml"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "site": self.name,
            "stateDir": str(self.state_dir),
            "gateway": {"listen": f"127.0.0.1:{self.ports['gateway']}"},
            "grant": {"listen": f"127.0.0.1:{self.ports['grant']}"},
            "dns": {"listen": f"127.0.0.1:{self.ports['dns']}"},
            "ops": {"listen": f"127.0.0.1:{self.ports['ops']}"},
            "imports": {"pool": self.pool},
            "heartbeatInterval": self.heartbeat,
            "exports": self.exports,
            **self.extra,
        }
        self.config.write_text(yaml.safe_dump(cfg))

    def start(self) -> SiteProc:
        log = (self.dir / "meshlink.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlink",
                "run",
                "--config",
                str(self.config),
                "--log-level",
                "debug" if os.environ.get("MESHLINK_TEST_DEBUG") else "info",
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, **self.env} if self.env else None,
        )
        log.close()
        # Ready: up, and its catalog synced with its peers (at most 15 s when one is away).
        wait_until(f"site {self.name} ready", self._ready, timeout=40)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"site {self.name} exited {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports['ops']}/readyz", timeout=1
            ) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as e:  # 503 while not ready: close its connection
            e.close()
            return False

    def log_tail(self, n: int = 30) -> str:
        p = self.dir / "meshlink.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def status(self) -> site_status.SiteStatus:
        return site_status.fetch(f"http://127.0.0.1:{self.ports['ops']}", timeout=2)

    def import_addr(self, service: str, reachable: bool = True) -> tuple[str, list[str]] | None:
        for i in self.status()["imports"]:
            if i["service"] == service and i["ips"] and (i["reachable"] or not reachable):
                return i["ips"][0], i["reachable"]
        return None

    def link_state(self, peer: str) -> str | None:
        for link in self.status()["links"]:
            if link["peer"] == peer:
                return str(link["state"])
        return None

    def token(self, *args: str) -> Path:
        path = self.dir / f"token-{time.monotonic_ns()}"
        cli("token", "create", "--config", str(self.config), "-o", str(path), *args)
        return path

    def redeem(self, token: Path, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli("link", "create", str(token), "--config", str(self.config), check=check)

    def link_to(self, issuer: SiteProc) -> None:
        self.redeem(issuer.token())
        wait_until(
            f"link {self.name}->{issuer.name} up", lambda: self.link_state(issuer.name) == "up"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@contextmanager
def sites(
    root: Path, *specs: tuple[str, list[dict[str, Any]]], **kw: Any
) -> Iterator[list[SiteProc]]:
    procs = [SiteProc(name, root, exports, **kw) for name, exports in specs]
    try:
        for p in procs:
            p.start()
        yield procs
    except BaseException:
        for p in procs:
            print(f"--- log of site {p.name}:\n{p.log_tail(60)}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.stop()
