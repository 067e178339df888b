"""charts/meshlink renders the objects of the kustomize base (manifests/): `helm template`
(Helm built from its Go module by hack/helm.sh) against `kubectl kustomize` of the base and
of overlays like the ones users write, object by object.

Two differences are by design and normalised here: kustomize names the ConfigMap with a hash
of its content (which rolls the Deployment on a change), where the chart keeps the name and
puts the content's hash in a pod template annotation; and an overlay's site.yaml is written
by the chart from values, so the ConfigMaps are compared as the configuration meshlink reads
(config.yaml with site.yaml merged over it).
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import REPO, assert_ha_deployment

pytestmark = pytest.mark.timeout(1800)

CHART = REPO / "charts" / "meshlink"
Obj = dict[str, Any]
Key = tuple[str, str, str, str]


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def helm() -> Path:
    # The first build takes minutes (Helm is a large Go module); then it is cached.
    proc = _run(["bash", str(REPO / "hack" / "helm.sh"), "--print-path"], timeout=1700)
    if proc.returncode != 0:
        pytest.fail(f"cannot build helm: {proc.stderr[-2000:]}", pytrace=False)
    return Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def kubectl() -> Path:
    proc = _run(["bash", str(REPO / "hack" / "kube-bin.sh"), "--print-dir"], timeout=1700)
    if proc.returncode != 0:
        pytest.fail(f"cannot build kubectl: {proc.stderr[-2000:]}", pytrace=False)
    return Path(proc.stdout.strip()) / "kubectl"


def _docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_helm(helm: Path, *args: str) -> list[Obj]:
    proc = _run([str(helm), "template", "meshlink", str(CHART), "--include-crds", *args])
    assert proc.returncode == 0, proc.stderr
    return _docs(proc.stdout)


def render_kustomize(kubectl: Path, directory: Path) -> list[Obj]:
    proc = _run([str(kubectl), "kustomize", str(directory)])
    assert proc.returncode == 0, proc.stderr
    return _docs(proc.stdout)


def deep_merge(base: object, over: object) -> Any:
    """As meshlink merges its config files: mappings key by key, other values replace."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: deep_merge(base.get(k), v) for k, v in over.items()}}


def _config(cm: Obj) -> Obj:
    """What meshlink reads from the mounted ConfigMap: its *.yaml files in name order, each
    merged over the ones before."""
    merged: Obj = {}
    for name in sorted(cm.get("data", {})):
        if name.endswith(".yaml"):
            merged = deep_merge(merged, yaml.safe_load(cm["data"][name]) or {})
    return merged


def normalised(objects: list[Obj]) -> dict[Key, Obj]:
    out: dict[Key, Obj] = {}
    for o in copy.deepcopy(objects):
        meta = o["metadata"]
        if o["kind"] == "ConfigMap" and meta["name"].startswith("meshlink-config"):
            meta["name"] = "meshlink-config"
            o = {**o, "data": {"(merged)": _config(o)}}
        if o["kind"] == "Deployment":
            pod = o["spec"]["template"]
            annotations = pod["metadata"].pop("annotations", {})
            annotations.pop("meshlink.io/config-sha256", None)
            if annotations:
                pod["metadata"]["annotations"] = annotations
            for v in pod["spec"]["volumes"]:
                if "configMap" in v:
                    v["configMap"]["name"] = "meshlink-config"
        key = (o["apiVersion"], o["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = o
    return out


def assert_same(helm_objects: list[Obj], kustomize_objects: list[Obj]) -> None:
    h, k = normalised(helm_objects), normalised(kustomize_objects)
    assert sorted(h) == sorted(k)
    for key in sorted(k):
        assert h[key] == k[key], key


def _overlay(tmp: Path, site: str | None, component: str | None, tag: str | None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.relpath(REPO / "manifests", tmp))  # kustomize wants relative paths
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"resources: [{base}]",
    ]
    if component:
        lines.append(f"components: [{base / 'components' / component}]")
    if site is not None:
        (tmp / "site.yaml").write_text(site)
        lines += [
            "configMapGenerator:",
            "  - {name: meshlink-config, namespace: meshlink-system, behavior: merge,"
            " files: [site.yaml]}",
        ]
    if tag:
        lines.append(f'images: [{{name: ghcr.io/meshlink/meshlink, newTag: "{tag}"}}]')
    (tmp / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tmp


def test_defaults_render_the_kustomize_base(helm: Path, kubectl: Path) -> None:
    helm_objects = render_helm(helm)
    assert_same(helm_objects, render_kustomize(kubectl, REPO / "manifests"))
    kinds = sorted({o["kind"] for o in helm_objects})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]


def test_a_kind_sites_values_render_its_overlay(helm: Path, kubectl: Path, tmp_path: Path) -> None:
    """What hack/kind.sh writes for a cluster (site id, NodePort gateway, advertised
    addresses, image tag), as values."""
    site = (
        "site: c1\n"
        "gateway:\n  advertise: [172.18.0.2:30443]\n"
        "grant:\n  advertise: 172.18.0.2:30444\n"
    )
    overlay = _overlay(tmp_path, site, "gateway-nodeport", "9.9.9")
    helm_objects = render_helm(
        helm,
        "--set",
        "site=c1",
        "--set",
        "gateway.type=NodePort",
        "--set",
        "gateway.advertise={172.18.0.2:30443}",
        "--set",
        "grant.advertise=172.18.0.2:30444",
        "--set",
        "image.tag=9.9.9",
    )
    assert_same(helm_objects, render_kustomize(kubectl, overlay))


def test_a_load_balancer_gateway_renders_the_component(
    helm: Path, kubectl: Path, tmp_path: Path
) -> None:
    overlay = _overlay(tmp_path, None, "gateway-loadbalancer", None)
    assert_same(
        render_helm(helm, "--set", "gateway.type=LoadBalancer"), render_kustomize(kubectl, overlay)
    )


def test_values_beyond_the_overlays(helm: Path) -> None:
    """Replicas, resources and the import port range, which a kustomize user patches by
    hand."""
    objects = render_helm(
        helm,
        "--set",
        "replicas=0",
        "--set",
        "resources.requests.cpu=250m",
        "--set",
        "importPorts=31000-31999",
        "--set",
        "config.dns.ttl=30",
    )
    by_kind = {o["kind"]: o for o in objects if o["kind"] != "Service"}
    deploy = by_kind["Deployment"]
    assert deploy["spec"]["replicas"] == 0
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "250m", "memory": "128Mi"}
    config = _config(by_kind["ConfigMap"])
    assert config["kubernetes"]["importPorts"] == "31000-31999"
    assert config["kubernetes"]["namespace"] == "meshlink-system"
    assert config["dns"] == {"listen": "0.0.0.0:5353", "zone": "clusterset.local", "ttl": 30}
    # Another configuration is another pod template: the Deployment rolls.
    default = next(o for o in render_helm(helm) if o["kind"] == "Deployment")
    sha = "meshlink.io/config-sha256"
    assert (
        deploy["spec"]["template"]["metadata"]["annotations"][sha]
        != default["spec"]["template"]["metadata"]["annotations"][sha]
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "replicas=-1"], "replicas must be 0 or more"),
        (["--set", "gateway.type=ExternalName"], "gateway.type must be ClusterIP, NodePort"),
    ],
)
def test_values_it_refuses_name_the_value(helm: Path, values: list[str], message: str) -> None:
    proc = _run([str(helm), "template", "meshlink", str(CHART), *values])
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize(("replicas", "pdb"), [(0, False), (1, False), (2, True), (3, True)])
def test_replicas_and_their_disruption_budget(helm: Path, replicas: int, pdb: bool) -> None:
    """Any number of replicas (one writer among them, through the Lease); a
    PodDisruptionBudget of minAvailable 1 only where it leaves a drain something to evict."""
    objects = render_helm(helm, "--set", f"replicas={replicas}")
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == replicas
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert bool(budgets) == pdb
    for budget in budgets:
        assert budget["spec"]["minAvailable"] == 1
        assert budget["spec"]["selector"] == deploy["spec"]["selector"]


def test_without_the_namespace(helm: Path) -> None:
    objects = render_helm(helm, "--set", "createNamespace=false")
    assert "Namespace" not in {o["kind"] for o in objects}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] == "Deployment"} == {
        "meshlink-system"
    }


def test_more_replicas_roll_spread_and_stop_gently(helm: Path) -> None:
    """With more than one replica: RollingUpdate that never goes below the count, preferred
    (not required) anti-affinity on the node, readiness that flips within 2 s, and a preStop
    sleep inside the grace period; one replica keeps Recreate."""
    one = next(o for o in render_helm(helm, "--set", "replicas=1") if o["kind"] == "Deployment")
    assert one["spec"]["strategy"] == {"type": "Recreate"}
    assert "affinity" not in one["spec"]["template"]["spec"]
    deploy = next(o for o in render_helm(helm, "--set", "replicas=2") if o["kind"] == "Deployment")
    assert_ha_deployment(deploy)
