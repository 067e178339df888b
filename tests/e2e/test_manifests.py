"""manifests/ renders, applies to a real API server (server-side apply), and means what it says:
CRD versions, least-privilege RBAC, the admission policy, and a restricted-compliant pod."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlink.config import load
from tests.kube import (
    MCS_CRDS,
    REPO,
    KubeBinaries,
    KubeCluster,
    KubectlError,
    assert_ha_deployment,
    service_export_v1alpha1,
    wait_crds_established,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

MANIFESTS = REPO / "manifests"
SA = "system:serviceaccount:meshlink-system:meshlink"


def _render(kubectl: Path) -> list[dict[str, Any]]:
    import subprocess

    out = subprocess.run(
        [str(kubectl), "kustomize", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def rendered(kube_bin: KubeBinaries) -> list[dict[str, Any]]:
    return _render(kube_bin.kubectl)


@pytest.fixture
def applied(kube_cluster: KubeCluster) -> KubeCluster:
    c = kube_cluster
    c.kubectl("apply", "--server-side", "--field-manager=meshlink-tests", "-k", str(MANIFESTS))
    wait_crds_established(c)
    return c


def test_kustomization_renders(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted({d["kind"] for d in rendered})
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
    crds = {d["metadata"]["name"] for d in rendered if d["kind"] == "CustomResourceDefinition"}
    assert crds == set(MCS_CRDS)
    for d in rendered:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshlink"
        if d["kind"] in {
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount",
        }:
            assert d["metadata"]["namespace"] == "meshlink-system", d["metadata"]["name"]

    dep = _one(rendered, "Deployment", "meshlink")
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    assert ctr["image"] == "ghcr.io/meshlink/meshlink:0.1.0"
    assert ctr["args"][0] == "run"
    assert "--components=gateway,controller,dns,ops,grant" in ctr["args"]
    assert pod["serviceAccountName"] == "meshlink"
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = ctr["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_two_replicas_spread_rolled_and_stopped_gently(rendered: list[dict[str, Any]]) -> None:
    """High availability (issue 12): two replicas on different nodes where there are two
    (preferred, so a one-node cluster still runs both), a rolling update that never goes
    below two Ready pods, a PodDisruptionBudget keeping one through drains, readiness that
    flips within about 2 s, and a stop that leaves the endpoints before SIGTERM."""
    dep = _one(rendered, "Deployment", "meshlink")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert_ha_deployment(dep)
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (ctr,) = spec["template"]["spec"]["containers"]
    probe = ctr["readinessProbe"]
    assert probe["timeoutSeconds"] <= probe["periodSeconds"]

    pdb = _one(rendered, "PodDisruptionBudget", "meshlink")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < spec["replicas"]  # a drain can always proceed
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]


def _config_map(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    """The generated ConfigMap (kustomize adds a hash suffix to its name)."""
    (cm,) = [d for d in rendered if d["metadata"]["name"].startswith("meshlink-config-")]
    return cm


def test_site_config_matches_the_pod_and_services(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The shipped config, with the site.yaml an overlay adds, loads with meshlink's own
    loader the way the pod mounts it, and its ports are the ones the container, the probes
    and the Services use."""
    cm = _config_map(rendered)
    assert set(cm["data"]) == {"config.yaml"}
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    (tmp_path / "site.yaml").write_text("site: c1\ngateway: {advertise: [192.0.2.1:30443]}\n")
    cfg = load(tmp_path)
    assert cfg.site == "c1"
    assert cfg.kubernetes is not None
    assert cfg.kubernetes.namespace == "meshlink-system"
    assert cfg.kubernetes.kubeconfig is None  # in-cluster service account
    assert cfg.kubernetes.state == "secrets"  # shared by the replicas, no volume
    assert cfg.kubernetes.leader_election  # one writer among the replicas
    assert str(cfg.state_dir) == "/var/lib/meshlink"

    dep = _one(rendered, "Deployment", "meshlink")
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in ctr["ports"]}
    assert ports["tunnel"] == (cfg.gateway_listen.port, "TCP")
    assert ports["grant"] == (cfg.grant_listen.port, "TCP")
    assert ports["ops"] == (cfg.ops_listen.port, "TCP")
    assert ports["dns-udp"] == (cfg.dns.listen.port, "UDP")
    assert ports["dns-tcp"] == (cfg.dns.listen.port, "TCP")
    assert ctr["readinessProbe"]["httpGet"]["port"] == "ops"
    # The controller finds the gateway pods (its EndpointSlices' endpoints) by this selector.
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dict(cfg.kubernetes.gateway_selector).items() <= pod_labels.items()
    mounts = {m["mountPath"] for m in ctr["volumeMounts"]}
    assert {"/etc/meshlink", str(cfg.state_dir), "/tmp"} <= mounts

    dns = _one(rendered, "Service", "meshlink-dns")
    assert sorted((p["port"], p["protocol"], p["targetPort"]) for p in dns["spec"]["ports"]) == [
        (53, "TCP", "dns-tcp"),
        (53, "UDP", "dns-udp"),
    ]
    gw = _one(rendered, "Service", "meshlink-gateway")
    assert {p["targetPort"] for p in gw["spec"]["ports"]} == {"tunnel", "grant"}
    for svc in (dns, gw):
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_container_args_are_a_valid_meshlink_command_line(rendered: list[dict[str, Any]]) -> None:
    """The Deployment's args parse with meshlink's own CLI and name known components, and
    MESHLINK_CONFIG (read by `run` and by every command run through kubectl exec) is the
    mounted ConfigMap's directory."""
    from meshlink.cli import build_parser
    from meshlink.runtime import ALL_COMPONENTS

    dep = _one(rendered, "Deployment", "meshlink")
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(ctr["args"])
    assert args.fn.__name__ == "cmd_run"
    comps = set(args.components.split(","))
    assert {"gateway", "controller", "dns"} <= comps <= ALL_COMPONENTS
    assert not any(a.startswith("--config") for a in ctr["args"])
    env = {e["name"]: e["value"] for e in ctr["env"]}
    mount = next(m for m in ctr["volumeMounts"] if m["name"] == "config")
    assert env["MESHLINK_CONFIG"] == mount["mountPath"]
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == _config_map(rendered)["metadata"]["name"]


def test_applies_server_side_and_objects_exist(
    applied: KubeCluster, rendered: list[dict[str, Any]]
) -> None:
    c = applied
    for d in rendered:
        ns = d["metadata"].get("namespace")
        args = [d["kind"].lower(), d["metadata"]["name"]] + (["-n", ns] if ns else [])
        if d["kind"].startswith("ValidatingAdmissionPolicy"):
            args[0] = f"{d['kind'].lower()}.admissionregistration.k8s.io"
        assert c.exists(*args), f"{d['kind']}/{d['metadata']['name']} missing after apply"
        live = c.get_json(*args, "--show-managed-fields")
        managers = {m["manager"] for m in live["metadata"]["managedFields"]}
        assert "meshlink-tests" in managers, (d["kind"], managers)

    # Applying again is a no-op, not a conflict.
    c.kubectl("apply", "--server-side", "--field-manager=meshlink-tests", "-k", str(MANIFESTS))

    for name in MCS_CRDS:
        crd = c.get_json("crd", name)
        versions = {v["name"]: (v["served"], v["storage"]) for v in crd["spec"]["versions"]}
        assert versions == {"v1alpha1": (True, False), "v1beta1": (True, True)}, name
        assert crd["status"]["storedVersions"] == ["v1beta1"], name
        established = [x for x in crd["status"]["conditions"] if x["type"] == "Established"]
        assert established[0]["status"] == "True", name
        if name.endswith("multicluster.x-k8s.io"):
            assert crd["spec"]["versions"][1]["subresources"] == {"status": {}}

    # Short names work.
    c.kubectl("get", "svcex", "-A")
    c.kubectl("get", "svcim", "-A")


def test_v1alpha1_export_reads_back_as_v1beta1(applied: KubeCluster) -> None:
    c = applied
    c.kubectl("create", "namespace", "demo")
    c.apply(service_export_v1alpha1("demo", "web", {"exportedLabels": {"tier": "front"}}))
    beta = c.get_json("serviceexports.v1beta1.multicluster.x-k8s.io", "web", "-n", "demo")
    assert beta["apiVersion"] == "multicluster.x-k8s.io/v1beta1"
    assert beta["spec"]["exportedLabels"] == {"tier": "front"}
    alpha = c.get_json("serviceexports.v1alpha1.multicluster.x-k8s.io", "web", "-n", "demo")
    assert alpha["apiVersion"] == "multicluster.x-k8s.io/v1alpha1"
    assert alpha["metadata"]["uid"] == beta["metadata"]["uid"]

    # The status subresource takes conditions (reasons may be comma-joined, as the KEP's are).
    cond = {
        "type": "Conflict",
        "status": "True",
        "reason": "PortConflict,TypeConflict",
        "message": "demo",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    c.kubectl(
        "patch",
        "svcex",
        "web",
        "-n",
        "demo",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"conditions": [cond]}}),
    )
    got = c.get_json("svcex", "web", "-n", "demo")["status"]["conditions"]
    assert [(x["type"], x["reason"]) for x in got] == [("Conflict", "PortConflict,TypeConflict")]

    # A ServiceImport with three IPs is refused by the schema (one per family, at most two).
    with pytest.raises(KubectlError, match="ips"):
        c.apply(
            json.dumps(
                {
                    "apiVersion": "multicluster.x-k8s.io/v1beta1",
                    "kind": "ServiceImport",
                    "metadata": {"name": "web", "namespace": "demo"},
                    "spec": {
                        "type": "ClusterSetIP",
                        "ports": [{"port": 80, "protocol": "TCP"}],
                        "ips": ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                    },
                }
            )
        )


def _can(c: KubeCluster, who: str, *args: str) -> bool:
    proc = c.kubectl("auth", "can-i", *args, f"--as={who}", check=False)
    answer = proc.stdout.strip()
    assert answer in {"yes", "no"}, f"can-i {args}: {proc.stdout!r} {proc.stderr!r}"
    return answer == "yes"


def test_rbac_is_least_privilege(applied: KubeCluster) -> None:
    c = applied
    allowed = [
        ("list", "services", "-A"),
        ("watch", "endpointslices.discovery.k8s.io", "-A"),
        ("list", "namespaces"),
        ("watch", "namespaces"),
        ("get", "clusterproperties.about.k8s.io"),
        ("watch", "serviceexports.multicluster.x-k8s.io", "-A"),
        ("create", "serviceexports.multicluster.x-k8s.io", "-n", "demo"),
        ("delete", "serviceexports.multicluster.x-k8s.io", "-n", "demo"),
        ("patch", "serviceexports.multicluster.x-k8s.io", "--subresource=status", "-n", "d"),
        ("create", "serviceimports.multicluster.x-k8s.io", "-n", "demo"),
        ("patch", "serviceimports.multicluster.x-k8s.io", "-n", "demo"),
        ("patch", "serviceimports.multicluster.x-k8s.io", "--subresource=status", "-n", "d"),
        ("delete", "serviceimports.multicluster.x-k8s.io", "-n", "demo"),
        ("create", "services", "-n", "demo"),
        ("patch", "services", "-n", "demo"),
        ("delete", "services", "-n", "demo"),
        ("create", "endpointslices.discovery.k8s.io", "-n", "demo"),
        ("delete", "endpointslices.discovery.k8s.io", "-n", "demo"),
        ("create", "events", "-n", "demo"),
        ("create", "events.events.k8s.io", "-n", "demo"),
        ("list", "pods", "-n", "meshlink-system"),
        ("watch", "pods", "-n", "meshlink-system"),
        *(
            (verb, f"secrets/meshlink-{doc}", "-n", "meshlink-system")
            for verb in ("get", "update")
            for doc in ("pki", "tokens", "peers", "links")
        ),
        ("create", "secrets", "-n", "meshlink-system"),
        ("get", "leases.coordination.k8s.io/meshlink-leader", "-n", "meshlink-system"),
        ("update", "leases.coordination.k8s.io/meshlink-leader", "-n", "meshlink-system"),
        ("create", "leases.coordination.k8s.io", "-n", "meshlink-system"),
    ]
    denied = [
        ("delete", "namespaces"),
        ("create", "namespaces"),
        ("patch", "namespaces"),
        ("get", "secrets", "-n", "meshlink-system"),
        ("get", "secrets/other", "-n", "meshlink-system"),
        ("update", "secrets/other", "-n", "meshlink-system"),
        ("list", "secrets", "-n", "meshlink-system"),
        ("watch", "secrets", "-n", "meshlink-system"),
        ("delete", "secrets/meshlink-pki", "-n", "meshlink-system"),
        ("get", "secrets/meshlink-pki", "-n", "kube-system"),
        ("create", "secrets", "-n", "kube-system"),
        ("list", "secrets", "-A"),
        ("get", "leases.coordination.k8s.io/other", "-n", "meshlink-system"),
        ("update", "leases.coordination.k8s.io/other", "-n", "meshlink-system"),
        ("list", "leases.coordination.k8s.io", "-n", "meshlink-system"),
        ("create", "leases.coordination.k8s.io", "-n", "kube-system"),
        ("get", "configmaps", "-n", "kube-system"),
        ("create", "pods", "-n", "demo"),
        ("list", "pods", "-A"),
        ("list", "pods", "-n", "demo"),
        ("delete", "pods", "-n", "meshlink-system"),
        ("create", "clusterrolebindings"),
        ("create", "clusterproperties.about.k8s.io"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("patch", "services", "--subresource=status", "-n", "demo"),
        ("create", "serviceaccounts/token", "-n", "meshlink-system"),
        ("impersonate", "users"),
    ]
    assert [a for a in allowed if not _can(c, SA, *a)] == []
    assert [d for d in denied if _can(c, SA, *d)] == []


def test_users_may_export_but_never_write_imports(applied: KubeCluster) -> None:
    """The aggregated roles (bound directly here: no controller-manager aggregates them)."""
    c = applied
    c.kubectl("create", "namespace", "team")
    for role in ("meshlink-mcs-view", "meshlink-mcs-export"):
        c.kubectl(
            "create", "rolebinding", f"alice-{role}", f"--clusterrole={role}", "--user=alice",
            "-n", "team",
        )  # fmt: skip
    assert _can(c, "alice", "create", "serviceexports.multicluster.x-k8s.io", "-n", "team")
    assert _can(c, "alice", "list", "serviceimports.multicluster.x-k8s.io", "-n", "team")
    for verb in ("create", "patch", "update", "delete"):
        assert not _can(c, "alice", verb, "serviceimports.multicluster.x-k8s.io", "-n", "team")
    assert not _can(
        c, "alice", "patch", "serviceexports.multicluster.x-k8s.io", "--subresource=status",
        "-n", "team",
    )  # fmt: skip
    assert not _can(c, "alice", "create", "serviceexports.multicluster.x-k8s.io", "-n", "other")


def _service(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
        }
    )


def _slice(name: str, managed_by: str) -> str:
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "demo",
                "labels": {
                    "kubernetes.io/service-name": "derived-abc",
                    "endpointslice.kubernetes.io/managed-by": managed_by,
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.2.3"]}],
            "ports": [{"port": 80, "protocol": "TCP"}],
        }
    )


def test_admission_policy_confines_meshlink_to_its_imports(applied: KubeCluster) -> None:
    c = applied
    c.kubectl("create", "namespace", "demo")
    c.apply(_service("web"))  # a user's own Service, written by the admin

    def as_meshlink(*args: str, input: str | None = None) -> str:
        proc = c.kubectl(*args, f"--as={SA}", input=input, check=False)
        return "ok" if proc.returncode == 0 else proc.stderr

    # The policy is enforced once the API server has loaded it: wait for the first denial.
    denial = wait_until(
        lambda: (lambda r: r if "derived-*" in r else None)(
            as_meshlink("apply", "--server-side", "-f", "-", input=_service("web2"))
        ),
        30,
        "the admission policy to deny meshlink a non-derived Service",
    )
    assert "meshlink may only write derived-* Services" in denial
    assert "derived-*" in as_meshlink("delete", "service", "web", "-n", "demo")
    assert as_meshlink("apply", "--server-side", "-f", "-", input=_service("derived-abc")) == "ok"
    assert as_meshlink("delete", "service", "derived-abc", "-n", "demo") == "ok"

    refused = as_meshlink("apply", "--server-side", "-f", "-", input=_slice("s1", "someone"))
    assert "managed by meshlink.io" in refused
    assert (
        as_meshlink("apply", "--server-side", "-f", "-", input=_slice("s2", "meshlink.io")) == "ok"
    )
    # Secrets: only the four of its state.
    assert "its own state" in as_meshlink(
        "create", "secret", "generic", "other", "-n", "meshlink-system", "--from-literal=a=b"
    )
    assert (
        as_meshlink(
            "create", "secret", "generic", "meshlink-links", "-n", "meshlink-system",
            "--from-literal=a=b",
        )
        == "ok"
    )  # fmt: skip
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "other", "namespace": "meshlink-system"},
        "spec": {},
    }
    refused = as_meshlink("create", "-f", "-", input=json.dumps(lease))
    assert "the Lease meshlink-leader" in refused
    lease["metadata"]["name"] = "meshlink-leader"
    assert as_meshlink("create", "-f", "-", input=json.dumps(lease)) == "ok"
    # Other subjects are untouched by the policy.
    c.apply(_service("web3"))
    assert c.exists("service", "web3", "-n", "demo")


def test_pod_template_passes_restricted_pod_security(
    applied: KubeCluster, rendered: list[dict[str, Any]]
) -> None:
    """meshlink-system enforces Pod Security "restricted"; a pod built from the Deployment's
    template is admitted (server-side dry run), a privileged variant is refused."""
    c = applied
    dep = _one(rendered, "Deployment", "meshlink")
    tmpl = dep["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "meshlink-probe", "namespace": "meshlink-system", **tmpl["metadata"]},
        "spec": tmpl["spec"],
    }
    c.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    with pytest.raises(KubectlError, match="restricted"):
        c.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(bad))
