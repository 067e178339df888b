"""`meshlink status` on a site with several replicas: the CLI asks its own replica, which
names every meshlink pod; each other replica's status comes from its own ops server at the
pod address (here: three loopback addresses, one port, as pods share the ops port). Real
ops servers, real HTTP, the real `meshlink status` and `meshlink check` processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meshlink.ops.server import OpsServer
from tests.sites import free_port

pytestmark = pytest.mark.timeout(60)


def _status(name: str, *, leading: bool, links: list[str]) -> dict[str, Any]:
    return {
        "site": "c1",
        "mode": "kubernetes",
        "version": "0",
        "uptime_s": 5.0,
        "gateway": "0.0.0.0:7443",
        "grant": "10.0.0.9:7444",
        "dns": None,
        "zone": "clusterset.local",
        "ca_pin": "sha256:00",
        "links": [
            {
                "peer": p,
                "direction": "accept",
                "state": "up",
                "rtt_ms": 0.5,
                "since": 0,
                "flows": 0,
                "bytes_in": 0,
                "bytes_out": 0,
                "last_error": None,
            }
            for p in links
        ],
        "sites": [],
        "exports": [],
        "imports": [],
        "kubernetes": {
            "api_server": "https://10.96.0.1:443",
            "reachable": True,
            "synced": True,
            "exports": 1,
            "imports": 2,
            "replica": name,
            "leading": leading,
            "leader": "ml-a",
            "replicas": [
                {"name": "ml-a", "ip": "127.0.0.1", "node": "w1", "ready": True},
                {"name": "ml-b", "ip": "127.0.0.2", "node": "w2", "ready": True},
                {"name": "ml-c", "ip": "127.0.0.3", "node": "w2", "ready": True},
            ],
        },
    }


@pytest.fixture
async def replica_set() -> AsyncIterator[int]:
    """ml-a (leader, links c2 and c3) and ml-b (standby, link c2 only) serve their status on
    one port; ml-c has a pod IP where nothing answers."""
    port = free_port()
    servers = []
    for name, host, leading, links in (
        ("ml-a", "127.0.0.1", True, ["c2", "c3"]),
        ("ml-b", "127.0.0.2", False, ["c2"]),
    ):
        status = _status(name, leading=leading, links=links)
        ops = OpsServer(
            status=lambda s=status: s, ready=lambda: (True, "ok"), registry=CollectorRegistry()
        )
        await ops.start(host, port)
        servers.append(ops)
    try:
        yield port
    finally:
        for ops in servers:
            await ops.close()


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshlink", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_status_shows_every_replica_its_role_and_links(replica_set: int) -> None:
    proc = await _cli("status", "--url", f"http://127.0.0.1:{replica_set}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "REPLICAS (lease holder: ml-a)" in out
    lines = out.splitlines()
    a = next(line for line in lines if line.lstrip().startswith("ml-a (this)"))
    assert "leader" in a
    assert "c2, c3" in a
    b = next(line for line in lines if line.lstrip().startswith("ml-b"))
    assert "standby" in b
    assert "c3" not in b
    c = next(line for line in lines if line.lstrip().startswith("ml-c"))
    assert "cannot reach" in c


async def test_check_names_the_replica_missing_a_link_and_the_silent_one(replica_set: int) -> None:
    proc = await _cli("check", "--url", f"http://127.0.0.1:{replica_set}")
    out = proc.stdout
    assert out, proc.stderr
    assert "PASS  replica ml-a holds the Lease and writes" in out
    assert "WARN  replica ml-b has no link up with c3" in out
    assert "WARN  replica ml-c did not answer" in out
