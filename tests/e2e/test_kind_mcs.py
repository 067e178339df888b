"""The behaviours the upstream MCS conformance suite checks, checked here on the kind
clusters of the session (c1 and c2), in the project's own words and code: CI cannot get the
suite (hack/conformance.sh runs it where a checkout of it exists).

One namespace, `mcsk`, in both clusters, with these Services (all backed by `echo` pods that
answer a TCP connection on port 42 with `pod ip <their IP>`):

- echo:   in c1 and c2, exported from c1 only (tcp/42 + udp/42, ClientIP affinity, traffic
          policy and distribution set, exported labels and annotations);
- split:  tcp/42 in c1, tcp2/4242 -> 42 in c2, exported from both (c1 first);
- clash:  tcp/42 in c1, tcp/43 in c2 (same name), other exported labels in c2;
- mixed:  ClusterIP in c1, headless in c2;
- heads:  headless, a StatefulSet of 2 in c1;
- ext:    ExternalName in c1;
- hidden: in c1, never exported;
- twice:  in c1 and c2, exported from both, then unexported one by one.
Clients are pods in each cluster resolving through CoreDNS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.kindbed import KindCluster, KindTestbed, wait_pod_ready, wait_rollout
from tests.kube import KubeError, wait_until

pytestmark = pytest.mark.timeout(900)

NS = "mcsk"
ZONE = "clusterset.local"
WAIT = 90.0

_ECHO = (
    "exec socat TCP-LISTEN:42,reuseaddr,fork "
    "SYSTEM:'echo \"pod ip $POD_IP\"'"  # the pod's IP, from the downward API
)


def _echo_container(image: str) -> dict[str, Any]:
    return {
        "name": "echo",
        "image": image,
        "command": ["sh", "-c", _ECHO],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"containerPort": 42}],
        "readinessProbe": {"tcpSocket": {"port": 42}, "periodSeconds": 1},
    }


def _service(name: str, ports: list[tuple[str, str, int, int]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"local-only": "label"},
            "annotations": {"local-only": "annotation"},
        },
        "spec": {
            "selector": {"app": spec.pop("app", "echo")},
            "ports": [
                {"name": n, "protocol": proto, "port": port, "targetPort": target}
                for n, proto, port, target in ports
            ],
            **spec,
        },
    }


def _export(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if labels is not None:
        spec = {
            "exportedLabels": labels,
            "exportedAnnotations": {f"a-{k}": v for k, v in labels.items()},
        }
    return {
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def _apply(c: KindCluster, *objects: dict[str, Any]) -> None:
    c.apply("\n---\n".join(json.dumps(o) for o in objects))


TCP42 = ("tcp", "TCP", 42, 42)
UDP42 = ("udp", "UDP", 42, 42)


@dataclass(frozen=True)
class Mcs:
    bed: KindTestbed
    c1: KindCluster
    c2: KindCluster

    @property
    def both(self) -> tuple[KindCluster, KindCluster]:
        return (self.c1, self.c2)

    def sh(self, c: KindCluster, script: str, timeout: float = 60) -> str:
        return c.exec(NS, "client", "sh", "-c", script, timeout=timeout)

    def si(self, c: KindCluster, name: str) -> dict[str, Any] | None:
        return c.find("serviceimport", name, "-n", NS)

    def wait_si(self, c: KindCluster, name: str, check: Any = None) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            si = self.si(c, name)
            return si if si is not None and (check is None or check(si)) else None

        return c.wait_for(ok, WAIT, f"ServiceImport {name}")

    def condition(self, c: KindCluster, name: str, type_: str) -> tuple[str, str]:
        svcex = c.get_json("serviceexport", name, "-n", NS)
        for cond in svcex.get("status", {}).get("conditions", []):
            if cond["type"] == type_:
                return (cond["status"], cond["reason"])
        return ("", "")

    def wait_condition(self, c: KindCluster, name: str, type_: str, status: str) -> str:
        """The condition's reason once its status is `status`."""
        got = c.wait_for(
            lambda: (r := self.condition(c, name, type_))[0] == status and r,
            WAIT,
            f"{type_}={status} on ServiceExport {name}",
        )
        return got[1]

    def mcs_slices(self, c: KindCluster, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = c.get_json(
            "endpointslices", "-n", NS, "-l", f"multicluster.kubernetes.io/service-name={name}"
        )["items"]
        return items

    def pod_ips(self, c: KindCluster, app: str) -> list[str]:
        pods = c.get_json("pods", "-n", NS, "-l", f"app={app}")["items"]
        return sorted(p["status"]["podIP"] for p in pods if p["status"].get("podIP"))

    def answers(self, c: KindCluster, host: str, port: int, n: int) -> list[str]:
        """`n` connections from c's client pod to host:port: what each answered.

        The client sends nothing: with socat's SYSTEM, bytes from the client race the
        child's exit (socat may end the connection on EPIPE before relaying the answer),
        about 1 connection in 70 on a pod's loopback with no meshlink in the way."""
        out = self.sh(
            c,
            f"i=0; while [ $i -lt {n} ]; do nc -w 2 {host} {port} </dev/null 2>&1 "
            '| tr -d "\\r" | grep "^pod ip" || echo none; i=$((i+1)); done',
            timeout=n * 3 + 30,
        )
        return [line.removeprefix("pod ip ").strip() for line in out.splitlines() if line]

    def dig(self, c: KindCluster, qtype: str, name: str) -> list[str]:
        """`dig +short` from c's client pod (through CoreDNS): the answer's records."""
        return [line for line in self.sh(c, f"dig +short {qtype} {name}.").splitlines() if line]


def fqdn(name: str) -> str:
    return f"{name}.{NS}.svc.{ZONE}"


@pytest.fixture(scope="module")
def mcs(kind_testbed: KindTestbed) -> Iterator[Mcs]:
    c1, c2 = kind_testbed.clusters[:2]
    image = kind_testbed.tools_image
    m = Mcs(kind_testbed, c1, c2)
    for c in m.both:
        c.kubectl("create", "namespace", NS)
        _apply(
            c,
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "echo", "namespace": NS},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "echo"}},
                    "template": {
                        "metadata": {"labels": {"app": "echo"}},
                        "spec": {"containers": [_echo_container(image)]},
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "client", "namespace": NS},
                "spec": {
                    "containers": [
                        {"name": "client", "image": image, "command": ["sleep", "infinity"]}
                    ]
                },
            },
        )
    _apply(
        c1,
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "heads", "namespace": NS},
            "spec": {
                "replicas": 2,
                "serviceName": "heads",
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "heads"}},
                "template": {
                    "metadata": {"labels": {"app": "heads"}},
                    "spec": {"containers": [_echo_container(image)]},
                },
            },
        },
    )
    echo_spec = {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
        "internalTrafficPolicy": "Cluster",
        "trafficDistribution": "PreferClose",
    }
    for c in m.both:
        _apply(
            c,
            _service("echo", [TCP42, UDP42], **echo_spec),
            _service("twice", [TCP42]),
        )
    _apply(
        c1,
        _service("split", [TCP42]),
        _service("clash", [TCP42]),
        _service("mixed", [TCP42]),
        _service("heads", [TCP42], app="heads", clusterIP="None"),
        _service("hidden", [TCP42]),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "ext", "namespace": NS},
            "spec": {"type": "ExternalName", "externalName": "example.invalid"},
        },
    )
    _apply(
        c2,
        _service("split", [("tcp2", "TCP", 4242, 42)]),
        _service("clash", [("tcp", "TCP", 43, 42)]),
        _service("mixed", [TCP42], clusterIP="None"),
    )
    # c1 exports first; c2's exports follow once c1's are imported, a second later at least
    # (creationTimestamp has one-second resolution): the oldest export wins a conflict.
    _apply(
        c1,
        _export("echo", {"mcs-test": "exported"}),
        _export("split"),
        _export("clash", {"from": "c1"}),
        _export("mixed"),
        _export("heads"),
        _export("ext"),
        _export("twice"),
    )
    for name in ("echo", "split", "clash", "mixed", "heads", "twice"):
        m.wait_si(c1, name)
    first = max(
        c1.get_json("serviceexport", n, "-n", NS)["metadata"]["creationTimestamp"]
        for n in ("split", "clash", "mixed", "twice")
    )
    c2.wait_for(lambda: _now(c2) > first, 10, "a second later than c1's exports")
    _apply(
        c2, _export("split"), _export("clash", {"from": "c2"}), _export("mixed"), _export("twice")
    )
    for c in m.both:
        wait_rollout(c, NS, "deploy/echo")
        wait_pod_ready(c, NS, "client")
    wait_rollout(c1, NS, "statefulset/heads")
    yield m
    for c in m.both:
        c.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def _now(c: KindCluster) -> str:
    """The API server's clock, as a creationTimestamp (a fresh object's)."""
    name = "clock"
    c.kubectl("-n", NS, "delete", "configmap", name, "--ignore-not-found")
    out = c.kubectl("-n", NS, "create", "configmap", name, "-o", "json").stdout
    stamp: str = json.loads(out)["metadata"]["creationTimestamp"]
    return stamp


# -- export and import ------------------------------------------------------------------------


def test_a_clusterip_export_is_imported_everywhere_with_the_services_properties(mcs: Mcs) -> None:
    for c in mcs.both:
        si = mcs.wait_si(c, "echo", lambda s: len(s["spec"].get("ips") or []) > 0)
        spec = si["spec"]
        assert spec["type"] == "ClusterSetIP"
        assert sorted((p["name"], p["protocol"], p["port"]) for p in spec["ports"]) == [
            ("tcp", "TCP", 42),
            ("udp", "UDP", 42),
        ]
        # One IP per family, in the order of ipFamilies.
        assert len(spec["ips"]) == len(spec["ipFamilies"])
        assert spec["ipFamilies"] == ["IPv4"]
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", spec["ips"][0])
        assert spec["sessionAffinity"] == "ClientIP"
        assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10}}
        assert spec["internalTrafficPolicy"] == "Cluster"
        assert spec["trafficDistribution"] == "PreferClose"
        # Only what the ServiceExport lists reaches the import, never the Service's own.
        assert si["metadata"]["labels"]["mcs-test"] == "exported"
        assert si["metadata"]["annotations"]["a-mcs-test"] == "exported"
        assert "local-only" not in si["metadata"]["labels"]
        assert "local-only" not in si["metadata"].get("annotations", {})
        assert [x["cluster"] for x in si["status"]["clusters"]] == ["c1"]
    assert mcs.wait_condition(mcs.c1, "echo", "Valid", "True") == "Valid"
    assert mcs.wait_condition(mcs.c1, "echo", "Conflict", "False") == "NoConflicts"


def test_a_headless_export_is_imported_without_a_clusterset_ip(mcs: Mcs) -> None:
    for c in mcs.both:
        si = mcs.wait_si(c, "heads", lambda s: s["status"].get("clusters"))
        assert si["spec"]["type"] == "Headless"
        assert not si["spec"].get("ips")
        assert si["spec"]["ipFamilies"]


def test_an_external_name_export_is_invalid_and_never_imported(mcs: Mcs) -> None:
    assert mcs.wait_condition(mcs.c1, "ext", "Valid", "False") == "InvalidServiceType"
    # c1 exported ext with the others, and they are all imported in c2 by now (the fixture
    # waited): an import of ext would have come with them.
    mcs.wait_si(mcs.c2, "twice")
    for c in mcs.both:
        assert mcs.si(c, "ext") is None


# -- conflicts --------------------------------------------------------------------------------


def test_different_port_sets_are_served_as_their_union_and_reported_as_a_conflict(
    mcs: Mcs,
) -> None:
    for c in mcs.both:
        assert "PortConflict" in mcs.wait_condition(c, "split", "Conflict", "True")
    for c in mcs.both:
        si = mcs.wait_si(c, "split", lambda s: len(s["status"].get("clusters", [])) == 2)
        assert sorted((p["name"], p["port"]) for p in si["spec"]["ports"]) == [
            ("tcp", 42),
            ("tcp2", 4242),
        ]


def test_a_port_clash_keeps_the_oldest_export_and_is_reported_on_both(mcs: Mcs) -> None:
    for c in mcs.both:
        reasons = mcs.wait_condition(c, "clash", "Conflict", "True").split(",")
        assert "PortConflict" in reasons
        assert "LabelsConflict" in reasons
    for c in mcs.both:
        si = mcs.wait_si(c, "clash", lambda s: len(s["status"].get("clusters", [])) == 2)
        assert [(p["name"], p["port"]) for p in si["spec"]["ports"]] == [("tcp", 42)]
        assert si["metadata"]["labels"]["from"] == "c1"
        assert si["metadata"]["annotations"]["a-from"] == "c1"


def test_a_headlessness_conflict_keeps_the_oldest_type(mcs: Mcs) -> None:
    for c in mcs.both:
        assert "TypeConflict" in mcs.wait_condition(c, "mixed", "Conflict", "True")
    for c in mcs.both:
        si = mcs.wait_si(c, "mixed")
        assert si["spec"]["type"] == "ClusterSetIP"


# -- EndpointSlices ---------------------------------------------------------------------------


def test_imports_have_mcs_endpoint_slices_managed_by_meshlink(mcs: Mcs) -> None:
    for c in mcs.both:
        slices = c.wait_for(
            lambda c=c: [s for s in mcs.mcs_slices(c, "echo") if s.get("endpoints")],
            WAIT,
            "an MCS EndpointSlice with endpoints for echo",
        )
        for s in slices:
            labels = s["metadata"]["labels"]
            assert labels["multicluster.kubernetes.io/service-name"] == "echo"
            assert labels["multicluster.kubernetes.io/source-cluster"] == "c1"
            assert labels["endpointslice.kubernetes.io/managed-by"] == "meshlink.io"
            assert s["addressType"] == "IPv4"


# -- connectivity -----------------------------------------------------------------------------


def test_an_export_is_reached_by_its_clusterset_name_only_in_the_exporting_cluster(
    mcs: Mcs,
) -> None:
    """echo runs in both clusters but only c1 exports it: every connection, from either
    cluster, lands on c1's pod."""
    (c1_pod,) = mcs.pod_ips(mcs.c1, "echo")
    for c in mcs.both:
        got = wait_until(
            lambda c=c: (a := mcs.answers(c, fqdn("echo"), 42, 1)) == [c1_pod] and a,
            WAIT,
            f"echo reached from {c.name}",
            interval=1,
            ignore=(KubeError,),
        )
        assert got == [c1_pod]
        assert mcs.answers(c, fqdn("echo"), 42, 10) == [c1_pod] * 10


def test_each_port_reaches_only_the_clusters_that_expose_it(mcs: Mcs) -> None:
    (c1_pod,) = mcs.pod_ips(mcs.c1, "echo")
    (c2_pod,) = mcs.pod_ips(mcs.c2, "echo")
    for c in mcs.both:
        for port, pod in ((42, c1_pod), (4242, c2_pod)):
            wait_until(
                lambda c=c, port=port, pod=pod: mcs.answers(c, fqdn("split"), port, 1) == [pod],
                WAIT,
                f"split:{port} reached from {c.name}",
                interval=1,
                ignore=(KubeError,),
            )
            assert mcs.answers(c, fqdn("split"), port, 6) == [pod] * 6


def test_a_service_that_is_not_exported_has_no_clusterset_name(mcs: Mcs) -> None:
    mcs.wait_si(mcs.c2, "twice")  # the exports made with hidden's Service are in
    for c in mcs.both:
        assert mcs.si(c, "hidden") is None
        status = mcs.sh(c, f"dig +noall +comments A {fqdn('hidden')}.")
        assert "status: NXDOMAIN" in status, status
        assert mcs.answers(c, fqdn("hidden"), 42, 3) == ["none"] * 3


# -- DNS --------------------------------------------------------------------------------------


def test_the_clusterset_name_resolves_to_the_clusterset_ip_and_srv_per_port(mcs: Mcs) -> None:
    for c in mcs.both:
        si = mcs.wait_si(c, "echo", lambda s: s["spec"].get("ips"))
        wait_until(
            lambda c=c, ip=si["spec"]["ips"]: mcs.dig(c, "A", fqdn("echo")) == ip,
            WAIT,
            f"A {fqdn('echo')} in {c.name}",
            interval=1,
            ignore=(KubeError,),
        )
        # tcp/42 and udp/42 are one port number: one SRV record, aimed at the service name.
        srv = mcs.dig(c, "SRV", fqdn("echo"))
        assert len(srv) == 1, srv
        _prio, _weight, port, target = srv[0].split()
        assert (port, target) == ("42", fqdn("echo") + ".")
        named = mcs.dig(c, "SRV", f"_tcp._tcp.{fqdn('echo')}")
        assert [r.split()[2:] for r in named] == [["42", fqdn("echo") + "."]]


def test_cluster_local_names_keep_resolving_to_the_local_service(mcs: Mcs) -> None:
    for c in mcs.both:
        local = c.get_json("service", "echo", "-n", NS)["spec"]["clusterIP"]
        assert mcs.dig(c, "A", f"echo.{NS}.svc.cluster.local") == [local]


def test_a_headless_name_resolves_to_every_ready_endpoint_and_each_by_hostname(
    mcs: Mcs,
) -> None:
    pods = mcs.pod_ips(mcs.c1, "heads")
    assert len(pods) == 2
    for c in mcs.both:
        wait_until(
            lambda c=c: sorted(mcs.dig(c, "A", fqdn("heads"))) == pods,
            WAIT,
            f"A {fqdn('heads')} in {c.name}",
            interval=1,
            ignore=(KubeError,),
        )
        (eps,) = [s for s in mcs.mcs_slices(c, "heads") if s.get("endpoints")]
        cluster = eps["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
        assert cluster == "c1"
        hosts = {e["hostname"]: e["addresses"] for e in eps["endpoints"]}
        assert sorted(hosts) == ["heads-0", "heads-1"]
        assert all(e["conditions"]["ready"] for e in eps["endpoints"])
        for host, addresses in hosts.items():
            assert mcs.dig(c, "A", f"{host}.{cluster}.{fqdn('heads')}") == addresses
        # <clusterid>.<svc>... never resolves to an address. (It is an empty non-terminal,
        # names exist below it, so NOERROR with no answer: RFC 8020 keeps NXDOMAIN for a
        # name with nothing under it.)
        assert mcs.dig(c, "A", f"{cluster}.{fqdn('heads')}") == []
        srv = sorted(r.split()[2:] for r in mcs.dig(c, "SRV", fqdn("heads")))
        assert srv == [["42", f"{h}.{cluster}.{fqdn('heads')}."] for h in sorted(hosts)]


# -- lifecycle (last: it unexports) -----------------------------------------------------------


def test_an_import_lives_while_one_cluster_exports_it(mcs: Mcs) -> None:
    for c in mcs.both:
        mcs.wait_si(c, "twice", lambda s: len(s["status"].get("clusters", [])) == 2)
    mcs.c1.kubectl("delete", "serviceexport", "twice", "-n", NS)
    for c in mcs.both:
        si = mcs.wait_si(
            c, "twice", lambda s: [x["cluster"] for x in s["status"]["clusters"]] == ["c2"]
        )
        assert si["spec"]["type"] == "ClusterSetIP"
        # c1's slices go; c2's stay.
        c.wait_for(
            lambda c=c: (
                {
                    s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]
                    for s in mcs.mcs_slices(c, "twice")
                }
                == {"c2"}
            ),
            WAIT,
            "only c2's slices of twice",
        )
    mcs.c2.kubectl("delete", "serviceexport", "twice", "-n", NS)
    for c in mcs.both:
        c.wait_for(lambda c=c: mcs.si(c, "twice") is None, WAIT, "twice no longer imported")
        c.wait_for(lambda c=c: not mcs.mcs_slices(c, "twice"), WAIT, "no slice of twice")
