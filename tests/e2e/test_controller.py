"""The MCS controller against real kube-apiservers (tests/kube.py), no mock anywhere.

Three clusters are started once for the module; every test runs its own controllers (one
per cluster, each with its own ApiClient) joined by ``InProcessClusterset`` (see
test_controller_harness.py: the deployment carries records over gateway links, the tests
carry them in memory) and uses namespaces of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshlink.catalog.records import ServiceKey
from meshlink.k8s import Controller
from meshlink.k8s.api import (
    ENDPOINT_SLICE,
    NAMESPACE,
    SERVICE,
    SERVICE_EXPORT,
    SERVICE_IMPORT,
    Kube,
    Obj,
)
from meshlink.k8s.model import derived_name
from tests.e2e.test_controller_harness import (
    InProcessClusterset,
    api_for,
    eventually,
    get,
    running_controller,
)
from tests.kube import KubeBinaries, KubeCluster, KubeControlPlane, install_crds

pytestmark = pytest.mark.timeout(180)
WAIT = 20.0
TESTS = "meshlink-tests"


@pytest.fixture(scope="module")
def clusters(
    kube_bin: KubeBinaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[KubeCluster]]:
    cp = KubeControlPlane(3, tmp_path_factory.mktemp("kube"), binaries=kube_bin)
    try:
        cp.start()
        for c in cp.clusters:
            install_crds(c)
        yield cp.clusters
    finally:
        cp.close()


@dataclass
class Env:
    clusters: list[KubeCluster]
    kubes: list[Kube]
    clusterset: InProcessClusterset
    state_dir: Path
    controllers: dict[str, Controller] = field(default_factory=dict)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    created_exports: list[tuple[int, str, str]] = field(default_factory=list)

    async def start(self, i: int, on_imports: Any = None) -> Controller:
        c = self.clusters[i]
        cm = running_controller(
            self.clusterset, c.name, c.kubeconfig, self.state_dir / c.name, on_imports=on_imports
        )
        ctl = await self.stack.enter_async_context(cm)
        self.controllers[c.name] = ctl
        return ctl

    # ---- user actions, through the API as kubectl would do them
    async def namespace(self, i: int, name: str) -> None:
        await self.kubes[i].apply(
            NAMESPACE,
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            manager=TESTS,
        )

    async def service(
        self,
        i: int,
        ns: str,
        name: str,
        ports: list[tuple[str, int, str]] | None = None,
        *,
        headless: bool = False,
        annotations: dict[str, str] | None = None,
        spec: dict[str, Any] | None = None,
    ) -> Obj:
        s: dict[str, Any] = {
            "ports": [
                {"name": n, "port": p, "protocol": proto}
                for n, p, proto in (ports if ports is not None else [("http", 80, "TCP")])
            ],
            "selector": {"app": name},
        }
        if headless:
            s["clusterIP"] = "None"
        s.update(spec or {})
        body = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
            "spec": s,
        }
        return await self.kubes[i].apply(SERVICE, body, manager=TESTS)

    async def endpoints(
        self, i: int, ns: str, svc: str, addrs: list[str], hostnames: list[str] | None = None
    ) -> None:
        eps = []
        for j, a in enumerate(addrs):
            ep: dict[str, Any] = {
                "addresses": [a],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": f"{svc}-{j}", "namespace": ns},
            }
            if hostnames:
                ep["hostname"] = hostnames[j]
            eps.append(ep)
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{svc}-abcde",
                "namespace": ns,
                "labels": {
                    "kubernetes.io/service-name": svc,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
        await self.kubes[i].apply(ENDPOINT_SLICE, body, manager=TESTS)

    async def export(self, i: int, ns: str, name: str, spec: dict[str, Any] | None = None) -> Obj:
        body = {
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec or {},
        }
        self.created_exports.append((i, ns, name))
        return await self.kubes[i].apply(SERVICE_EXPORT, body, manager=TESTS)

    async def unexport(self, i: int, ns: str, name: str) -> None:
        await self.kubes[i].delete(SERVICE_EXPORT, name, ns)

    # ---- observations
    async def si(self, i: int, ns: str, name: str) -> Obj | None:
        return await get(self.kubes[i], SERVICE_IMPORT, ns, name)

    async def derived(self, i: int, ns: str, name: str) -> Obj | None:
        return await get(self.kubes[i], SERVICE, ns, derived_name(ns, name))

    async def mcs_slices(self, i: int, ns: str, name: str) -> list[Obj]:
        items, _ = await self.kubes[i].list(
            ENDPOINT_SLICE, ns, f"multicluster.kubernetes.io/service-name={name}"
        )
        return sorted(items, key=lambda s: s["metadata"]["name"])

    async def conditions(self, i: int, ns: str, name: str) -> dict[str, Obj]:
        obj = await get(self.kubes[i], SERVICE_EXPORT, ns, name)
        return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}

    async def wait_si(self, i: int, ns: str, name: str, check: Any = None) -> Obj:
        async def probe() -> Obj | None:
            obj = await self.si(i, ns, name)
            if obj is None or (check is not None and not check(obj)):
                return None
            return obj

        return await eventually(probe, WAIT, f"ServiceImport {ns}/{name} in c{i + 1}")

    async def wait_condition(
        self, i: int, ns: str, name: str, ctype: str, status: str, reason: str | None = None
    ) -> Obj:
        async def probe() -> Obj | None:
            c = (await self.conditions(i, ns, name)).get(ctype)
            if c and c["status"] == status and (reason is None or c["reason"] == reason):
                return c
            return None

        return await eventually(
            probe, WAIT, f"{ctype}={status} ({reason}) on {ns}/{name} in c{i + 1}"
        )

    async def wait_gone(self, i: int, ns: str, name: str) -> None:
        async def probe() -> bool:
            return (
                await self.si(i, ns, name) is None
                and await self.derived(i, ns, name) is None
                and not await self.mcs_slices(i, ns, name)
            )

        await eventually(probe, WAIT, f"import {ns}/{name} gone from c{i + 1}")


@pytest.fixture
async def env(clusters: list[KubeCluster], tmp_path: Path) -> AsyncIterator[Env]:
    async with contextlib.AsyncExitStack() as stack:
        kubes = [await stack.enter_async_context(api_for(c.kubeconfig)) for c in clusters]
        e = Env(clusters, kubes, InProcessClusterset(), tmp_path)
        try:
            yield e
        finally:
            await e.stack.aclose()
            for i, ns, name in e.created_exports:
                with contextlib.suppress(Exception):
                    await kubes[i].delete(SERVICE_EXPORT, name, ns)


def clusters_of(si: Obj) -> list[str]:
    return [c["cluster"] for c in (si.get("status") or {}).get("clusters") or []]


def ports_of(obj: Obj) -> list[tuple[str, str, int]]:
    return sorted(
        (p.get("name", ""), p.get("protocol", "TCP"), p["port"]) for p in obj["spec"]["ports"]
    )


# --------------------------------------------------------------------------- tests


async def test_export_by_crd_imports_in_every_cluster(env: Env) -> None:
    """c1 and c2 export the same service; all three clusters (exporters too) import it."""
    ns = "t-basic"
    for i in range(3):
        await env.namespace(i, ns)
    for i in (0, 1):
        await env.service(i, ns, "web", [("http", 80, "TCP")])
        await env.endpoints(i, ns, "web", [f"10.{i + 1}.0.1", f"10.{i + 1}.0.2"])
    feed: list[Any] = []
    for i in range(3):
        await env.start(i, on_imports=feed.append if i == 2 else None)
    await env.export(
        0, ns, "web", {"exportedLabels": {"tier": "front"}, "exportedAnnotations": {"team": "a"}}
    )
    await env.export(
        1, ns, "web", {"exportedLabels": {"tier": "front"}, "exportedAnnotations": {"team": "a"}}
    )

    for i in range(3):
        si = await env.wait_si(
            i,
            ns,
            "web",
            lambda o: clusters_of(o) == ["c1", "c2"],
        )
        derived = await env.derived(i, ns, "web")
        assert derived is not None
        assert si["spec"]["type"] == "ClusterSetIP"
        assert ports_of(si) == [("http", "TCP", 80)]
        assert si["spec"]["ips"] == derived["spec"]["clusterIPs"]
        assert si["spec"]["ipFamilies"] == ["IPv4"]
        assert si["metadata"]["labels"]["tier"] == "front"
        assert si["metadata"]["annotations"]["team"] == "a"
        assert si["metadata"]["annotations"][
            "multicluster.kubernetes.io/derived-service"
        ] == derived_name(ns, "web")
        ready = {c["type"]: c for c in si["status"]["conditions"]}["Ready"]
        assert ready["status"] == "True"
        # The derived Service carries the union of ports. No selector: meshlink's
        # EndpointSlices (the gateway pods) alone back it.
        assert "selector" not in derived["spec"]
        # Each imported port targets a gateway port of its own (the gateway listens there).
        ((name, port, target),) = [
            (p["name"], p["port"], p["targetPort"]) for p in derived["spec"]["ports"]
        ]
        assert (name, port) == ("http", 80)
        assert 20000 <= target <= 29999

        async def two_slices(i: int = i) -> list[Obj] | None:
            sl = await env.mcs_slices(i, ns, "web")
            return sl if len(sl) == 2 else None

        slices = await eventually(two_slices, WAIT, f"two MCS slices in c{i + 1}")
        assert sorted(
            s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"] for s in slices
        ) == ["c1", "c2"]
        for s in slices:
            lab = s["metadata"]["labels"]
            assert lab["endpointslice.kubernetes.io/managed-by"] == "meshlink.io"
            assert lab["kubernetes.io/service-name"] == derived_name(ns, "web")
            # A slice port is the endpoint's port: the gateway pods' port for this import.
            assert [(p["name"], p["port"]) for p in s["ports"]] == [("http", target)]

    for i in (0, 1):
        conds = await env.wait_condition(i, ns, "web", "Ready", "True", "Exported")
        assert conds["observedGeneration"] >= 1
        await env.wait_condition(i, ns, "web", "Valid", "True", "Valid")
        await env.wait_condition(i, ns, "web", "Conflict", "False", "NoConflicts")
    # The DNS and listener feed of c3 carries the same import: its clusterset IP is the
    # derived Service's ClusterIP there, and both exporting clusters serve it.
    derived3 = await env.derived(2, ns, "web")
    assert derived3 is not None

    def fed() -> Any:
        for snapshot in reversed(feed):
            for imp in snapshot:
                if (imp.namespace, imp.name) == (ns, "web") and len(imp.clusters) == 2:
                    return imp
        return None

    imp = await eventually(fed, WAIT, "import in c3's feed")
    assert list(imp.ips) == derived3["spec"]["clusterIPs"]
    assert [c.cluster for c in imp.clusters] == ["c1", "c2"]
    assert [(p.name, p.port) for p in imp.ports] == [("http", 80)]
    (target3,) = [p["targetPort"] for p in derived3["spec"]["ports"]]
    assert [
        (s.address, s.port, s.service_port, s.origins)
        for s in env.controllers["c3"].listeners
        if s.key == ServiceKey(ns, "web")
    ] == [("0.0.0.0", target3, 80, ("c1", "c2"))]

    rec = next(r for r in env.controllers["c1"].records if r.name == "web")
    assert rec.ready_endpoints == 2
    assert rec.labels == (("tier", "front"),)

    # c2 stops exporting: its slices go everywhere, c1's stay, the import stays.
    await env.unexport(1, ns, "web")
    for i in range(3):

        async def only_c1(i: int = i) -> bool:
            sl = await env.mcs_slices(i, ns, "web")
            si = await env.si(i, ns, "web")
            return (
                [s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"] for s in sl]
                == ["c1"]
                and si is not None
                and clusters_of(si) == ["c1"]
            )

        await eventually(only_c1, WAIT, f"only c1's slice left in c{i + 1}")


async def test_export_by_annotation_then_unexport_everywhere(env: Env) -> None:
    ns = "t-annot"
    for i in range(2):
        await env.namespace(i, ns)
    for i in range(2):
        await env.start(i)
    await env.service(
        0, ns, "api", [("grpc", 9000, "TCP")], annotations={"meshlink.io/export": "true"}
    )

    svcex = await eventually(
        lambda: get(env.kubes[0], SERVICE_EXPORT, ns, "api"),
        WAIT,
        "ServiceExport created for the annotation",
    )
    assert svcex["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshlink"
    for i in range(2):
        si = await env.wait_si(i, ns, "api")
        assert ports_of(si) == [("grpc", "TCP", 9000)]

    # Remove the annotation: the ServiceExport meshlink created goes, and so do the imports.
    await env.service(0, ns, "api", [("grpc", 9000, "TCP")], annotations={})
    await eventually(
        lambda: _is_none(get(env.kubes[0], SERVICE_EXPORT, ns, "api")),
        WAIT,
        "ServiceExport deleted",
    )
    for i in range(2):
        await env.wait_gone(i, ns, "api")

    # A ServiceExport made by the user is never deleted by meshlink, annotation or not.
    await env.export(0, ns, "api")
    await env.wait_si(1, ns, "api")
    await env.unexport(0, ns, "api")
    for i in range(2):
        await env.wait_gone(i, ns, "api")


async def _is_none(coro: Any) -> bool:
    return (await coro) is None


async def test_conflicts_resolved_as_the_kep_says(env: Env) -> None:
    """Oldest export wins; ports are the union; Conflict on every export in every cluster."""
    ns = "t-conflict"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(0, ns, "api", [("http", 80, "TCP")])
    await env.service(
        1,
        ns,
        "api",
        [("http", 8080, "TCP"), ("metrics", 9090, "TCP")],
        spec={"sessionAffinity": "ClientIP"},
    )
    await env.service(0, ns, "db", [("pg", 5432, "TCP")])
    await env.service(1, ns, "db", [("pg", 5432, "TCP")], headless=True)
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "api")
    await env.export(0, ns, "db")
    await asyncio.sleep(1.1)  # creationTimestamp has one-second resolution: c1 is older
    await env.export(1, ns, "api")
    await env.export(1, ns, "db")

    for i in range(2):
        # ClientIP brings its default timeout (10800 s): the config differs too.
        await env.wait_condition(
            i,
            ns,
            "api",
            "Conflict",
            "True",
            "PortConflict,SessionAffinityConflict,SessionAffinityConfigConflict",
        )
        await env.wait_condition(i, ns, "db", "Conflict", "True", "TypeConflict")
    for i in range(2):
        si = await env.wait_si(i, ns, "api", lambda o: len(clusters_of(o)) == 2)
        # c1's http/80 wins over c2's http/8080; metrics/9090 joins the union.
        assert ports_of(si) == [("http", "TCP", 80), ("metrics", "TCP", 9090)]
        assert si["spec"]["sessionAffinity"] == "None"

        async def both_slices(i: int = i) -> dict[str, Obj] | None:
            by_source = {
                s["metadata"]["labels"]["multicluster.kubernetes.io/source-cluster"]: s
                for s in await env.mcs_slices(i, ns, "api")
            }
            return by_source if sorted(by_source) == ["c1", "c2"] else None

        slices = await eventually(both_slices, WAIT, f"slices of c1 and c2 in c{i + 1}")
        derived = await env.derived(i, ns, "api")
        assert derived is not None
        target = {p["port"]: p["targetPort"] for p in derived["spec"]["ports"]}
        assert sorted(target) == [80, 9090]
        assert target[80] != target[9090]
        # Each cluster's slice carries the gateway ports of the ports that cluster has.
        assert [p["port"] for p in slices["c1"]["ports"]] == [target[80]]
        assert [p["port"] for p in slices["c2"]["ports"]] == [target[9090]]

        db = await env.wait_si(i, ns, "db", lambda o: clusters_of(o) == ["c1"])
        assert db["spec"]["type"] == "ClusterSetIP"

    # c1's ClusterSetIP export of db goes: c2's Headless one wins now. clusterIP is
    # immutable, so the derived Service is replaced by a headless one.
    await env.unexport(0, ns, "db")
    for i in range(2):
        db = await env.wait_si(i, ns, "db", lambda o: o["spec"]["type"] == "Headless")
        assert not db["spec"].get("ips")
        derived = await eventually(
            lambda i=i: _headless(env.derived(i, ns, "db")), WAIT, "headless derived Service"
        )
        assert derived["spec"]["clusterIP"] == "None"
    await env.wait_condition(1, ns, "db", "Conflict", "False", "NoConflicts")


async def _headless(coro: Any) -> Obj | None:
    obj = await coro
    return obj if obj is not None and obj["spec"].get("clusterIP") == "None" else None


async def test_namespace_created_after_the_export(env: Env) -> None:
    ns = "t-late"
    await env.namespace(0, ns)
    await env.service(0, ns, "late", [("http", 80, "TCP")])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "late")
    await env.wait_si(0, ns, "late")
    await asyncio.sleep(0.5)
    assert await env.si(1, ns, "late") is None
    await env.namespace(1, ns)
    si = await env.wait_si(1, ns, "late")
    assert si["spec"]["ips"]


async def test_external_name_and_kube_system_are_refused(env: Env) -> None:
    ns = "t-refused"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(
        0,
        ns,
        "ext",
        [],
        spec={"type": "ExternalName", "externalName": "example.com", "selector": None},
    )
    await env.service(0, "kube-system", "sys", [("dns", 53, "UDP")])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "ext")
    await env.export(0, "kube-system", "sys")
    await env.export(0, ns, "missing")
    await env.wait_condition(0, ns, "ext", "Valid", "False", "InvalidServiceType")
    await env.wait_condition(0, "kube-system", "sys", "Valid", "False", "NamespaceNotAllowed")
    await env.wait_condition(0, ns, "missing", "Valid", "False", "NoService")
    await env.wait_condition(0, ns, "ext", "Ready", "False")
    for i in range(2):
        assert await env.si(i, ns, "ext") is None
        assert await env.si(i, "kube-system", "sys") is None
        assert await env.si(i, ns, "missing") is None
    assert not [r for r in env.controllers["c1"].records if r.namespace in (ns, "kube-system")]
    # The Service appears later: the export becomes valid and is imported.
    await env.service(0, ns, "missing", [("http", 80, "TCP")])
    await env.wait_condition(0, ns, "missing", "Valid", "True")
    await env.wait_si(1, ns, "missing")


async def test_headless_import_carries_remote_endpoints(env: Env) -> None:
    ns = "t-headless"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(0, ns, "db", [("pg", 5432, "TCP")], headless=True)
    await env.endpoints(0, ns, "db", ["10.9.0.1", "10.9.0.2"], hostnames=["db-0", "db-1"])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "db")
    si = await env.wait_si(1, ns, "db")
    assert si["spec"]["type"] == "Headless"
    assert not si["spec"].get("ips")
    assert si["spec"]["ipFamilies"] == ["IPv4"]
    derived = await env.derived(1, ns, "db")
    assert derived is not None
    assert derived["spec"]["clusterIP"] == "None"

    async def slice_with_endpoints() -> Obj | None:
        sl = await env.mcs_slices(1, ns, "db")
        return sl[0] if sl and len(sl[0].get("endpoints") or []) == 2 else None

    sl = await eventually(slice_with_endpoints, WAIT, "headless slice with both endpoints")
    assert sorted((e["addresses"][0], e.get("hostname")) for e in sl["endpoints"]) == [
        ("10.9.0.1", "db-0"),
        ("10.9.0.2", "db-1"),
    ]


async def test_lease_expiry_removes_the_clusters_imports(env: Env) -> None:
    ns = "t-lease"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(0, ns, "gone", [("http", 80, "TCP")])
    await env.start(1)
    async with running_controller(
        env.clusterset, "c1", env.clusters[0].kubeconfig, env.state_dir / "c1x"
    ):
        await env.export(0, ns, "gone")
        await env.wait_si(1, ns, "gone")
    # c1's controller is gone and its lease runs out: c2 drops what c1 exported.
    env.clusterset.withdraw("c1")
    await env.wait_gone(1, ns, "gone")


async def test_apiserver_restart_mid_run(env: Env) -> None:
    ns = "t-restart"
    for i in range(2):
        await env.namespace(i, ns)
    for name in ("before", "during", "after"):
        await env.service(0, ns, name, [("http", 80, "TCP")])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "before")
    await env.wait_si(1, ns, "before")

    # c2's API server goes away while c1 exports something new.
    await asyncio.to_thread(env.clusters[1].stop_apiserver)
    try:
        await env.export(0, ns, "during")
        await eventually(
            lambda: any(r.name == "during" for r in env.controllers["c1"].records),
            WAIT,
            "record published",
        )
        await asyncio.sleep(1.0)  # the c2 controller retries against a dead server meanwhile
    finally:
        await asyncio.to_thread(env.clusters[1].start_apiserver)
    await env.wait_si(1, ns, "during")

    # c1's own API server restarts: its watches resume and see a later export.
    await asyncio.to_thread(env.clusters[0].stop_apiserver)
    await asyncio.to_thread(env.clusters[0].start_apiserver)
    await env.export(0, ns, "after")
    await env.wait_si(1, ns, "after")
    await env.wait_condition(0, ns, "after", "Ready", "True", "Exported")
    assert await env.si(1, ns, "before") is not None


async def test_controller_restart_rebuilds_state_without_orphans(env: Env) -> None:
    ns = "t-ctlrestart"
    for i in range(2):
        await env.namespace(i, ns)
    for name in ("keep", "drop", "new"):
        await env.service(0, ns, name, [("http", 80, "TCP")])
    await env.start(0)
    async with running_controller(
        env.clusterset, "c2", env.clusters[1].kubeconfig, env.state_dir / "c2a"
    ) as first:
        await env.export(0, ns, "keep")
        await env.export(0, ns, "drop")
        await env.wait_si(1, ns, "keep")
        await env.wait_si(1, ns, "drop")
        await eventually(lambda: first.idle(), WAIT, "c2 controller idle")
    keep_before = await env.derived(1, ns, "keep")
    si_before = await env.si(1, ns, "keep")
    assert keep_before is not None
    assert si_before is not None

    # While c2's controller is down: one export goes, one comes, and a stray import appears.
    await env.unexport(0, ns, "drop")
    await env.export(0, ns, "new")
    await eventually(
        lambda: (
            {r.name for r in env.controllers["c1"].records if r.namespace == ns} == {"keep", "new"}
        ),
        WAIT,
        "c1 records updated",
    )
    stray = {
        "apiVersion": "multicluster.x-k8s.io/v1beta1",
        "kind": "ServiceImport",
        "metadata": {
            "name": "stray",
            "namespace": ns,
            "labels": {
                "app.kubernetes.io/managed-by": "meshlink",
                "multicluster.kubernetes.io/service-name": "stray",
            },
        },
        "spec": {"type": "ClusterSetIP", "ports": [{"port": 1, "protocol": "TCP"}]},
    }
    await env.kubes[1].apply(SERVICE_IMPORT, stray, manager="meshlink")

    async with running_controller(
        env.clusterset, "c2", env.clusters[1].kubeconfig, env.state_dir / "c2b"
    ) as second:
        await env.wait_si(1, ns, "new")
        await env.wait_gone(1, ns, "drop")
        await eventually(
            lambda: _is_none(env.si(1, ns, "stray")), WAIT, "stray ServiceImport removed"
        )
        await eventually(lambda: second.idle(), WAIT, "c2 controller idle")
        # Unchanged imports were not re-applied (hashes live on the objects).
        keep_after = await env.derived(1, ns, "keep")
        si_after = await env.si(1, ns, "keep")
        assert keep_after is not None
        assert si_after is not None
        assert (
            keep_after["metadata"]["resourceVersion"] == keep_before["metadata"]["resourceVersion"]
        )
        # The restarted controller took the gateway ports from the derived Services: the
        # kept import listens where its Service already points; the new one got another.
        (keep_port,) = [p["targetPort"] for p in keep_after["spec"]["ports"]]
        new_derived = await env.derived(1, ns, "new")
        assert new_derived is not None
        (new_port,) = [p["targetPort"] for p in new_derived["spec"]["ports"]]
        assert new_port != keep_port
        assert {s.key.name: s.port for s in second.listeners if s.key.namespace == ns} == {
            "keep": keep_port,
            "new": new_port,
        }
        assert si_after["metadata"]["uid"] == si_before["metadata"]["uid"]
        # Nothing duplicated: exactly one derived Service and one slice per import.
        items, _ = await env.kubes[1].list(SERVICE, ns, "app.kubernetes.io/managed-by=meshlink")
        assert sorted(i["metadata"]["name"] for i in items) == sorted(
            derived_name(ns, n) for n in ("keep", "new")
        )
        items, _ = await env.kubes[1].list(SERVICE_IMPORT, ns)
        assert sorted(i["metadata"]["name"] for i in items) == ["keep", "new"]
        items, _ = await env.kubes[1].list(
            ENDPOINT_SLICE, ns, "endpointslice.kubernetes.io/managed-by=meshlink.io"
        )
        assert len(items) == 2


async def test_gateway_pods_back_the_clusterset_ip(env: Env) -> None:
    """ClusterSetIP slices point at the local gateway pods (which tunnel the traffic)."""
    ns = "t-gateway"
    gw_ns = "meshlink-system"
    for i in range(2):
        await env.namespace(i, ns)
        await env.namespace(i, gw_ns)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "gateway-0",
            "namespace": gw_ns,
            "labels": {"app.kubernetes.io/name": "meshlink"},
        },
        "spec": {"containers": [{"name": "gw", "image": "meshlink"}]},
    }
    from meshlink.k8s.api import POD

    await env.kubes[1].apply(POD, pod, manager=TESTS)
    status = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "gateway-0", "namespace": gw_ns},
        "status": {
            "podIP": "10.244.1.7",
            "podIPs": [{"ip": "10.244.1.7"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    await env.kubes[1].apply(POD, status, sub="status", manager=TESTS)
    await env.service(0, ns, "web", [("http", 80, "TCP")])
    await env.endpoints(0, ns, "web", ["10.1.0.9"])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "web")

    async def gateway_slice() -> Obj | None:
        sl = await env.mcs_slices(1, ns, "web")
        if sl and [e["addresses"] for e in sl[0].get("endpoints") or []] == [["10.244.1.7"]]:
            return sl[0]
        return None

    sl = await eventually(gateway_slice, WAIT, "slice pointing at the gateway pod")
    assert sl["endpoints"][0]["conditions"]["ready"] is True
    # The slice port is the gateway port the derived Service targets for this import.
    derived = await env.derived(1, ns, "web")
    assert derived is not None
    (target,) = [p["targetPort"] for p in derived["spec"]["ports"]]
    assert json.dumps(sl["ports"]) == json.dumps(
        [{"name": "http", "protocol": "TCP", "port": target}]
    )
    # Everything meshlink made for the import is owned by meshlink's namespace, so the
    # garbage collector removes it once meshlink is uninstalled (no orphaned import).
    gw = await env.kubes[1].get(NAMESPACE, gw_ns)
    assert gw is not None
    owner = [{"apiVersion": "v1", "kind": "Namespace", "name": gw_ns, "uid": gw["metadata"]["uid"]}]
    si = await env.si(1, ns, "web")
    assert si is not None
    for obj in (sl, derived, si):
        assert obj["metadata"].get("ownerReferences") == owner, obj["metadata"]


async def test_v1alpha1_export_is_the_same_object(env: Env) -> None:
    """A ServiceExport written through v1alpha1 is served as v1beta1 and exported."""
    from meshlink.k8s.api import Resource

    v1alpha1 = Resource("multicluster.x-k8s.io", "v1alpha1", "serviceexports", "ServiceExport")
    ns = "t-alpha"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(0, ns, "old", [("http", 80, "TCP")])
    for i in range(2):
        await env.start(i)
    body = {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": {"name": "old", "namespace": ns},
    }
    env.created_exports.append((0, ns, "old"))
    await env.kubes[0].apply(v1alpha1, body, manager=TESTS)
    await env.wait_si(1, ns, "old")
    await env.wait_condition(0, ns, "old", "Ready", "True", "Exported")


async def test_namespace_deleted_and_recreated_restores_imports(env: Env) -> None:
    """No namespace controller runs here, so the test finalizes the namespace itself (as
    kube-controller-manager would once the namespace is empty)."""
    ns = "t-recreate"
    for i in range(2):
        await env.namespace(i, ns)
    await env.service(0, ns, "web", [("http", 80, "TCP")])
    for i in range(2):
        await env.start(i)
    await env.export(0, ns, "web")
    await env.wait_si(1, ns, "web")

    await env.kubes[1].delete(NAMESPACE, ns)
    # Terminating: the controller withdraws its imports from the namespace by itself.
    await env.wait_gone(1, ns, "web")
    finalize = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns},
        "spec": {"finalizers": []},
    }
    await asyncio.to_thread(
        env.clusters[1].kubectl,
        "replace",
        "--raw",
        f"/api/v1/namespaces/{ns}/finalize",
        "-f",
        "-",
        input=json.dumps(finalize),
    )
    await eventually(
        lambda: _is_none(get(env.kubes[1], NAMESPACE, None, ns)), WAIT, "namespace gone"
    )
    await env.namespace(1, ns)
    si = await env.wait_si(1, ns, "web")
    assert si["spec"]["ips"]

    async def one_slice() -> bool:
        return len(await env.mcs_slices(1, ns, "web")) == 1

    await eventually(one_slice, WAIT, "the imported slice restored")


async def test_watch_relists_on_410_and_diffs_against_its_cache(env: Env) -> None:
    """A watch resumed from a resourceVersion older than the API server's watch cache (it
    restarted meanwhile) gets 410; the watcher relists and reports exactly what changed."""
    from meshlink.k8s.watch import ApiHealth, Watcher

    ns = "t-relist"
    c3, kube = env.clusters[2], env.kubes[2]
    await env.namespace(2, ns)
    await env.service(2, ns, "a", [("http", 80, "TCP")])
    await env.service(2, ns, "b", [("http", 80, "TCP")])
    events: list[tuple[str, str]] = []

    def handler(key: tuple[str, str], old: Obj | None, new: Obj | None) -> None:
        kind = "ADDED" if old is None else "DELETED" if new is None else "MODIFIED"
        events.append((kind, key[1]))

    w = Watcher(kube, SERVICE, handler, ApiHealth("c3"), namespace=ns)
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.synced.wait(), WAIT)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(events) == [("ADDED", "a"), ("ADDED", "b")]
    events.clear()

    # A restarted API server builds a fresh watch cache that starts after our version.
    await asyncio.to_thread(c3.stop_apiserver)
    await asyncio.to_thread(c3.start_apiserver)
    await eventually(lambda: _ok(kube.list(SERVICE, ns)), WAIT, "c3 API server back")
    await kube.delete(SERVICE, "a", ns)
    await env.service(2, ns, "c", [("http", 80, "TCP")])
    task = asyncio.create_task(w.run())
    try:
        await eventually(lambda: w.relists == 2, WAIT, "a relist after 410")
        await eventually(
            lambda: sorted(events) == [("ADDED", "c"), ("DELETED", "a")],
            WAIT,
            f"diff events ({events})",
        )
        await env.service(2, ns, "d", [("http", 80, "TCP")])
        await eventually(
            lambda: ("ADDED", "d") in events, WAIT, "the resumed watch sees new objects"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(w.cache) == [(ns, "b"), (ns, "c"), (ns, "d")]


async def _ok(coro: Any) -> bool:
    try:
        await coro
    except Exception:
        return False
    return True


async def test_a_record_the_api_refuses_does_not_stop_the_others(env: Env) -> None:
    """A peer's record that the API server rejects (an exported label key Kubernetes does
    not accept) is logged and retried; every other import still converges."""
    from meshlink.catalog.records import ExportRecord, Port, ServiceType

    ns = "t-badrecord"
    await env.namespace(1, ns)
    ctl = await env.start(1)

    def rec(name: str, labels: tuple[tuple[str, str], ...]) -> ExportRecord:
        return ExportRecord(
            origin="c9",
            namespace=ns,
            name=name,
            type=ServiceType.CLUSTERSET_IP,
            ports=(Port(80, "TCP", "http"),),
            created=1.0,
            version=1,
            ready_endpoints=1,
            labels=labels,
        )

    env.clusterset.by_origin["c9"] = (rec("bad", (("not a label key!", "x"),)), rec("good", ()))
    env.clusterset.broadcast()
    await env.wait_si(1, ns, "good", lambda o: clusters_of(o) == ["c9"])
    await eventually(lambda: ctl.import_queue.errors > 0, WAIT, "the bad record refused")
    assert await env.si(1, ns, "bad") is None
    # Withdrawn: the controller cleans up what it made for the bad one (its derived Service).
    env.clusterset.withdraw("c9")
    await env.wait_gone(1, ns, "good")
    await env.wait_gone(1, ns, "bad")


async def test_local_endpoint_routes_flows_for_our_exports_only(env: Env) -> None:
    """Where the gateway sends a flow that arrived for one of this cluster's exports: the
    Service's ClusterIP (kube-proxy picks the endpoint), or for a headless export a ready
    endpoint on the target port; nothing for unexported services or unexported ports."""
    ns = "t-local-ep"
    await env.namespace(0, ns)
    web = await env.service(0, ns, "web", [("http", 80, "TCP")])
    await env.service(
        0,
        ns,
        "hl",
        headless=True,
        spec={"ports": [{"name": "pg", "port": 5432, "targetPort": 15432, "protocol": "TCP"}]},
    )
    await env.endpoints(0, ns, "hl", ["10.9.0.7"])
    await env.service(0, ns, "private", [("http", 80, "TCP")])
    ctl = await env.start(0)
    await env.export(0, ns, "web")
    await env.export(0, ns, "hl")
    for name in ("web", "hl"):
        await env.wait_condition(0, ns, name, "Ready", "True", "Exported")
    assert await eventually(lambda: ctl.local_endpoint(ns, "web", 80), WAIT, "web routable") == (
        web["spec"]["clusterIP"],
        80,
    )
    assert await eventually(lambda: ctl.local_endpoint(ns, "hl", 5432), WAIT, "hl routable") == (
        "10.9.0.7",
        15432,
    )
    assert ctl.local_endpoint(ns, "web", 81) is None
    assert ctl.local_endpoint(ns, "private", 80) is None
    assert ctl.local_endpoint("elsewhere", "web", 80) is None
