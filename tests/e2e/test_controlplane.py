"""The test control plane itself: independent real clusters, restartable API servers."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable

import pytest

from tests.kube import (
    CRD_CREATE_DELAY,
    KubeCluster,
    KubectlError,
    endpoint_slice,
    install_crds,
    service_export_v1alpha1,
    set_cluster_id,
    wait_crd_create_delay,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


def _service(ns: str, name: str, port: int) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
        }
    )


def test_two_clusters_are_independent(kube_clusters: Callable[[int], list[KubeCluster]]) -> None:
    c1, c2 = kube_clusters(2)
    assert c1.server != c2.server
    assert c1.service_cidr != c2.service_cidr
    for i, c in enumerate((c1, c2)):
        c.kubectl("create", "namespace", "demo")
        c.apply(_service("demo", "web", 8080 + i))
        c.apply(endpoint_slice("demo", "web", [f"10.244.{i}.5"], [("http", 8080 + i, "TCP")]))

    for i, c in enumerate((c1, c2)):
        svc = c.get_json("service", "web", "-n", "demo")
        assert svc["spec"]["ports"][0]["port"] == 8080 + i
        # The ClusterIP comes from this cluster's own service CIDR.
        assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(
            c.service_cidr
        )
        slices = c.get_json("endpointslices", "-n", "demo", "-l", "kubernetes.io/service-name=web")[
            "items"
        ]
        assert [s["endpoints"][0]["addresses"] for s in slices] == [[f"10.244.{i}.5"]]

    c1.kubectl("create", "namespace", "only-in-c1")
    assert c1.exists("namespace", "only-in-c1")
    assert not c2.exists("namespace", "only-in-c1")
    c2.kubectl("delete", "service", "web", "-n", "demo", "--wait=true")
    assert not c2.exists("service", "web", "-n", "demo")
    assert c1.exists("service", "web", "-n", "demo")


def test_admin_kubeconfig_is_system_masters(kube_cluster: KubeCluster) -> None:
    who = json.loads(kube_cluster.kubectl("auth", "whoami", "-o", "json").stdout)
    assert "system:masters" in who["status"]["userInfo"]["groups"]
    # The context is named after the cluster, for kubernetes_asyncio's new_client_from_config.
    ctx = kube_cluster.kubectl("config", "current-context").stdout.strip()
    assert ctx == kube_cluster.name
    # Namespaces the apiserver makes itself; no controller-manager runs, so nothing else.
    wait_until(lambda: kube_cluster.exists("namespace", "kube-system"), 10, "kube-system namespace")
    assert kube_cluster.exists("namespace", "default")


def test_apiserver_restart_keeps_data(kube_cluster: KubeCluster) -> None:
    c = kube_cluster
    c.kubectl("create", "namespace", "keep")
    c.kubectl("create", "configmap", "cm", "-n", "keep", "--from-literal=k=v1")
    rv_before = int(c.get_json("configmap", "cm", "-n", "keep")["metadata"]["resourceVersion"])

    c.stop_apiserver()
    assert not c.apiserver_running
    with pytest.raises(KubectlError):
        c.kubectl("get", "namespace", "keep", "--request-timeout=3s", timeout=10)

    c.start_apiserver()
    cm = c.get_json("configmap", "cm", "-n", "keep")
    assert cm["data"] == {"k": "v1"}
    c.kubectl("patch", "configmap", "cm", "-n", "keep", "-p", '{"data":{"k":"v2"}}')
    after = c.get_json("configmap", "cm", "-n", "keep")
    assert after["data"] == {"k": "v2"}
    assert int(after["metadata"]["resourceVersion"]) > rv_before


def test_crds_and_cluster_id(kube_cluster: KubeCluster) -> None:
    c = kube_cluster
    install_crds(c)
    set_cluster_id(c, "east-1")
    prop = c.get_json("clusterproperty", "cluster.clusterset.k8s.io")
    assert prop["spec"]["value"] == "east-1"
    c.kubectl("create", "namespace", "demo")
    c.apply(service_export_v1alpha1("demo", "web"))
    got = c.get_json("svcex", "web", "-n", "demo")
    assert got["apiVersion"] == "multicluster.x-k8s.io/v1beta1"


async def test_first_create_after_waiting_out_the_new_crd_delay(kube_cluster: KubeCluster) -> None:
    """The API server sleeps 2 s in a create of a custom resource whose CRD is younger than
    that (the 2 s tail of benchmarks/convergence.py's first export); once
    wait_crd_create_delay returns, the first ServiceExport create is not delayed."""
    from kubernetes_asyncio import config as kconfig

    from meshlink.k8s.api import NAMESPACE, SERVICE_EXPORT, Kube

    c = kube_cluster
    install_crds(c)
    wait_crd_create_delay(c)
    api = await kconfig.new_client_from_config(str(c.kubeconfig))
    async with api:
        kube = Kube(api, 30.0)
        ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}
        await kube.apply(NAMESPACE, ns, manager="test")
        t0 = time.monotonic()
        await kube.create(
            SERVICE_EXPORT,
            {
                "apiVersion": "multicluster.x-k8s.io/v1beta1",
                "kind": "ServiceExport",
                "metadata": {"name": "web", "namespace": "demo"},
            },
        )
        took = time.monotonic() - t0
    # The delay is a sleep of CRD_CREATE_DELAY inside the create: any less, it did not run.
    assert took < CRD_CREATE_DELAY, took


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.1 s waiting for the moon"):
        wait_until(lambda: False, 0.1, "the moon")
    assert wait_until(lambda: 42, 1, "an answer") == 42


def test_factory_numbers_clusters_across_calls(
    kube_clusters: Callable[[int], list[KubeCluster]],
) -> None:
    first = kube_clusters(1)
    more = kube_clusters(2)
    clusters = first + more
    assert [c.name for c in clusters] == ["c1", "c2", "c3"]
    assert len({c.service_cidr for c in clusters}) == 3
    assert len({c.server for c in clusters}) == 3
    for c in clusters:
        c.kubectl("create", "namespace", f"from-{c.name}")
    for c in clusters:
        names = {
            n["metadata"]["name"]
            for n in c.get_json("namespaces")["items"]
            if n["metadata"]["name"].startswith("from-")
        }
        assert names == {f"from-{c.name}"}
