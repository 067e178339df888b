"""One writer among a site's replicas (meshlink/k8s/lease.py) against a real kube-apiserver:
the fence refuses a write once the right to write has run out, before anything is sent; a
second replica takes over only after the Lease went unrenewed for its duration on its own
clock, or at once when the holder hands it over; and two `meshlink run` replicas of one
site, the leader SIGSTOPped past its Lease and woken, never write twice (the woken one
writes nothing: its counters, the objects' resourceVersions and managedFields say so)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from meshlink.k8s.api import SERVICE, Kube, NotLeader
from meshlink.k8s.lease import LEASE, LEASE_NAME, LeaderElection
from tests.e2e.test_controller_harness import api_for, get
from tests.kube import KubeCluster, install_crds
from tests.sites import SiteProc, wait_until

pytestmark = pytest.mark.timeout(240)

NS = "meshlink-system"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    }


async def test_the_fence_and_the_hand_over(kube_cluster: KubeCluster) -> None:
    kube_cluster.kubectl("create", "namespace", NS)
    async with api_for(kube_cluster.kubeconfig) as admin:
        ca, cb = Clock(), Clock()
        a = LeaderElection(Kube(admin.api, 10.0), NS, "a", duration=4.0, clock=ca)
        b = LeaderElection(Kube(admin.api, 10.0), NS, "b", duration=4.0, clock=cb)
        writer = Kube(admin.api, 10.0, fence=a.leading)

        await a.step()
        assert a.leading()
        await b.step()
        assert not b.leading()
        assert b.view.holder == "a"
        await writer.apply(SERVICE, _service("derived-one"))

        # a stops renewing; its right ends renew_deadline (2.4 s) after its last renewal was
        # sent: the fence refuses the next write and nothing reaches the API server.
        ca.now += 2.5
        assert not a.leading()
        with pytest.raises(NotLeader):
            await writer.apply(SERVICE, _service("derived-two"))
        assert await get(admin, SERVICE, NS, "derived-two") is None
        assert writer.requests["fenced apply Service"] == 1

        # b takes over only once the Lease has not changed for 4 s on b's clock.
        cb.now += 3.9
        await b.step()
        assert not b.leading()
        cb.now += 0.2
        await b.step()
        assert b.leading()
        assert b.view.holder == "b"
        assert b.view.transitions == 1
        # a looks again: it is no longer the holder, and renewing is not retaking.
        await a.step()
        assert not a.leading()
        assert a.view.holder == "b"

        # A clean stop hands the Lease over: a takes it at its next look, with no wait.
        await b.release()
        assert not b.leading()
        await a.step()
        assert a.leading()
        assert a.view.transitions == 2
        lease = await admin.get(LEASE, LEASE_NAME, NS)
        assert lease["spec"]["holderIdentity"] == "a"


def _replica(root: Path, c: KubeCluster, name: str) -> SiteProc:
    return SiteProc(
        "hub",
        root / name,
        extra={
            "kubernetes": {
                "kubeconfig": str(c.kubeconfig),
                "requestTimeout": 5,
                "leaderElection": True,
                "leaseDuration": 3,
                "importAddress": "127.0.0.1",
                "importPorts": "21000-21099",
            }
        },
        env={"POD_NAME": name},
    )


def _kube(site: SiteProc) -> dict[str, Any]:
    k = site.status().get("kubernetes") or {}
    assert isinstance(k, dict)
    return k


def _annotated(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": "shop",
                "annotations": {"meshlink.io/export": "true"},
            },
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {"app": name}},
        }
    )


def _written(c: KubeCluster) -> dict[str, tuple[str, str]]:
    """Every ServiceExport meshlink wrote: resourceVersion and the time of meshlink's last
    write in managedFields."""
    items = c.get_json("serviceexports", "-n", "shop", "--show-managed-fields")["items"]
    out = {}
    for o in items:
        fields = o["metadata"]["managedFields"]
        times = [m.get("time", "") for m in fields if m["manager"] == "meshlink"]
        out[o["metadata"]["name"]] = (o["metadata"]["resourceVersion"], max(times, default=""))
    return out


def test_a_sigstopped_leader_wakes_and_writes_nothing(
    kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    c = kube_cluster
    install_crds(c)
    for ns in (NS, "shop"):
        c.kubectl("create", "namespace", ns)
    c.apply(_annotated("web"))
    a = _replica(tmp_path, c, "replica-a")
    b = _replica(tmp_path, c, "replica-b")
    try:
        a.start()
        wait_until("replica-a leads", lambda: _kube(a)["leading"], timeout=30)
        b.start()
        wait_until("replica-b sees replica-a lead", lambda: _kube(b)["leader"] == "replica-a")
        assert not _kube(b)["leading"]
        wait_until(
            "the annotated Service exported, Ready",
            lambda: c.get_json("serviceexport", "web", "-n", "shop")["status"]["conditions"],
            timeout=30,
        )
        # Only the leader wrote.
        wait_until("replica-a idle", lambda: _kube(a)["queued"] == 0)
        assert _kube(a)["writes"] >= 2  # the ServiceExport and its status
        assert _kube(b)["writes"] == 0

        writes_before = _kube(a)["writes"]
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            wait_until("replica-b takes over", lambda: _kube(b)["leading"], timeout=30)
            # Work only a writer can do, done by the new one while the old one sleeps.
            c.apply(_annotated("web2"))
            wait_until(
                "replica-b exports web2",
                lambda: c.get_json("serviceexport", "web2", "-n", "shop")["status"]["conditions"],
                timeout=30,
            )
            wait_until("replica-b idle", lambda: _kube(b)["queued"] == 0)
            before = _written(c)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # The old leader wakes with its events and retries to catch up on: it learns it lost
        # the Lease, goes through all of them, and sends nothing.
        wait_until("replica-a sees replica-b lead", lambda: _kube(a)["leader"] == "replica-b")
        wait_until("replica-a idle again", lambda: _kube(a)["queued"] == 0)
        ka = _kube(a)
        assert not ka["leading"]
        assert ka["writes"] == writes_before
        assert _kube(b)["leading"]
        assert _written(c) == before
        # And b goes on writing alone: a change now is b's, never a's.
        c.kubectl("delete", "service", "web2", "-n", "shop")
        wait_until(
            "replica-b withdraws web2",
            lambda: "web2" not in _written(c),
            timeout=30,
        )
        assert _kube(a)["writes"] == writes_before
    except BaseException:
        for s in (a, b):
            print(f"--- {s.proc and s.proc.pid} log:\n{s.log_tail(60)}")
        raise
    finally:
        if a.proc is not None and a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
        a.stop()
        b.stop()
