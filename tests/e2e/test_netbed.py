"""The network-namespace testbed itself (tests/netbed): namespaces and routes, DROP faults,
the API server bridge, the kube-proxy stand-in against a real kube-apiserver, teardown.

The testbed tests need root (network namespaces, iptables): skipped otherwise, except
under CI, where a missing privilege is a failure. The kube-proxy stand-in's rule rendering
is also checked as a pure function, without root.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kube import KubeCluster, endpoint_slice, wait_until
from tests.netbed.kubeproxy import render
from tests.netbed.netns import NetbedError, Testbed, netns_list, require_root


@pytest.fixture
def root() -> None:
    """Skip (fail under CI) unless root with the testbed's tools."""
    require_root()


@pytest.fixture
def netbed(root: None, tmp_path: Path) -> Iterator[Callable[[int], Testbed]]:
    """`tb = netbed(n)`: a started testbed of n clusters, closed at the end of the test."""
    beds: list[Testbed] = []

    def make(n: int) -> Testbed:
        tb = Testbed(n, tmp_path / f"netbed{len(beds)}")
        beds.append(tb)
        tb.start()
        return tb

    yield make
    for tb in reversed(beds):
        tb.close()


def bodies(tb: Testbed, i: int, url: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    out = tb.curl(i, *([url] * count), timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


# ----------------------------------------------------------------------------- namespaces


@pytest.mark.timeout(60)
def test_nodes_reach_each_other_through_the_wan_and_pods_stay_local(
    netbed: Callable[[int], Testbed],
) -> None:
    tb = netbed(2)
    c1, c2 = tb.clusters
    assert {tb.wan, c1.netns, c2.netns} <= set(netns_list())
    node2 = tb.start_pod(2, "node2", ip=c2.node_ip, port=8081)
    pod2 = tb.start_pod(2, "pod2")
    assert pod2.ip.startswith("10.202.")

    # Node to node across the WAN: a real TCP connection and HTTP exchange.
    assert bodies(tb, 1, node2.url) == ["node2"]
    # A pod address answers inside its cluster, not from another cluster (no route).
    assert bodies(tb, 2, pod2.url) == ["pod2"]
    far = tb.curl(1, pod2.url, timeout=2)
    assert far.returncode != 0, far.stdout
    # A pod's egress to another cluster's node is masqueraded to its node address.
    pod1_ip = tb.add_pod_ip(1)
    out = tb.run(1, ["curl", "-sS", "--max-time", "5", "--interface", pod1_ip, node2.url])
    assert out.stdout == "node2"
    # The default route of a cluster is its WAN veth.
    route = tb.run(1, ["ip", "route", "show", "default"]).stdout
    assert f"via {c1.wan_ip} dev eth0" in route


@pytest.mark.timeout(60)
def test_drop_and_isolate_cut_exactly_the_chosen_paths(netbed: Callable[[int], Testbed]) -> None:
    tb = netbed(3)
    n2 = tb.start_pod(2, "n2", ip=tb.cluster(2).node_ip)
    n3 = tb.start_pod(3, "n3", ip=tb.cluster(3).node_ip)
    assert bodies(tb, 1, n2.url) == ["n2"]

    tb.drop(1, 2)
    cut = tb.curl(1, n2.url, timeout=0.5)
    assert cut.returncode == 28, cut.stderr  # dropped: the connect times out
    back = tb.curl(2, f"http://{tb.cluster(1).node_ip}:1/", timeout=0.5)
    assert back.returncode == 28, back.stderr  # both directions
    assert bodies(tb, 1, n3.url) == ["n3"]  # other paths untouched
    assert bodies(tb, 3, n2.url) == ["n2"]
    tb.drop(1, 2)  # idempotent
    tb.undrop(1, 2)
    assert bodies(tb, 1, n2.url) == ["n2"]

    tb.isolate(3)
    assert tb.curl(1, n3.url, timeout=0.5).returncode == 28
    assert tb.curl(2, n3.url, timeout=0.5).returncode == 28
    assert bodies(tb, 3, n3.url) == ["n3"]  # inside the cluster all still works
    tb.unisolate(3)
    assert bodies(tb, 1, n3.url) == ["n3"]
    assert "DROP" not in tb.run(0, ["iptables", "-w", "5", "-S", "FORWARD"]).stdout


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("root")
def test_teardown_leaves_no_namespace_and_no_process(tmp_path: Path) -> None:
    with Testbed(2, tmp_path) as tb:
        names = [tb.wan, *(c.netns for c in tb.clusters)]
        pod = tb.start_pod(1, "p")
        # A process the testbed does not track (daemonized inside the namespace).
        stray = int(tb.run(2, ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).stdout)
        assert Path(f"/proc/{stray}").exists()
    assert not set(names) & set(netns_list())
    assert pod.proc.poll() is not None
    wait_until(lambda: not _running(stray), 10, f"stray process {stray} gone")
    tb.close()  # idempotent


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("root")
def test_teardown_after_a_failed_setup_leaves_nothing(tmp_path: Path) -> None:
    tb = Testbed(2, tmp_path)
    names = [tb.wan, *(c.netns for c in tb.clusters)]
    subprocess.run(["ip", "netns", "add", tb.netns(2)], check=True, timeout=10)
    with pytest.raises(NetbedError, match="File exists"):
        tb.start()
    assert not set(names) & set(netns_list())


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ----------------------------------------------------------------------------- API server


@pytest.mark.timeout(120)
def test_api_server_answers_inside_the_cluster_namespace(
    kube_cluster: KubeCluster, netbed: Callable[[int], Testbed]
) -> None:
    tb = netbed(1)
    before = tb.kubectl(1, kube_cluster, "--request-timeout=3s", "get", "ns", "default")
    assert before.returncode != 0  # the root namespace's loopback is not reachable as is
    kubeconfig = tb.connect_apiserver(1, kube_cluster)
    assert kubeconfig == kube_cluster.kubeconfig  # the usual kubeconfig, unchanged
    assert tb.connect_apiserver(1, kube_cluster) == kubeconfig  # idempotent
    out = tb.kubectl(1, kube_cluster, "get", "ns", "default", "-o", "name")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "namespace/default"


# ----------------------------------------------------------------------------- kube-proxy


def _service(ns: str, name: str, ports: list[dict[str, object]]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "ClusterIP", "ports": ports},
        }
    )


@pytest.mark.timeout(120)
def test_kubeproxy_standin_routes_cluster_ips_to_ready_endpoints(
    kube_cluster: KubeCluster, netbed: Callable[[int], Testbed]
) -> None:
    kube = kube_cluster
    tb = netbed(1)
    kp = tb.start_kubeproxy(1, tb.connect_apiserver(1, kube))
    a = tb.start_pod(1, "a")
    b = tb.start_pod(1, "b")
    a_admin = tb.start_pod(1, "a-admin", ip=a.ip, port=9090)
    for ns in ("demo", "other"):
        kube.kubectl("create", "namespace", ns)
    ports: list[dict[str, object]] = [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "admin", "port": 81, "targetPort": 9090},
    ]
    kube.apply(_service("demo", "web", ports))
    cip = kube.get_json("service", "web", "-n", "demo")["spec"]["clusterIP"]
    assert cip.startswith(kube.service_cidr.split(".0.0/")[0])
    url, admin_url = f"http://{cip}:80/", f"http://{cip}:81/"

    # No EndpointSlice yet: both ports are rejected (connection refused, at once).
    kp.wait_rules(cip, 80, [])
    assert tb.curl(1, url).returncode == 7

    # One slice, two ports matched by name (slice ports are the target ports).
    kube.apply(
        endpoint_slice("demo", "web", [a.ip], [("admin", 9090, "TCP"), ("http", 8080, "TCP")])
    )
    kp.wait_rules(cip, 80, [f"{a.ip}:8080"])
    kp.wait_rules(cip, 81, [f"{a.ip}:9090"])
    assert bodies(tb, 1, url) == ["a"]
    assert bodies(tb, 1, admin_url) == ["a-admin"]

    # A second slice of the same Service: both endpoints get traffic.
    kube.apply(endpoint_slice("demo", "web", [b.ip], [("http", 8080, "TCP")], name="web-2"))
    kp.wait_rules(cip, 80, [f"{a.ip}:8080", f"{b.ip}:8080"])
    seen: set[str] = set()
    for _ in range(5):  # 5 x 20 requests; both missing all 100 has odds 2**-99
        seen |= set(bodies(tb, 1, url, count=20))
        if seen == {"a", "b"}:
            break
    assert seen == {"a", "b"}

    # Deleting a slice takes its endpoints out; bringing it back puts them in again.
    kube.kubectl("delete", "endpointslice", "web-2", "-n", "demo")
    kp.wait_rules(cip, 80, [f"{a.ip}:8080"])
    kube.apply(endpoint_slice("demo", "web", [b.ip], [("http", 8080, "TCP")], name="web-2"))
    kp.wait_rules(cip, 80, [f"{a.ip}:8080", f"{b.ip}:8080"])

    # Endpoints becoming not ready leave the rules; none ready means REJECT.
    kube.apply(
        endpoint_slice("demo", "web", [b.ip], [("http", 8080, "TCP")], name="web-2", ready=False)
    )
    kp.wait_rules(cip, 80, [f"{a.ip}:8080"])
    assert set(bodies(tb, 1, url, count=10)) == {"a"}
    kube.apply(
        endpoint_slice(
            "demo", "web", [a.ip], [("admin", 9090, "TCP"), ("http", 8080, "TCP")], ready=False
        )
    )
    kp.wait_rules(cip, 80, [])
    kp.wait_rules(cip, 81, [])
    refused = tb.curl(1, url)
    assert refused.returncode == 7, refused.stderr

    # Another namespace, an unnamed single port.
    kube.apply(_service("other", "solo", [{"port": 8000, "targetPort": 8080}]))
    kube.apply(endpoint_slice("other", "solo", [b.ip], [("", 8080, "TCP")]))
    solo = kube.get_json("service", "solo", "-n", "other")["spec"]["clusterIP"]
    kp.wait_rules(solo, 8000, [f"{b.ip}:8080"])
    assert bodies(tb, 1, f"http://{solo}:8000/") == ["b"]

    # Deleting the Service removes its rules (nat and filter).
    kube.kubectl("delete", "service", "web", "-n", "demo")
    kp.wait_rules(cip, 80, None)
    kp.wait_rules(cip, 81, None)
    saved = tb.run(1, ["iptables-save"]).stdout
    assert cip not in saved
    assert solo in saved
    assert a_admin.proc.poll() is None


@pytest.mark.timeout(120)
def test_kubeproxy_standin_recovers_from_an_api_server_restart(
    kube_cluster: KubeCluster, netbed: Callable[[int], Testbed]
) -> None:
    kube = kube_cluster
    tb = netbed(1)
    kp = tb.start_kubeproxy(1, tb.connect_apiserver(1, kube))
    a, b = tb.start_pod(1, "a"), tb.start_pod(1, "b")
    kube.apply(_service("default", "web", [{"name": "http", "port": 80, "targetPort": 8080}]))
    kube.apply(endpoint_slice("default", "web", [a.ip], [("http", 8080, "TCP")]))
    cip = kube.get_json("service", "web")["spec"]["clusterIP"]
    kp.wait_rules(cip, 80, [f"{a.ip}:8080"])
    generation = kp.state()["generation"]

    kube.stop_apiserver()  # the watches break; the stand-in keeps its rules and retries
    assert bodies(tb, 1, f"http://{cip}/") == ["a"]
    kube.start_apiserver()
    kube.apply(endpoint_slice("default", "web", [b.ip], [("http", 8080, "TCP")]))
    kp.wait_rules(cip, 80, [f"{b.ip}:8080"])
    assert kp.state()["generation"] > generation
    assert bodies(tb, 1, f"http://{cip}/") == ["b"]
    assert kp.proc.poll() is None


# ----------------------------------------------------------------------------- rendering


def _svc(ns: str, name: str, ip: str, *ports: tuple[str, int, str]) -> dict[str, object]:
    return {
        "metadata": {"namespace": ns, "name": name},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        },
    }


def _slice(
    ns: str,
    svc: str,
    eps: list[tuple[str, bool | None]],
    *ports: tuple[str, int],
    family: str = "IPv4",
) -> dict[str, object]:
    return {
        "metadata": {
            "namespace": ns,
            "name": f"{svc}-x",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": family,
        "endpoints": [
            {"addresses": [ip], **({} if ready is None else {"conditions": {"ready": ready}})}
            for ip, ready in eps
        ],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def test_render_matches_ports_by_name_and_spreads_over_ready_endpoints() -> None:
    services = [
        _svc(
            "a", "web", "10.96.0.10", ("http", 80, "TCP"), ("dns", 53, "UDP"), ("admin", 81, "TCP")
        ),
        _svc("b", "web", "10.96.0.11", ("", 8000, "TCP")),  # same name, other namespace
        _svc("a", "headless", "None", ("http", 80, "TCP")),
        _svc("a", "six", "fd00::1", ("http", 80, "TCP")),
    ]
    slices = [
        _slice("a", "web", [("10.201.0.1", True), ("10.201.0.2", None)], ("http", 8080)),
        # A second slice: one more endpoint, a not-ready one, and the admin port.
        _slice(
            "a",
            "web",
            [("10.201.0.3", True), ("10.201.0.4", False)],
            ("http", 8080),
            ("admin", 9090),
        ),
        _slice("a", "web", [("fd00::5", True)], ("http", 8080), family="IPv6"),
        _slice("b", "web", [("10.201.0.9", True)], ("", 7000)),
    ]
    prog = render(services, slices, prefix="T")
    assert prog.rules == {
        "10.96.0.10:80": ["10.201.0.1:8080", "10.201.0.2:8080", "10.201.0.3:8080"],
        "10.96.0.10:81": ["10.201.0.3:9090"],
        "10.96.0.11:8000": ["10.201.0.9:7000"],
    }
    lines = prog.text.splitlines()
    (jump,) = [x for x in lines if x.startswith("-A T-SERVICES -d 10.96.0.10/32") and "80 " in x]
    chain = jump.split("-j ")[1]
    dnat = [x for x in lines if x.startswith(f"-A {chain} ")]
    assert [x.split("--to-destination ")[1] for x in dnat] == prog.rules["10.96.0.10:80"]
    probs = [
        x.split("--probability ")[1].split()[0] if "--probability" in x else None for x in dnat
    ]
    assert probs == ["0.3333333333", "0.5000000000", None]  # 1/3, then 1/2, then the rest
    assert not any("REJECT" in x for x in lines)
    assert lines[0] == "*nat"
    assert lines.count("COMMIT") == 2
    assert len(prog.chains) == 3


def test_render_rejects_ports_without_ready_endpoints_and_deletes_stale_chains() -> None:
    svc = _svc("a", "web", "10.96.0.10", ("http", 80, "TCP"))
    first = render([svc], [_slice("a", "web", [("10.201.0.1", True)], ("http", 8080))])
    assert first.rules == {"10.96.0.10:80": ["10.201.0.1:8080"]}
    (chain,) = first.chains

    gone = render(
        [svc], [_slice("a", "web", [("10.201.0.1", False)], ("http", 8080))], stale=first.chains
    )
    assert gone.rules == {"10.96.0.10:80": []}
    reject = "-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
    assert f"-A MLKP-SERVICES {reject}" in gone.text
    # The old chain is declared (so flushed) and then deleted.
    assert f":{chain} - [0:0]" in gone.text
    assert f"-X {chain}" in gone.text
    # A slice port named differently from the Service port matches nothing.
    other = render([svc], [_slice("a", "web", [("10.201.0.1", True)], ("web", 8080))])
    assert other.rules == {"10.96.0.10:80": []}
    assert render([], [], stale=first.chains).rules == {}


def test_render_takes_the_worst_copy_of_an_endpoint_listed_twice() -> None:
    """Two slices of one Service listing the same address and port with different readiness
    (meshlink's per-cluster slices all list the gateway pod): real kube-proxy keeps the copy
    it meets first, in Go map order, so either; the stand-in keeps the not-ready one."""
    svc = _svc("a", "web", "10.96.0.10", ("http", 80, "TCP"))
    one = _slice("a", "web", [("10.201.0.1", True)], ("http", 8080))
    two = _slice("a", "web", [("10.201.0.1", False), ("10.201.0.2", True)], ("http", 8080))
    for order in ([one, two], [two, one]):
        assert render([svc], order).rules == {"10.96.0.10:80": ["10.201.0.2:8080"]}
    agree = _slice("a", "web", [("10.201.0.1", True)], ("http", 8080))
    assert render([svc], [one, agree]).rules == {"10.96.0.10:80": ["10.201.0.1:8080"]}
