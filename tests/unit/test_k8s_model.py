"""Pure helpers of the Kubernetes controller: names, conditions, records, import bodies."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from meshlink.catalog.merge import merge
from meshlink.catalog.records import Endpoint, ExportRecord, Port, ServiceKey, ServiceType
from meshlink.k8s import model
from meshlink.k8s.clusterset import ClustersetCatalog
from meshlink.k8s.model import Condition
from meshlink.k8s.workqueue import WorkQueue

# Computed with the reference Go code (sha256 + base32.HexEncoding, no padding, lowercase).
GO_DERIVED = {
    ("default", "web"): "derived-gapqrqeg1j",
    ("t-basic", "web"): "derived-ghbb7g3dqk",
    ("demo", "nginx"): "derived-kaa23d902o",
}


@pytest.mark.parametrize(("key", "want"), GO_DERIVED.items())
def test_derived_name_matches_the_reference_controller(key: tuple[str, str], want: str) -> None:
    assert model.derived_name(*key) == want


def svcex(
    ns: str = "demo", name: str = "web", spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "generation": 3,
        },
        "spec": spec or {},
    }


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "clusterIP": "10.0.0.5",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http"}],
        "ipFamilies": ["IPv4"],
    }
    base.update(spec)
    return {
        "metadata": {"name": "web", "namespace": "demo", "labels": {"secret": "x"}},
        "spec": base,
    }


def slice_(*eps: tuple[str, bool, str], uid_prefix: str = "p") -> dict[str, Any]:
    return {
        "endpoints": [
            {
                "addresses": [a],
                "conditions": {"ready": ready},
                "hostname": host,
                "targetRef": {"uid": f"{uid_prefix}{i}"},
            }
            for i, (a, ready, host) in enumerate(eps)
        ]
    }


def test_record_from_service_and_slices() -> None:
    ev = model.evaluate_export(
        svcex(spec={"exportedLabels": {"tier": "web"}, "exportedAnnotations": {"a": "b"}}),
        service(
            sessionAffinity="ClientIP",
            internalTrafficPolicy="Local",
            trafficDistribution="PreferClose",
        ),
        [slice_(("10.1.0.1", True, ""), ("10.1.0.2", False, ""), ("10.1.0.3", True, ""))],
        origin="c1",
    )
    assert ev.valid == Condition("Valid", "True", "Valid", "")
    r = ev.record
    assert r is not None
    assert r.type == ServiceType.CLUSTERSET_IP
    assert r.ports == (Port(80, "TCP", "http", "http"),)
    assert r.ready_endpoints == 2
    assert r.endpoints == ()  # ClusterSetIP: addresses are not replicated
    assert r.created == 1767323045.0
    assert r.labels == (("tier", "web"),)  # from the ServiceExport spec, never the Service
    assert r.annotations == (("a", "b"),)
    assert r.session_affinity == "ClientIP"
    assert r.session_affinity_timeout == 10800
    assert r.internal_traffic_policy == "Local"
    assert r.traffic_distribution == "PreferClose"


def test_headless_record_carries_ready_endpoints_merged_across_families() -> None:
    v4 = slice_(("10.1.0.1", True, "db-0"), ("10.1.0.2", False, "db-1"))
    v6 = {
        "endpoints": [
            {"addresses": ["fd00::1"], "hostname": "db-0", "targetRef": {"uid": "p0"}},
        ]
    }
    ev = model.evaluate_export(
        svcex(), service(clusterIP="None", ipFamilies=["IPv4", "IPv6"]), [v4, v6], origin="c1"
    )
    r = ev.record
    assert r is not None
    assert r.type == ServiceType.HEADLESS
    assert r.ready_endpoints == 1
    assert r.endpoints == (Endpoint(("10.1.0.1", "fd00::1"), "db-0"),)
    assert r.ip_families == ("IPv4", "IPv6")


@pytest.mark.parametrize(
    ("ns", "svc", "reason"),
    [
        ("demo", None, "NoService"),
        ("demo", service(type="ExternalName", externalName="example.com"), "InvalidServiceType"),
        ("kube-system", service(), "NamespaceNotAllowed"),
    ],
)
def test_refusals(ns: str, svc: dict[str, Any] | None, reason: str) -> None:
    ev = model.evaluate_export(svcex(ns=ns), svc, [], origin="c1")
    assert ev.record is None
    assert (ev.valid.status, ev.valid.reason) == ("False", reason)
    conds = model.export_conditions(ev, False, None)
    assert [(c.type, c.status) for c in conds] == [
        ("Valid", "False"),
        ("Ready", "False"),
        ("Conflict", "False"),
    ]


def test_kube_system_allowed_when_configured() -> None:
    ev = model.evaluate_export(
        svcex(ns="kube-system"), service(), [], origin="c1", export_kube_system=True
    )
    assert ev.record is not None


def test_condition_transition_time_moves_only_with_status() -> None:
    desired = [Condition("Ready", "False", "Pending", "waiting")]
    first = model.next_conditions([], desired, 1, "T1")
    assert first is not None
    assert first[0]["lastTransitionTime"] == "T1"
    assert model.next_conditions(first, desired, 1, "T2") is None  # nothing changed
    reason_only = model.next_conditions(
        first, [Condition("Ready", "False", "Failed", "x")], 1, "T3"
    )
    assert reason_only is not None
    assert reason_only[0]["lastTransitionTime"] == "T1"
    flipped = model.next_conditions(first, [Condition("Ready", "True", "Exported")], 2, "T4")
    assert flipped is not None
    assert flipped[0]["lastTransitionTime"] == "T4"
    assert flipped[0]["observedGeneration"] == 2


def test_foreign_conditions_are_kept() -> None:
    other = {
        "type": "Audited",
        "status": "True",
        "reason": "Yes",
        "message": "",
        "lastTransitionTime": "T0",
    }
    out = model.next_conditions([other], [Condition("Valid", "True", "Valid")], 1, "T1")
    assert out is not None
    assert other in out


def _events(before: list[Condition], after: list[Condition]) -> list[tuple[str, str]]:
    current = model.next_conditions([], before, 1, "T0") or [] if before else []
    return [(e.type, e.reason) for e in model.condition_events(current, after)]


def test_condition_events_say_what_changed_and_nothing_else() -> None:
    valid = Condition("Valid", "True", "Valid")
    exported = Condition("Ready", "True", "Exported")
    pending = Condition("Ready", "False", "Pending", "waiting for the clusterset")
    calm = Condition("Conflict", "False", "NoConflicts")
    clash = Condition("Conflict", "True", "PortConflict", "ports differ from c1's")
    # A new export: pending says nothing, being exported does.
    assert _events([], [valid, pending, calm]) == []
    assert _events([valid, pending, calm], [valid, exported, calm]) == [("Normal", "Exported")]
    # Steady state: silence.
    assert _events([valid, exported, calm], [valid, exported, calm]) == []
    # A conflict starts (Warning) and ends (Normal).
    assert _events([valid, exported, calm], [valid, exported, clash]) == [
        ("Warning", "PortConflict")
    ]
    assert _events([valid, exported, clash], [valid, exported, calm]) == [("Normal", "NoConflicts")]
    # Invalid, then fixed.
    invalid = Condition("Valid", "False", "InvalidServiceType", "ExternalName")
    failed = Condition("Ready", "False", "Failed", "not exported")
    assert _events([valid, exported, calm], [invalid, failed, calm]) == [
        ("Warning", "InvalidServiceType"),
        ("Warning", "Failed"),
    ]
    assert _events([invalid, failed, calm], [valid, exported, calm]) == [
        ("Normal", "Valid"),
        ("Normal", "Exported"),
    ]


def test_event_body_is_an_events_k8s_io_event_about_the_object() -> None:
    svcex = {
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceExport",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "7"},
    }
    spec = model.EventSpec("Warning", "PortConflict", "x" * 2000)
    body = model.event_body(
        spec, svcex, controller="meshlink.io/controller", instance="m-c1", epoch=1_700_000_000.25
    )
    assert body["apiVersion"] == "events.k8s.io/v1"
    assert body["metadata"]["namespace"] == "shop"
    assert body["metadata"]["name"].startswith("web.")
    assert body["eventTime"] == "2023-11-14T22:13:20.250000Z"
    assert body["regarding"] == {
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceExport",
        "name": "web",
        "namespace": "shop",
        "uid": "u-1",
        "resourceVersion": "7",
    }
    assert (body["type"], body["reason"], len(body["note"])) == ("Warning", "PortConflict", 1024)


def rec(origin: str, created: float, **kw: Any) -> ExportRecord:
    base: dict[str, Any] = {
        "origin": origin,
        "namespace": "demo",
        "name": "web",
        "type": ServiceType.CLUSTERSET_IP,
        "ports": (Port(80, "TCP", "http"),),
        "created": created,
        "version": 1,
        "ready_endpoints": 1,
    }
    base.update(kw)
    return ExportRecord(**base)


def test_conflict_condition_on_every_participant() -> None:
    merged = merge([rec("c1", 1.0), rec("c2", 2.0, ports=(Port(8080, "TCP", "http"),))])
    ev = model.ExportEvaluation(rec("c2", 2.0), Condition("Valid", "True", "Valid"))
    conds = {c.type: c for c in model.export_conditions(ev, True, merged)}
    assert conds["Conflict"].status == "True"
    assert conds["Conflict"].reason == "PortConflict"
    assert conds["Ready"].reason == "Exported"


def test_import_bodies() -> None:
    merged = merge(
        [
            rec(
                "c1",
                1.0,
                labels=(("tier", "web"),),
                ports=(Port(80, "TCP", "http"), Port(53, "UDP")),
            ),
            rec("c2", 2.0, ports=(Port(80, "TCP", "http"),), ready_endpoints=0),
        ]
    )
    targets = {("TCP", 80): 20123}  # the gateway port allocated to 80/TCP
    derived = model.derived_service_body(merged, targets)
    assert derived["metadata"]["name"] == model.derived_name("demo", "web")
    # No selector: meshlink's EndpointSlices alone back it (the cluster's EndpointSlice
    # controller would publish the gateway pods as ready whatever the source cluster says).
    assert "selector" not in derived["spec"]
    # Every port of a multi-port Service needs a name; slices use the same names. The
    # TCP port targets its gateway port; UDP is not tunnelled and keeps its own.
    assert [(p["name"], p["port"], p["targetPort"]) for p in derived["spec"]["ports"]] == [
        ("http", 80, 20123),
        ("udp-53", 53, 53),
    ]
    si = model.service_import_body(merged, ["10.0.0.9"], ["IPv4"])
    assert si["spec"]["ips"] == ["10.0.0.9"]
    assert si["spec"]["ipFamilies"] == ["IPv4"]
    assert si["metadata"]["labels"]["tier"] == "web"
    assert si["metadata"]["annotations"][model.DERIVED_ANNOTATION] == derived["metadata"]["name"]
    slices = model.endpoint_slice_bodies(merged, [("10.244.0.5", True)], targets)
    by_cluster = {s["metadata"]["labels"][model.MCS_SOURCE_CLUSTER]: s for s in slices}
    assert sorted(by_cluster) == ["c1", "c2"]
    # A slice port is the endpoint's port: the gateway pod's port for this import.
    assert [(p["name"], p["port"]) for p in by_cluster["c1"]["ports"]] == [
        ("http", 20123),
        ("udp-53", 53),
    ]
    assert [p["port"] for p in by_cluster["c2"]["ports"]] == [20123]
    assert by_cluster["c1"]["endpoints"] == [
        {"addresses": ["10.244.0.5"], "conditions": {"ready": True}}
    ]
    # c2 has no ready endpoint, but c1 has: the gateway endpoint (the same address and port
    # in both slices, which kube-proxy deduplicates) is ready in both, and the gateway
    # sends each connection to c1.
    assert by_cluster["c2"]["endpoints"] == by_cluster["c1"]["endpoints"]
    # No source cluster with a ready endpoint: not ready anywhere.
    down = merge([rec("c1", 1.0, ready_endpoints=0), rec("c2", 2.0, ready_endpoints=0)])
    assert {
        e["conditions"]["ready"]
        for s in model.endpoint_slice_bodies(down, [("10.244.0.5", True)], targets)
        for e in s["endpoints"]
    } == {False}
    # A gateway pod that is not ready is not, whatever the clusters say.
    assert {
        e["conditions"]["ready"]
        for s in model.endpoint_slice_bodies(merged, [("10.244.0.5", False)], targets)
        for e in s["endpoints"]
    } == {False}
    # Same input, same hash; a change moves it.
    again = model.service_import_body(merged, ["10.0.0.9"], ["IPv4"])
    assert (
        again["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
        == si["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
    )
    other = model.service_import_body(merged, ["10.0.0.10"], ["IPv4"])
    assert (
        other["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
        != si["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
    )


def test_service_import_status_is_none_when_current() -> None:
    merged = merge([rec("c1", 1.0)])
    ready = model.import_ready(merged, ["10.0.0.9"])
    status = model.service_import_status(merged, ready, None, 1, "T1")
    assert status is not None
    assert status["status"]["clusters"] == [{"cluster": "c1"}]
    assert model.service_import_status(merged, ready, {"status": status["status"]}, 1, "T2") is None


def test_gateway_endpoints() -> None:
    pods = [
        {
            "metadata": {},
            "status": {
                "podIPs": [{"ip": "10.244.0.5"}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
        {"metadata": {}, "status": {"podIP": "10.244.0.6"}},
        {"metadata": {"deletionTimestamp": "x"}, "status": {"podIP": "10.244.0.7"}},
        {"metadata": {}, "status": {}},
    ]
    assert model.gateway_endpoints_of(pods) == (("10.244.0.5", True), ("10.244.0.6", False))


async def test_workqueue_coalesces_and_never_runs_a_key_twice_at_once() -> None:
    running: set[str] = set()
    seen: list[str] = []
    overlap = False
    gate = asyncio.Event()

    async def process(key: str) -> None:
        nonlocal overlap
        overlap |= key in running
        running.add(key)
        seen.append(key)
        await gate.wait()
        running.discard(key)

    q: WorkQueue[str] = WorkQueue("t", process, workers=4)
    task = asyncio.create_task(q.run())
    try:
        for _ in range(5):
            q.add("a")
        q.add("b")
        await asyncio.sleep(0.01)
        q.add("a")  # dirtied while running: runs once more afterwards
        q.add("a")
        gate.set()
        await asyncio.wait_for(q.wait_idle(), 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not overlap
    assert sorted(seen) == ["a", "a", "b"]


async def test_workqueue_retries_failures() -> None:
    calls = 0

    async def process(key: str) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise model_error()

    q: WorkQueue[str] = WorkQueue("t", process, workers=1)
    task = asyncio.create_task(q.run())
    try:
        q.add("x")
        await asyncio.wait_for(q.wait_idle(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls == 3
    assert q.errors == 2


def model_error() -> Exception:
    from meshlink.errors import KubeError

    return KubeError("API server said no")


def test_api_health_logs_one_line_down_and_one_up(caplog: pytest.LogCaptureFixture) -> None:
    from meshlink.k8s.watch import ApiHealth

    h = ApiHealth("https://127.0.0.1:6443")
    with caplog.at_level("INFO", logger="meshlink.k8s.watch"):
        for _ in range(20):
            h.failed(model_error())
        h.ok()
        h.ok()
        h.failed(model_error())  # right after a success: a server still warming up
        h.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0]
    assert "reachable again" in lines[1]


def test_recorded_gateway_ports_come_from_clusterset_ip_derived_services_only() -> None:
    merged = merge([rec("c1", 1.0, ports=(Port(80, "TCP", "http"), Port(53, "UDP", "dns")))])
    body = model.derived_service_body(merged, {("TCP", 80): 20007})
    assert model.recorded_gateway_ports(body) == [("TCP", 80, 20007)]  # UDP is not tunnelled
    # A headless derived Service's target ports are service ports, whatever their range:
    # seeding them would hand a ClusterSetIP import's gateway port to it.
    headless = {"spec": {"clusterIP": "None", "ports": [{"port": 20007, "targetPort": 20007}]}}
    assert model.recorded_gateway_ports(headless) == []
    named = {"spec": {"ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]}}
    assert model.recorded_gateway_ports(named) == []


# -- the reconcilers' pure pieces ----------------------------------------------------------


def test_namespace_usable_and_import_key() -> None:
    assert not model.namespace_usable(None)
    assert model.namespace_usable({"metadata": {"name": "a"}})
    assert not model.namespace_usable({"metadata": {"deletionTimestamp": "x"}})
    assert not model.namespace_usable({"metadata": {}, "status": {"phase": "Terminating"}})
    obj = {"metadata": {"namespace": "ns", "labels": {model.MCS_SERVICE_NAME: "web"}}}
    assert model.import_key(obj) == ServiceKey("ns", "web")
    assert model.import_key({"metadata": {"namespace": "ns"}}) is None


def test_trim_slice_keeps_what_is_read() -> None:
    full = {
        "metadata": {"name": "s", "namespace": "n", "uid": "u", "managedFields": [1] * 50},
        "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1", "zone": "z"}],
        "ports": [{"port": 80}],
    }
    assert model.trim_slice(full) == {
        "metadata": {"name": "s", "namespace": "n", "uid": "u"},
        "endpoints": [{"addresses": ["10.0.0.1"]}],
    }


def test_local_endpoint_is_the_cluster_ip_or_a_ready_headless_endpoint() -> None:
    r = rec("a", 1.0)
    assert model.local_endpoint(r, service(), 80) == ("10.0.0.5", 80)
    assert model.local_endpoint(r, service(), 81) is None  # not an exported port
    assert model.local_endpoint(None, service(), 80) is None
    assert model.local_endpoint(r, None, 80) is None
    headless = rec(
        "a",
        1.0,
        type=ServiceType.HEADLESS,
        endpoints=(Endpoint(("10.1.0.1",), ready=False), Endpoint(("10.1.0.2",))),
    )
    svc = service(clusterIP="None", ports=[{"port": 80, "targetPort": 8080}])
    assert model.local_endpoint(headless, svc, 80) == ("10.1.0.2", 8080)


def test_imported_service_and_its_listeners() -> None:
    m = merge([rec("b", 2.0), rec("a", 1.0)])
    imp = model.imported_service(m, ("10.9.0.1",))
    assert (imp.namespace, imp.name, imp.ips) == ("demo", "web", ("10.9.0.1",))
    assert [c.cluster for c in imp.clusters] == ["a", "b"]
    assert all(c.endpoints == () for c in imp.clusters)
    (spec,) = model.import_listeners(m, {("TCP", 80): 20001}, "0.0.0.0")
    assert (spec.address, spec.port, spec.service_port, spec.origins) == (
        "0.0.0.0",
        20001,
        80,
        ("a", "b"),
    )
    assert model.import_listeners(m, {}, "0.0.0.0") == ()


def test_clusterset_catalog_reports_what_changed_and_what_it_carries() -> None:
    cat = ClustersetCatalog()
    a, b = rec("a", 1.0), rec("b", 2.0)
    key = a.key
    assert cat.update({key: [b, a]}) == [key]
    assert [r.origin for r in cat.records[key]] == ["a", "b"]
    assert cat.merged[key].winner.origin == "a"
    assert cat.carries(a)
    assert cat.update({key: [a, b]}) == []  # same records: nothing changed
    assert cat.update({}) == [key]
    assert key not in cat.merged
    assert not cat.carries(a)


def test_a_watchers_own_writes_are_in_its_cache_until_their_events() -> None:
    from meshlink.k8s.api import SERVICE
    from meshlink.k8s.watch import ApiHealth, Watcher

    w = Watcher(None, SERVICE, lambda *a: None, ApiHealth("test"))  # type: ignore[arg-type]
    old = {"metadata": {"name": "web", "namespace": "demo", "uid": "1", "resourceVersion": "5"}}
    w.cache[("demo", "web")] = old
    newer = {"metadata": {**old["metadata"], "resourceVersion": "6", "managedFields": []}}
    w.wrote(newer)
    assert w.get(("demo", "web")) == {"metadata": {**old["metadata"], "resourceVersion": "6"}}
    other = {"metadata": {**old["metadata"], "uid": "2"}}  # deleted and recreated meanwhile
    w.wrote(other)
    assert w.get(("demo", "web"))["metadata"]["uid"] == "1"  # type: ignore[index]
    w.deleted(("demo", "web"))
    assert w.get(("demo", "web")) is None


def test_imports_are_owned_by_meshlinks_namespace() -> None:
    body = model.service_import_body(
        merge([ExportRecord("c1", "ns", "web", ServiceType.CLUSTERSET_IP, (Port(80),), 1.0, 1)]),
        ("10.0.0.1",),
        ("IPv4",),
    )
    plain_hash = body["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
    ns = {"metadata": {"name": "meshlink-system", "uid": "u-1"}}
    owned = model.owned_by_namespace(copy.deepcopy(body), ns)
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Namespace", "name": "meshlink-system", "uid": "u-1"}
    ]
    # Another owner is another body: the hash that decides whether to apply again moves.
    h1 = owned["metadata"]["annotations"][model.SPEC_HASH_ANNOTATION]
    ns2 = {"metadata": {"name": "meshlink-system", "uid": "u-2"}}
    h2 = model.owned_by_namespace(copy.deepcopy(body), ns2)["metadata"]["annotations"][
        model.SPEC_HASH_ANNOTATION
    ]
    assert len({plain_hash, h1, h2}) == 3
    # No namespace (or one not yet created): the body as it was.
    assert model.owned_by_namespace(copy.deepcopy(body), None) == body
    assert model.owned_by_namespace(copy.deepcopy(body), {"metadata": {"name": "x"}}) == body


def test_time_and_metadata_helpers_tolerate_what_the_api_server_may_omit() -> None:
    assert model.parse_time(None) == 0.0
    assert model.parse_time("not a time") == 0.0
    assert model.parse_time("1970-01-01T00:01:00Z") == 60.0
    assert model.format_time(60) == "1970-01-01T00:01:00Z"
    assert model.annots({"metadata": {"annotations": "x"}}) == {}
    assert model.labels({"metadata": None}) == {}
    auto = model.service_export_body("demo", "web")
    assert model.is_auto_export(auto)
    assert not model.is_auto_export({"metadata": {}})
    assert model.wants_export({"metadata": {"annotations": {model.EXPORT_ANNOTATION: "true"}}})
    assert not model.wants_export(None)


def test_a_headless_import_with_affinity_and_unnamed_ports() -> None:
    a = rec(
        "a",
        1.0,
        type=ServiceType.HEADLESS,
        ports=(Port(80, "TCP", "", "http"), Port(80, "UDP"), Port(81, "TCP")),
        endpoints=(Endpoint(("10.0.0.1", "fd00::1"), "pod-0"), Endpoint(("10.0.0.2",))),
        session_affinity="ClientIP",
        session_affinity_timeout=30,
        internal_traffic_policy="Local",
        traffic_distribution="PreferClose",
        ip_families=("IPv4", "IPv6"),
    )
    m = merge([a])
    assert model.service_port_names(m.ports) == ["tcp-80", "udp-80", "tcp-81"]
    svc = model.derived_service_body(m, {})
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 30}}
    assert svc["spec"]["ports"][0]["appProtocol"] == "http"
    si = model.service_import_body(m, (), ("IPv4", "IPv6"))
    assert si["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 30}}
    assert si["spec"]["internalTrafficPolicy"] == "Local"
    assert si["spec"]["trafficDistribution"] == "PreferClose"
    slices = model.endpoint_slice_bodies(m, (), {})
    by_family = {s["addressType"]: s for s in slices}
    assert sorted(by_family) == ["IPv4", "IPv6"]
    v4 = by_family["IPv4"]["endpoints"]
    assert [e["addresses"] for e in v4] == [["10.0.0.1"], ["10.0.0.2"]]
    assert v4[0]["hostname"] == "pod-0"
    assert model.import_ready(m, ()).status == "True"  # headless: ready without an IP


def test_an_export_without_ports_and_endpoints_still_gets_a_service_and_a_slice() -> None:
    m = merge([rec("a", 1.0, ports=(), ready_endpoints=0, ip_families=())])
    svc = model.derived_service_body(m, {})
    assert svc["spec"]["ports"] == [{"name": "none", "protocol": "TCP", "port": 9, "targetPort": 9}]
    (s,) = model.endpoint_slice_bodies(m, (), {})
    assert (s["addressType"], s["endpoints"]) == ("IPv4", [])
    assert model.import_ready(m, ()).reason == model.REASON_PENDING


def test_import_status_keeps_current_conditions_when_only_clusters_change() -> None:
    m = merge([rec("a", 1.0)])
    ready = model.import_ready(m, ("10.9.0.1",))
    first = model.service_import_status(m, ready, None, 1, "T1")
    assert first is not None
    current = {"status": {**first["status"], "clusters": [{"cluster": "gone"}]}}
    again = model.service_import_status(m, ready, current, 1, "T2")
    assert again is not None
    assert again["status"]["conditions"] == first["status"]["conditions"]  # T1 kept
    assert again["status"]["clusters"] == [{"cluster": "a"}]
    assert model.service_import_status(m, ready, first, 1, "T3") is None
