"""The Helm chart (charts/meshlink) for real, on the session's kind cluster c3: its kustomize
install is taken down (CRDs kept), then the chart is installed, linked to c1, upgraded and
uninstalled, as the README tells users to; then c3 gets its kustomize install back and is
linked again as hack/kind.sh left it, for whatever runs after.

What must hold: an upgrade keeps the site (same CA in its Secrets, so its link comes back
without a new token) and its imports (same clusterset IP); an uninstall removes meshlink's
objects, keeps the CRDs and the users' ServiceExports, and leaves no import behind (the
garbage collector removes them: they are owned by meshlink's namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kindbed import KindCluster, KindTestbed, wait_rollout
from tests.kube import REPO, KubeError, wait_until

pytestmark = pytest.mark.timeout(1200)

NS = "helmk"
RELEASE = "meshlink"
CHART = REPO / "charts" / "meshlink"
WAIT = 120.0
CLUSTER_SCOPED = (
    "clusterrole,clusterrolebinding,validatingadmissionpolicy,validatingadmissionpolicybinding"
)


def _run(argv: list[str], timeout: float) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise KubeError(f"{' '.join(argv[:3])} failed: {(proc.stderr or proc.stdout)[-2000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    try:
        return Path(_run(["bash", str(REPO / "hack" / "helm.sh"), "--print-path"], 1700).strip())
    except KubeError as e:
        pytest.fail(f"cannot build helm: {e}", pytrace=False)


def helm(c: KindCluster, helm_bin: Path, *args: str, timeout: float = 400) -> str:
    return _run([str(helm_bin), "--kubeconfig", str(c.kubeconfig), *args], timeout)


def link_state(c: KindCluster) -> dict[str, str]:
    """Each peer's link state, the worst over the replicas ("up" only where every replica's
    link is up)."""
    states: dict[str, str] = {}
    for status in c.meshlink_statuses().values():
        for lk in status["links"]:
            if states.get(lk["peer"], "up") == "up":
                states[lk["peer"]] = lk["state"]
    return states


def link(dialer: KindCluster, issuer: KindCluster) -> None:
    """What hack/kind.sh does: the dialer redeems a token of the issuer."""
    try:  # the issuer forgets the dialer's previous identity (a new site state)
        issuer.meshlink("peer", "revoke", dialer.name)
    except KubeError as e:
        if "unknown" not in str(e) and "no peer" not in str(e):
            raise
    token = issuer.meshlink("token", "create", "--expiry", "5m")
    dialer.meshlink("link", "create", "-", "--name", issuer.name, stdin=token)


def wait_linked(c: KindCluster, peers: set[str]) -> None:
    wait_until(
        lambda: {p for p, s in link_state(c).items() if s == "up"} >= peers,
        WAIT,
        f"links up to {sorted(peers)} in cluster {c.name}",
        interval=1,
        ignore=(KubeError,),  # a replica starting: its ops server not up yet
    )


def leftovers(c: KindCluster) -> list[str]:
    """What an uninstalled meshlink must not leave: imports, derived Services, its slices."""
    found = []
    for what, selector in (
        ("serviceimports", "app.kubernetes.io/managed-by=meshlink"),
        ("services", "app.kubernetes.io/managed-by=meshlink"),
        ("endpointslices", "endpointslice.kubernetes.io/managed-by=meshlink.io"),
    ):
        items = c.get_json(what, "-A", "-l", selector)["items"]
        found += [f"{what}/{o['metadata']['namespace']}/{o['metadata']['name']}" for o in items]
    return found


def si_of(c: KindCluster, name: str) -> dict[str, Any] | None:
    return c.find("serviceimport", name, "-n", NS)


def kustomize_down(c: KindCluster) -> None:
    """Uninstall the kustomize deployment but keep the CRDs (and so every ServiceExport)."""
    c.kubectl("delete", "namespace", "meshlink-system", "--wait=true", timeout=300)
    c.kubectl("delete", CLUSTER_SCOPED, "-l", "app.kubernetes.io/part-of=meshlink", timeout=120)


@pytest.fixture(scope="module")
def c3_for_helm(kind_testbed: KindTestbed) -> Iterator[tuple[KindCluster, KindCluster]]:
    c1, c2, c3 = kind_testbed.clusters
    for c in (c1, c3):
        c.kubectl("create", "namespace", NS)
    # web: exported by c1 (no pods needed: an import exists without endpoints).
    c1.apply(
        "\n---\n".join(
            json.dumps(o)
            for o in (
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web", "namespace": NS},
                    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]},
                },
                {
                    "apiVersion": "multicluster.x-k8s.io/v1beta1",
                    "kind": "ServiceExport",
                    "metadata": {"name": "web", "namespace": NS},
                },
            )
        )
    )
    c3.wait_for(lambda: si_of(c3, "web") is not None, WAIT, "web imported (kustomize install)")
    kustomize_down(c3)
    # The kustomize install's imports went with its namespace.
    c3.wait_for(lambda: not leftovers(c3), WAIT, "no import left after kubectl delete")
    try:
        yield c1, c3
    finally:
        # Back to what hack/kind.sh made: the kustomize overlay, CoreDNS's stub, both links.
        if c3.exists("namespace", "meshlink-system"):
            kustomize_down(c3)
        c3.kubectl("apply", "--server-side", "-k", str(kind_testbed.state / "c3"), timeout=120)
        wait_rollout(c3, "meshlink-system", "deploy/meshlink")
        # The new meshlink-dns Service has another ClusterIP: point CoreDNS at it.
        stub = subprocess.run(
            ["bash", str(REPO / "hack" / "coredns-stub.sh"), "--restart"],
            env={**os.environ, "KUBECONFIG": str(c3.kubeconfig)},
            check=False,
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert stub.returncode == 0, stub.stderr
        for issuer in (c1, c2):
            link(c3, issuer)
        wait_linked(c3, {"c1", "c2"})
        for c in (c1, c3):
            c.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def test_helm_install_upgrade_and_uninstall(
    c3_for_helm: tuple[KindCluster, KindCluster], helm_bin: Path
) -> None:
    c1, c3 = c3_for_helm
    ip = c3.node_ip()
    # The image the session loaded (hack/image.sh tags it with the project's version).
    tag = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    # -- install ---------------------------------------------------------------------------
    helm(
        c3,
        helm_bin,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        "default",
        "--set",
        "site=c3",
        "--set",
        "gateway.type=NodePort",
        "--set",
        f"gateway.advertise={{{ip}:30443}}",
        "--set",
        f"grant.advertise={ip}:30444",
        "--set",
        f"image.tag={tag}",
        "--wait",
        "--timeout",
        "5m",
    )
    pods = c3.meshlink_pods()
    assert len(pods) == 2  # the chart's default: two replicas
    assert {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in pods} == {"meshlink"}
    assert c3.exists("poddisruptionbudget", "meshlink", "-n", "meshlink-system")
    # c3 exports a Service of its own, with a ServiceExport that is the user's.
    c3.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "local", "namespace": NS},
                "spec": {"selector": {"app": "local"}, "ports": [{"port": 81}]},
            }
        )
    )
    c3.apply(
        json.dumps(
            {
                "apiVersion": "multicluster.x-k8s.io/v1beta1",
                "kind": "ServiceExport",
                "metadata": {"name": "local", "namespace": NS},
            }
        )
    )
    link(c3, c1)
    wait_linked(c3, {"c1"})
    si = c3.wait_for(
        lambda: (s := si_of(c3, "web")) is not None and s["spec"].get("ips") and s,
        WAIT,
        "web imported from c1 by the Helm install",
    )
    ips = si["spec"]["ips"]
    owner = c3.get_json("namespace", "meshlink-system")["metadata"]["uid"]
    assert [r["uid"] for r in si["metadata"]["ownerReferences"]] == [owner]

    # -- upgrade: another pod template (resources), the same site --------------------------
    helm(
        c3,
        helm_bin,
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        "default",
        "--reuse-values",
        "--set",
        "resources.requests.cpu=150m",
        "--wait",
        "--timeout",
        "5m",
    )
    new_pods = c3.meshlink_pods()
    assert len(new_pods) == 2
    assert not {p["metadata"]["uid"] for p in new_pods} & {p["metadata"]["uid"] for p in pods}
    for new_pod in new_pods:
        (container,) = new_pod["spec"]["containers"]
        assert container["resources"]["requests"]["cpu"] == "150m"
    # Its state Secrets kept the CA and the link: back up with no new token.
    wait_linked(c3, {"c1"})
    si = si_of(c3, "web")
    assert si is not None
    assert si["spec"]["ips"] == ips
    history = json.loads(helm(c3, helm_bin, "history", RELEASE, "-n", "default", "-o", "json"))
    assert [h["revision"] for h in history] == [1, 2]

    # -- uninstall -------------------------------------------------------------------------
    helm(c3, helm_bin, "uninstall", RELEASE, "--namespace", "default", "--wait", "--timeout", "5m")
    assert not c3.exists("namespace", "meshlink-system")
    assert not c3.get_json(CLUSTER_SCOPED, "-l", "app.kubernetes.io/part-of=meshlink")["items"]
    # The CRDs stay (Helm never deletes crds/), and with them the users' ServiceExports.
    for crd in ("serviceexports", "serviceimports"):
        assert c3.exists("crd", f"{crd}.multicluster.x-k8s.io")
    assert c3.exists("crd", "clusterproperties.about.k8s.io")
    assert c3.exists("serviceexport", "local", "-n", NS)
    # No import is orphaned: the garbage collector removes what meshlink's namespace owned.
    c3.wait_for(lambda: not leftovers(c3), WAIT, "no import left after helm uninstall")
