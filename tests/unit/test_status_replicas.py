"""`meshlink status` and `check` on a Kubernetes site's replica set (pure parts: the pods
the controller sees, the REPLICAS section, the verdicts)."""

from typing import Any

from meshlink.k8s.model import replica_pods
from meshlink.status import ReplicaView, check_replicas, render_replicas


def _pod(
    name: str, ip: str | None, ready: bool, *, node: str = "n1", deleting: bool = False
) -> Any:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-05T00:00:00Z"
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": {"nodeName": node}, "status": status}


def _view(name: str, **kw: Any) -> ReplicaView:
    base: ReplicaView = {
        "name": name,
        "node": "n1",
        "ready": True,
        "here": False,
        "leading": False,
        "links": ["c2", "c3"],
        "imports": 4,
        "error": None,
    }
    return {**base, **kw}  # type: ignore[typeddict-item]


def test_replica_pods_lists_live_pods_by_name_with_readiness_and_node() -> None:
    pods = [
        _pod("ml-b", "10.0.0.2", False, node="w2"),
        _pod("ml-a", "10.0.0.1", True, node="w1"),
        _pod("ml-old", "10.0.0.3", True, deleting=True),
        _pod("ml-new", None, False),
    ]
    assert replica_pods(pods) == [
        {"name": "ml-a", "ip": "10.0.0.1", "node": "w1", "ready": True},
        {"name": "ml-b", "ip": "10.0.0.2", "node": "w2", "ready": False},
        {"name": "ml-new", "ip": None, "node": "n1", "ready": False},
    ]


def test_render_shows_each_replica_its_role_links_and_readiness() -> None:
    views = [
        _view("ml-a", leading=True, here=True, node="w1"),
        _view("ml-b", node="w2", links=["c2"], ready=False),
        _view("ml-c", leading=None, links=[], imports=None, error="timed out"),
    ]
    out = "\n".join(render_replicas(views, "ml-a"))
    assert "REPLICAS (lease holder: ml-a)" in out
    lines = out.splitlines()
    a = next(line for line in lines if "ml-a (this)" in line)
    assert "w1" in a
    assert "leader" in a
    assert "c2, c3" in a
    b = next(line for line in lines if "ml-b" in line)
    assert "standby" in b
    assert " no " in b
    c = next(line for line in lines if "ml-c" in line)
    assert "(timed out)" in c
    assert render_replicas([], None) == []


def test_check_passes_two_ready_replicas_with_one_leader() -> None:
    views = [_view("ml-a", leading=True), _view("ml-b")]
    got = check_replicas(views, "ml-a", elected=True)
    assert [v for v, _ in got] == ["PASS", "PASS"]
    assert "ml-a holds the Lease" in got[1][1]


def test_check_names_what_is_wrong_with_the_replica_set() -> None:
    # one not ready, no Lease holder, one replica missing a link the other has
    views = [_view("ml-a", links=["c2"]), _view("ml-b", ready=False), _view("ml-c")]
    got = check_replicas(views, None, elected=True)
    assert ("WARN", True) in {(v, "2 of 3" in line) for v, line in got}
    assert ("FAIL", True) in {(v, "no replica holds the Lease" in line) for v, line in got}
    assert any(v == "WARN" and "ml-a has no link up with c3" in line for v, line in got)
    # two replicas that both say they lead: a split brain is a failure
    both = [_view("ml-a", leading=True), _view("ml-b", leading=True)]
    assert any(
        v == "FAIL" and "more than one" in line
        for v, line in check_replicas(both, "ml-a", elected=True)
    )
    # a Lease naming a pod that is gone
    assert any(
        v == "WARN" and "ml-z, gone" in line
        for v, line in check_replicas([_view("ml-a")], "ml-z", elected=True)
    )
    none_ready = [_view("ml-a", ready=False)]
    assert check_replicas(none_ready, "ml-a", elected=True)[0][0] == "FAIL"


def test_check_without_leader_election_judges_readiness_only() -> None:
    got = check_replicas([_view("ml-a", leading=None)], None, elected=False)
    assert got == [("PASS", "1 meshlink replica(s) ready")]
    assert check_replicas([], None, elected=True) == []
