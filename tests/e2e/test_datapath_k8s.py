"""Kubernetes mode, the data path: a client pod in one cluster reaches an exported Service in
another by its clusterset name, through kube-proxy, the gateways and the tunnel.

Three real API servers, each cluster a network namespace of the testbed (tests/netbed):
pods are processes on pod addresses, a kube-proxy stand-in DNATs ClusterIPs to
EndpointSlice endpoints, and the clusters reach each other only through the WAN namespace.
`meshlink run` runs inside each cluster as its gateway pod (a Pod object carries its pod
address, as the kubelet would report it). c1 exports `web` and `api`, both on port 80; c3
exports `web` too; c2 imports both and is linked to c1 and c3 with real tokens.

What is checked, with curl and dig inside the namespaces:
- DNS at c2 answers the derived Service's ClusterIP; an HTTP GET to it is answered by the
  exporting cluster's pod, for `web` and `api` alike (two imports on one port, told apart
  by their gateway target ports);
- the exporter imports too, and its own clients are served by its own pods;
- the serving cluster is cut off the WAN (iptables DROP): new connections are served by
  the other exporter within seconds, and the import c1 alone exported goes away;
- the cut is healed: the link comes back and so does the import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlink.k8s.model import DERIVED_ANNOTATION
from tests.kube import KubeCluster, endpoint_slice, install_crds, wait_until
from tests.netbed.kubeproxy import KubeProxy
from tests.netbed.netns import Testbed, require_root

pytestmark = pytest.mark.timeout(300)

SYSTEM_NS = "meshlink-system"
NS = "shop"
OPS = "127.0.0.1:7480"
HEARTBEAT = 0.3


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Testbed]:
    require_root()
    with Testbed(3, tmp_path / "netbed") as tb:
        yield tb


class Cluster:
    """One cluster of the test: its API server, its namespace, its meshlink site."""

    def __init__(self, tb: Testbed, i: int, kube: KubeCluster, root: Path) -> None:
        self.tb, self.i, self.kube = tb, i, kube
        self.net = tb.cluster(i)
        self.dir = root / kube.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gateway_ip = ""
        self.proxy: KubeProxy | None = None
        self.log = f"meshlink-{kube.name}"
        """The name of meshlink's log in the testbed (`Testbed.log_path`)."""
        self.proc: subprocess.Popen[bytes] | None = None
        """meshlink's process (its pid is meshlink's: `ip netns exec` execs)."""

    @property
    def config(self) -> Path:
        return self.dir / "site.yaml"

    def prepare(self) -> None:
        install_crds(self.kube)
        self.kube.apply(
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {SYSTEM_NS}}}\n---\n"
            f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
        )
        self.tb.connect_apiserver(self.i, self.kube)
        self.proxy = self.tb.start_kubeproxy(self.i, self.kube.kubeconfig)
        # The gateway pod: a pod address for meshlink, reported on its Pod as the kubelet
        # would (no kubelet runs here).
        self.gateway_ip = self.tb.add_pod_ip(self.i)
        self.kube.apply(
            f"""
apiVersion: v1
kind: Pod
metadata:
  name: meshlink-0
  namespace: {SYSTEM_NS}
  labels: {{app.kubernetes.io/name: meshlink}}
spec:
  containers: [{{name: meshlink, image: meshlink}}]
"""
        )
        status = {
            "status": {
                "podIP": self.gateway_ip,
                "podIPs": [{"ip": self.gateway_ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        }
        self.kube.kubectl(
            "patch",
            "pod",
            "meshlink-0",
            "-n",
            SYSTEM_NS,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )

    def start_site(self) -> None:
        node = self.net.node_ip
        cfg = {
            "site": self.kube.name,
            "stateDir": str(self.dir / "state"),
            "gateway": {"listen": f"{node}:7443"},
            "grant": {"listen": f"{node}:7444"},
            "dns": {"listen": f"{self.gateway_ip}:5353"},
            "ops": {"listen": OPS},
            "heartbeatInterval": HEARTBEAT,
            "kubernetes": {
                "kubeconfig": str(self.kube.kubeconfig),
                "requestTimeout": 5,
                "importAddress": self.gateway_ip,
                "namespace": SYSTEM_NS,
            },
        }
        self.config.write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "meshlink", "run", "--config", str(self.config)]
        self.proc = self.tb.popen(self.i, argv, log=self.log)
        self.tb.wait_running(
            self.proc,
            self.log,
            lambda: (self.curl_text(f"http://{OPS}/readyz") or "").startswith("ok"),
            30,
            f"meshlink in {self.kube.name} ready",
        )

    def log_tail(self, n: int = 40) -> str:
        return self.tb.log_tail(self.log, n)

    def meshlink(self, *args: str) -> str:
        out = self.tb.run(self.i, [sys.executable, "-m", "meshlink", *args], timeout=60)
        return out.stdout

    def curl_text(self, url: str, timeout: float = 3.0) -> str | None:
        """The body of one GET from inside this cluster, or None if it failed."""
        out = self.tb.curl(self.i, url, timeout=timeout)
        return out.stdout.strip() if out.returncode == 0 else None

    def status(self) -> dict[str, Any]:
        body = self.curl_text(f"http://{OPS}/api/status")
        assert body is not None, f"no status from {self.kube.name}"
        data: dict[str, Any] = json.loads(body)
        return data

    def link_up(self, peer: str) -> bool:
        return any(x["peer"] == peer and x["state"] == "up" for x in self.status()["links"])

    def link_to(self, issuer: Cluster) -> None:
        token = self.dir / f"token-from-{issuer.kube.name}"
        issuer.meshlink("token", "create", "--config", str(issuer.config), "-o", str(token))
        self.meshlink("link", "create", str(token), "--config", str(self.config))
        wait_until(lambda: self.link_up(issuer.kube.name), 20, f"link to {issuer.kube.name}")

    def serve(self, name: str, body: str) -> None:
        """A pod answering `body`, exported as `name` (port 80 -> 8080)."""
        pod = self.tb.start_pod(self.i, body, port=8080)
        self.export(name, pod.ip)

    def export(
        self, name: str, pod_ip: str, port: int = 80, target: int = 8080, port_name: str = "http"
    ) -> str:
        """Service `name` (port -> target), its EndpointSlice as the endpoints controller
        would write it (`pod_ip` ready), and its ServiceExport; returns the Service's
        ClusterIP once kube-proxy here sends it to the pod."""
        self.kube.apply(
            f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  ports: [{{name: {port_name}, port: {port}, targetPort: {target}, protocol: TCP}}]
---
{endpoint_slice(NS, name, [pod_ip], [(port_name, target, "TCP")], name=f"{name}-1")}
---
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceExport
metadata: {{name: {name}, namespace: {NS}}}
"""
        )
        ip: str = self.kube.get_json("service", "-n", NS, name)["spec"]["clusterIP"]
        assert self.proxy is not None
        self.proxy.wait_rules(ip, port, [f"{pod_ip}:{target}"])
        return ip

    def imported(self, name: str, port: int = 80) -> tuple[str, int] | None:
        """The clusterset IP and gateway target port of an import's `port`, once
        kube-proxy here sends that IP:port to the gateway pod."""
        si = self.kube.find("serviceimports.multicluster.x-k8s.io", "-n", NS, name)
        if si is None:
            return None
        ips = si["spec"].get("ips") or []
        if not ips:
            return None
        derived = self.kube.get_json(
            "service", "-n", NS, si["metadata"]["annotations"][DERIVED_ANNOTATION]
        )
        (target,) = [p["targetPort"] for p in derived["spec"]["ports"] if p["port"] == port]
        assert self.proxy is not None
        self.proxy.wait_rules(ips[0], port, [f"{self.gateway_ip}:{target}"])
        return ips[0], target

    def dig(self, name: str) -> list[str]:
        out = self.tb.run(
            self.i,
            ["dig", "+short", "+time=2", "+tries=1", "-p", "5353", f"@{self.gateway_ip}", name],
            check=False,
        )
        return out.stdout.split()


def served_by(c: Cluster, ip: str, accept: Callable[[str], bool]) -> str:
    """GET http://ip/ from cluster c until the body satisfies `accept`; returns it."""
    return wait_until(
        lambda: b if (b := c.curl_text(f"http://{ip}/")) is not None and accept(b) else None,
        20,
        f"an answer from http://{ip}/ in {c.kube.name}",
    )


def test_clusterset_traffic_through_gateways_and_failover(
    kube_clusters: Callable[[int], list[KubeCluster]], testbed: Testbed, tmp_path: Path
) -> None:
    kubes = kube_clusters(3)
    c1, c2, c3 = (Cluster(testbed, i + 1, k, tmp_path) for i, k in enumerate(kubes))
    clusters = (c1, c2, c3)
    try:
        for c in clusters:
            c.prepare()
            c.start_site()
        c2.link_to(c1)
        c2.link_to(c3)
        c1.serve("web", "web@c1")
        c1.serve("api", "api@c1")
        c3.serve("web", "web@c3")

        web = wait_until(lambda: c2.imported("web"), 30, "web imported in c2")
        api = wait_until(lambda: c2.imported("api"), 30, "api imported in c2")
        assert web[1] != api[1], "two imports on port 80 share a gateway port"
        assert c2.dig("web.shop.svc.clusterset.local") == [web[0]]
        assert c2.dig("api.shop.svc.clusterset.local") == [api[0]]

        # Through kube-proxy (ClusterIP -> gateway pod, target port), the tunnel, and
        # the exporting cluster's kube-proxy (its Service's ClusterIP -> its pod).
        first = served_by(c2, web[0], lambda b: b in ("web@c1", "web@c3"))
        assert served_by(c2, api[0], lambda b: True) == "api@c1"
        # The exporter imports too; its clients are served by its own pods.
        own = wait_until(lambda: c1.imported("web"), 30, "web imported in c1")
        assert served_by(c1, own[0], lambda b: True) == "web@c1"

        # The cluster that served web is cut off the WAN: new connections go to the other
        # exporter once the silent link is declared down (3 missed heartbeats).
        serving = c1 if first == "web@c1" else c3
        other = "web@c3" if serving is c1 else "web@c1"
        t0 = time.monotonic()
        testbed.isolate(serving.i)
        assert served_by(c2, web[0], lambda b: b == other) == other
        print(
            f"\n{serving.kube.name} cut off: web served by the other exporter in "
            f"{time.monotonic() - t0:.2f} s"
        )
        testbed.unisolate(serving.i)
        wait_until(lambda: c2.link_up(serving.kube.name), 30, "link back after the cut")

        # c1 cut off: api had no other exporter. With c1's lease (the link) its endpoints
        # go not ready, so connections fail, but for the grace period its import stays as
        # it was: the same ServiceImport and clusterset IP, which DNS keeps answering.
        # web stays, served by c3.
        def api_import() -> tuple[str, list[str]]:
            si = c2.kube.get_json("serviceimports.multicluster.x-k8s.io", "-n", NS, "api")
            return si["metadata"]["uid"], si["spec"]["ips"]

        before = api_import()
        assert before[1] == [api[0]]
        testbed.isolate(c1.i)
        wait_until(lambda: not c2.link_up(c1.kube.name), 20, "c2 sees c1 go")
        wait_until(lambda: c2.curl_text(f"http://{api[0]}/") is None, 20, "api refused in c2")
        assert c2.dig("api.shop.svc.clusterset.local") == [api[0]]
        assert api_import() == before
        assert served_by(c2, web[0], lambda b: b == "web@c3") == "web@c3"

        # Healed: the link comes back, and the import serves again, unchanged.
        testbed.unisolate(c1.i)
        wait_until(lambda: c2.link_up(c1.kube.name), 30, "link to c1 back after the cut")
        assert served_by(c2, api[0], lambda b: True) == "api@c1"
        assert api_import() == before
    except BaseException:
        for c in clusters:
            print(f"--- meshlink log of {c.kube.name}:\n{c.log_tail()}")
        raise
