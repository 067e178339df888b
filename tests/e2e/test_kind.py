"""meshlink as its users run it: three kind clusters, meshlink deployed from manifests/ as a
pod from its own image, clients in pods resolving through their own resolver (CoreDNS) and
connecting through kube-proxy.

c1 and c3 each run a small HTTP server (Deployment `web`) and export it: c1 with a
ServiceExport, c3 with the `meshlink.io/export: "true"` annotation. A client pod in c2
reaches it as web.kshop.svc.clusterset.local: CoreDNS -> meshlink's DNS, then kube-proxy ->
c2's meshlink pod -> TLS tunnel -> the exporter's NodePort -> its meshlink pod -> the
exported Service -> a web pod.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.kindbed import Follow, KindCluster, KindTestbed, docker, wait_pod_ready, wait_rollout
from tests.kube import KubeError, wait_until

pytestmark = pytest.mark.timeout(1800)

NS = "kshop"
NAME = f"web.{NS}.svc.clusterset.local"
BLOB_MB = 4
CLIENT = "client"

# The web pods write BLOB_MB MiB of bytes every cluster derives alike (so a checksum proves
# the body crossed intact), and /who naming their cluster, then serve /srv.
_SERVER = f"""
import hashlib, os, pathlib
srv = pathlib.Path("/srv")
chunk, out = b"meshlink", bytearray()
while len(out) < {BLOB_MB} * 2**20:
    chunk = hashlib.sha256(chunk).digest()
    out += chunk * 32
(srv / "blob").write_bytes(bytes(out[: {BLOB_MB} * 2**20]))
(srv / "who").write_text(os.environ["CLUSTER"])
os.execvp("python3", ["python3", "-m", "http.server", "8080", "-d", "/srv"])
"""


def _blob_sha256() -> str:
    chunk, out = b"meshlink", bytearray()
    while len(out) < BLOB_MB * 2**20:
        chunk = hashlib.sha256(chunk).digest()
        out += chunk * 32
    return hashlib.sha256(bytes(out[: BLOB_MB * 2**20])).hexdigest()


def _web(cluster: str, image: str, *, annotated: bool) -> str:
    annotations = {"meshlink.io/export": "true"} if annotated else {}
    objects = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "web",
                                "image": image,
                                "command": ["python3", "-c", _SERVER],
                                "env": [{"name": "CLUSTER", "value": cluster}],
                                "ports": [{"containerPort": 8080}],
                                "readinessProbe": {"httpGet": {"path": "/who", "port": 8080}},
                                "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
                            }
                        ],
                        "volumes": [{"name": "srv", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": NS, "annotations": annotations},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
    ]
    if not annotated:
        objects.append(
            {
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceExport",
                "metadata": {"name": "web", "namespace": NS},
            }
        )
    return "\n---\n".join(json.dumps(o) for o in objects)


@dataclass(frozen=True)
class Shop:
    bed: KindTestbed
    c1: KindCluster
    c2: KindCluster
    c3: KindCluster

    def client(self, *cmd: str, timeout: float = 60) -> str:
        return self.c2.exec(NS, CLIENT, *cmd, timeout=timeout)

    def get(self, path: str, timeout: float = 10) -> str:
        """GET http://web.kshop.svc.clusterset.local/PATH from the client pod."""
        return self.client(
            "curl",
            "-sS",
            "--fail",
            "-m",
            str(timeout),
            f"http://{NAME}/{path}",
            timeout=timeout + 20,
        )


@pytest.fixture(scope="module")
def shop(kind_testbed: KindTestbed) -> Iterator[Shop]:
    c1, c2, c3 = kind_testbed.clusters
    for c in (c1, c2, c3):
        c.kubectl("create", "namespace", NS)
    c1.apply(_web("c1", kind_testbed.tools_image, annotated=False))
    c3.apply(_web("c3", kind_testbed.tools_image, annotated=True))
    c2.kubectl(
        "-n",
        NS,
        "run",
        CLIENT,
        f"--image={kind_testbed.tools_image}",
        "--restart=Never",
        "--command",
        "--",
        "sleep",
        "infinity",
    )
    for c in (c1, c3):
        wait_rollout(c, NS, "deploy/web")
    wait_pod_ready(c2, NS, CLIENT)
    shop = Shop(kind_testbed, c1, c2, c3)

    def imported_from_both() -> bool:
        si = c2.get_json("serviceimport", "web", "-n", NS)
        clusters = {x["cluster"] for x in si.get("status", {}).get("clusters", [])}
        return clusters == {"c1", "c3"}

    c2.wait_for(imported_from_both, 120, "web imported from c1 and c3")
    yield shop
    for c in (c1, c2, c3):
        c.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_a_pod_resolves_the_clusterset_name_through_its_own_resolver(shop: Shop) -> None:
    """The pod's /etc/resolv.conf points at CoreDNS, which forwards clusterset.local to
    meshlink (hack/coredns-stub.sh): getent (glibc's resolver) gets the ClusterSetIP."""
    si = shop.c2.get_json("serviceimport", "web", "-n", NS)
    (ip,) = si["spec"]["ips"]
    nameserver = re.search(r"^nameserver (\S+)", shop.client("cat", "/etc/resolv.conf"), re.M)
    assert nameserver is not None
    coredns = shop.c2.get_json("service", "kube-dns", "-n", "kube-system")["spec"]["clusterIP"]
    assert nameserver.group(1) == coredns
    got = wait_until(
        lambda: shop.client("getent", "hosts", NAME).split()[0:1] == [ip],
        60,
        f"{NAME} -> {ip}",
        ignore=(KubeError,),
    )
    assert got
    # Through CoreDNS, clusterset.local answers carry the flags cluster.local answers carry
    # (authoritative, recursion desired; CoreDNS sets no RA on its own zones either).
    flags = {}
    for name in (NAME, "kubernetes.default.svc.cluster.local"):
        out = shop.client("dig", "+noall", "+comments", name)
        m = re.search(r"flags: ([a-z ]+);", out)
        assert m is not None, out
        assert "status: NOERROR" in out, out
        flags[name] = set(m.group(1).split())
    assert flags[NAME] == flags["kubernetes.default.svc.cluster.local"], flags


def test_curl_reaches_an_exporter_through_the_tunnel_intact(shop: Shop) -> None:
    sums = shop.client(
        "sh", "-c", f"curl -sS --fail -m 30 http://{NAME}/blob | sha256sum", timeout=60
    )
    assert sums.split()[0] == _blob_sha256()
    assert shop.get("who") in {"c1", "c3"}


def test_both_kinds_of_export_are_seen_as_users_see_them(shop: Shop) -> None:
    """c3's ServiceExport was created by meshlink from the annotation; both exports are
    Ready; kubectl shows the import, and the export's Events say it was exported."""
    for c in (shop.c1, shop.c3):
        svcex = c.get_json("serviceexport", "web", "-n", NS)
        conds = {x["type"]: (x["status"], x["reason"]) for x in svcex["status"]["conditions"]}
        assert conds == {
            "Valid": ("True", "Valid"),
            "Ready": ("True", "Exported"),
            "Conflict": ("False", "NoConflicts"),
        }, (c.name, conds)
    managed = shop.c3.get_json("serviceexport", "web", "-n", NS, "--show-managed-fields")[
        "metadata"
    ]["managedFields"]
    assert any(m["manager"] == "meshlink" for m in managed)

    table = shop.c2.kubectl("get", "serviceimports", "-n", NS).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "TYPE", "IP"], table
    assert table[1].split()[:2] == ["web", "ClusterSetIP"], table

    def exported_event() -> bool:
        events = shop.c1.get_json(
            "events", "-n", NS, "--field-selector", "involvedObject.kind=ServiceExport"
        )["items"]
        return any(e["reason"] == "Exported" and e["type"] == "Normal" for e in events)

    shop.c1.wait_for(exported_event, 30, "an Exported event on c1's ServiceExport")
    described = shop.c1.kubectl("describe", "serviceexport", "web", "-n", NS).stdout
    assert "Exported" in described.split("Events:")[-1]

    for pod, status in shop.c2.meshlink_statuses().items():
        links = {link["peer"]: link["state"] for link in status["links"]}
        assert links == {"c1": "up", "c3": "up"}, (pod, links)
    check = shop.c2.kubectl(
        "-n", "meshlink-system", "exec", "deploy/meshlink", "--", "meshlink", "check", check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_controller_manager_leaves_meshlink_objects_alone(shop: Shop) -> None:
    """The derived Service has no selector, so the real EndpointSlice controller publishes
    no slice of its own for it and leaves meshlink's alone, even when told to look again."""
    c2 = shop.c2
    derived = c2.get_json("serviceimport", "web", "-n", NS)["metadata"]["annotations"][
        "multicluster.kubernetes.io/derived-service"
    ]
    svc = c2.get_json("service", derived, "-n", NS)
    assert "selector" not in svc["spec"]

    def slices() -> list[dict[str, object]]:
        items = c2.get_json(
            "endpointslices", "-n", NS, "-l", f"kubernetes.io/service-name={derived}"
        )["items"]
        return sorted(items, key=lambda s: s["metadata"]["name"])

    before = slices()
    assert before, "meshlink wrote no EndpointSlice for the derived Service"
    assert {s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] for s in before} == {
        "meshlink.io"
    }
    # Make the controller look at the derived Service, then prove it has worked through
    # that: a Service created afterwards (with a selector) gets its slice from it.
    c2.kubectl("annotate", "service", derived, "-n", NS, f"meshlink-test/poke={time.time()}")
    c2.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "sentinel", "namespace": NS},
                "spec": {"selector": {"run": CLIENT}, "ports": [{"port": 9}]},
            }
        )
    )
    c2.wait_for(
        lambda: c2.get_json(
            "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=sentinel"
        )["items"],
        60,
        "the EndpointSlice controller's slice for a new Service",
    )
    after = slices()
    assert [(s["metadata"]["name"], s["metadata"]["resourceVersion"]) for s in after] == [
        (s["metadata"]["name"], s["metadata"]["resourceVersion"]) for s in before
    ]
    c2.kubectl("delete", "service", "sentinel", "-n", NS)


class Probe:
    """A client loop in the c2 pod: a new connection every 100 ms, each line `T OK|FAIL WHO`,
    read as it comes."""

    def __init__(self, shop: Shop, seconds: float):
        n = int(seconds * 10)
        script = (
            f"i=0; while [ $i -lt {n} ]; do t=$(date +%s.%N); "
            f"w=$(curl -sS --fail -m 1 http://{NAME}/who 2>/dev/null) "
            '&& echo "$t OK $w" || echo "$t FAIL -"; i=$((i+1)); sleep 0.1; done'
        )
        argv = [
            str(shop.c2.kubectl_bin),
            "--kubeconfig",
            str(shop.c2.kubeconfig),
            "-n",
            NS,
            "exec",
            CLIENT,
            "--",
            "sh",
            "-c",
            script,
        ]
        self.follow = Follow(argv, _probe_row)
        self.rows = self.follow.rows

    def wait_ok(self, count: int, timeout: float = 30) -> None:
        wait_until(
            lambda: sum(ok for _, ok, _ in self.rows) >= count,
            timeout,
            f"{count} successful connections before the fault",
        )

    def result(self, timeout: float) -> list[tuple[float, bool, str]]:
        rows = self.follow.finish(timeout)
        assert rows, "the probe printed nothing"
        return rows


def _probe_row(line: str) -> tuple[float, bool, str]:
    t, state, who = line.split()
    return (float(t), state == "OK", who)


def _longest_gap(rows: list[tuple[float, bool, str]], after: float) -> float:
    """Seconds from the fault (or the last success before a failure) to the next success."""
    gap, last_ok = 0.0, after
    for t, ok, _ in rows:
        if t < after:
            continue
        if ok:
            gap = max(gap, t - last_ok)
            last_ok = t
    return gap


def _serving(shop: Shop) -> KindCluster:
    who = shop.get("who")
    return {"c1": shop.c1, "c3": shop.c3}[who]


def _wait_linked(shop: Shop) -> None:
    def both_up() -> bool:
        return all(
            {lk["peer"]: lk["state"] for lk in status["links"]} == {"c1": "up", "c3": "up"}
            for status in shop.c2.meshlink_statuses().values()
        )

    wait_until(
        both_up, 120, "every c2 replica linked to c1 and c3 again", interval=1, ignore=(KubeError,)
    )


def _through_fault(
    shop: Shop,
    serving: KindCluster,
    what: str,
    fault: Callable[[], object],
    undo: Callable[[], object],
) -> list[tuple[float, bool, str]]:
    """Probe new connections from c2 across `fault` (undone once the probe ends), print the
    longest gap and the failures after it, and check that the other exporter took over."""
    probe = Probe(shop, 30)
    probe.wait_ok(10)
    fault_at = time.time()
    fault()
    try:
        rows = probe.result(timeout=90)
    finally:
        undo()
    after = [r for r in rows if r[0] >= fault_at]
    gap = _longest_gap(rows, fault_at)
    failed = sum(1 for _, ok, _ in after if not ok)
    print(
        f"\nfailover, {serving.name}'s {what}: new connections failed for {gap:.2f} s at most "
        f"({failed} of {len(after)} failed)"
    )
    assert rows[-1][1], "connections did not recover"
    # Failover, not waiting for the faulted cluster: once connections fail, the other
    # exporter serves before the faulted one does again.
    first_fail = next((t for t, ok, _ in after if not ok), None)
    if first_fail is not None:
        first_ok = next(who for t, ok, who in after if ok and t > first_fail)
        assert first_ok != serving.name, (
            "connections failed until the faulted cluster came back; none failed over"
        )
    return rows


def test_failover_when_the_serving_node_leaves_the_network(shop: Shop) -> None:
    """Every node of the serving cluster (c1 has workers, where its pods run) leaves."""
    serving = _serving(shop)
    ips = {node: serving.node_ip(node) for node in serving.nodes()}
    rows = _through_fault(
        shop,
        serving,
        f"{len(ips)} node(s) cut off the network",
        lambda: [docker("network", "disconnect", "kind", node) for node in ips],
        lambda: [
            docker("network", "connect", "--ip", ip, "kind", node) for node, ip in ips.items()
        ],
    )
    assert serving.name not in {who for _, ok, who in rows[-5:] if ok}
    _wait_linked(shop)
    assert shop.get("who") in {"c1", "c3"}


def test_failover_when_the_serving_node_goes_silent(shop: Shop) -> None:
    """docker pause freezes whole nodes (every one of the serving cluster): its gateways
    stop answering without closing anything, so only missed heartbeats tell (3 of them, 1 s
    apart by default)."""
    serving = _serving(shop)
    nodes = serving.nodes()
    rows = _through_fault(
        shop,
        serving,
        f"{len(nodes)} node(s) paused (silent)",
        lambda: [docker("pause", node) for node in nodes],
        lambda: [docker("unpause", node) for node in nodes],
    )
    assert serving.name not in {who for _, ok, who in rows[-5:] if ok}
    _wait_linked(shop)
