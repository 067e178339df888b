"""Kubernetes mode end to end: real kube-apiservers, `meshlink run` processes started from the
CLI in Kubernetes mode, linked with a real token; the export in one cluster materialises in
the other (ServiceImport, derived Service, MCS EndpointSlice, DNS) through the gateways'
catalog sync, and goes away when the exporting site's lease (its link) runs out and the
grace period after it (3 s here) is over.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest

from meshlink.k8s.model import DERIVED_ANNOTATION
from tests.kube import KubeCluster, KubectlError, install_crds
from tests.sites import SiteProc, cli, wait_until

pytestmark = pytest.mark.timeout(240)

SERVICE = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, protocol: TCP}]
"""
EXPORT = """
apiVersion: multicluster.x-k8s.io/v1beta1
kind: ServiceExport
metadata: {name: web, namespace: shop}
"""


IMPORT_PORTS = (20000, 20999)


def import_address(cluster: KubeCluster) -> str:
    # A loopback address of its own: the API servers listen on 127.0.0.1 ports in the same
    # range, and a listener on another address does not collide with them.
    return f"127.78.{cluster.name.removeprefix('c')}.1"


def k8s_site(root: Path, cluster: KubeCluster) -> SiteProc:
    return SiteProc(
        cluster.name,
        root,
        extra={
            "kubernetes": {
                "kubeconfig": str(cluster.kubeconfig),
                "requestTimeout": 5,
                "importAddress": import_address(cluster),
                "importPorts": "{}-{}".format(*IMPORT_PORTS),
            }
        },
    )


def get(cluster: KubeCluster, *args: str) -> dict[str, Any] | None:
    """The object, or None if there is none (also when it goes between two requests)."""
    try:
        return cluster.get_json(*args)
    except KubectlError as e:
        if "NotFound" in e.stderr:
            return None
        raise


def dns_a(site: SiteProc, name: str) -> list[str]:
    q = dns.message.make_query(name, dns.rdatatype.A)
    r = dns.query.udp(q, "127.0.0.1", port=site.ports["dns"], timeout=2)
    return [rr.address for rrset in r.answer for rr in rrset]


def test_export_in_c1_is_imported_in_c2_through_real_sites(
    kube_clusters: Callable[[int], list[KubeCluster]], tmp_path: Path
) -> None:
    c1, c2 = kube_clusters(2)
    for c in (c1, c2):
        install_crds(c)
        c.apply(SERVICE)
    s1, s2 = k8s_site(tmp_path, c1), k8s_site(tmp_path, c2)
    s2.extra["importGracePeriod"] = 3
    s2.write_config()
    try:
        s1.start()
        s2.start()
        s2.link_to(s1)
        t0 = time.monotonic()
        c1.apply(EXPORT)
        imp = wait_until(
            "ServiceImport shop/web in c2",
            lambda: get(c2, "serviceimports.multicluster.x-k8s.io", "-n", "shop", "web"),
            timeout=30,
        )
        print(f"export in c1 -> ServiceImport in c2: {time.monotonic() - t0:.2f} s")
        assert imp["spec"]["type"] == "ClusterSetIP"
        assert [p["port"] for p in imp["spec"]["ports"]] == [80]
        assert imp["spec"]["ips"], imp
        assert [c["cluster"] for c in imp["status"]["clusters"]] == ["c1"]
        slices = c2.get_json(
            "endpointslices",
            "-n",
            "shop",
            "-l",
            "multicluster.kubernetes.io/service-name=web,"
            "multicluster.kubernetes.io/source-cluster=c1",
        )["items"]
        assert len(slices) == 1
        assert slices[0]["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == (
            "meshlink.io"
        )
        # The derived Service targets a gateway port of this import's own; the slice (the
        # gateway pods' endpoints) carries that port, and c2's gateway listens on it.
        derived = c2.get_json(
            "services", "-n", "shop", imp["metadata"]["annotations"][DERIVED_ANNOTATION]
        )
        ((sport,),) = [[p["targetPort"] for p in derived["spec"]["ports"]]]
        assert IMPORT_PORTS[0] <= sport <= IMPORT_PORTS[1]
        assert [p["port"] for p in slices[0]["ports"]] == [sport]
        want = {"address": f"{import_address(c2)}:{sport}", "service": "shop/web", "port": 80}
        wait_until("c2's listener for shop/web", lambda: want in s2.status()["listeners"])
        with socket.create_connection((import_address(c2), sport), timeout=5):
            pass
        # The exporter imports too (MCS: exporters import), and its export is Valid/Ready.
        wait_until(
            "ServiceImport shop/web in c1 too",
            lambda: get(c1, "serviceimports.multicluster.x-k8s.io", "-n", "shop", "web"),
        )
        conds = {
            c["type"]: c["status"]
            for c in c1.get_json("serviceexports.multicluster.x-k8s.io", "-n", "shop", "web")[
                "status"
            ]["conditions"]
        }
        assert conds.get("Valid") == "True"
        # DNS at c2 answers the clusterset IP of the ServiceImport.
        answer = wait_until(
            "DNS at c2", lambda: dns_a(s2, "web.shop.svc.clusterset.local"), timeout=10
        )
        assert answer == imp["spec"]["ips"]

        # `meshlink check` in Kubernetes mode vouches for the API server and the controller,
        # and says so when the API server goes away.
        def check_s2() -> str:
            return cli("check", "--config", str(s2.config), check=False).stdout

        assert "PASS  API server https://127.0.0.1:" in check_s2()
        c2.stop_apiserver()
        try:
            wait_until(
                "check at c2 fails on its unreachable API server",
                lambda: "unreachable for" in check_s2(),
                timeout=30,
            )
            assert "kubernetes: API server" in cli("status", "--config", str(s2.config)).stdout
        finally:
            c2.start_apiserver()
        wait_until(
            "check at c2 passes again",
            lambda: "PASS  API server https://127.0.0.1:" in check_s2(),
            timeout=60,
        )

        # The exporting site dies: its lease (the link) runs out, and once the grace period
        # is over c2 drops the import.
        s1.kill()
        t0 = time.monotonic()
        wait_until(
            "ServiceImport gone from c2",
            lambda: get(c2, "serviceimports.multicluster.x-k8s.io", "-n", "shop", "web") is None,
            timeout=30,
        )
        gone = time.monotonic() - t0
        print(f"exporting site killed -> import withdrawn in c2: {gone:.2f} s (grace 3 s)")
        assert gone >= 3
        assert not c2.get_json(
            "endpointslices", "-n", "shop", "-l", "multicluster.kubernetes.io/service-name=web"
        )["items"]
        assert dns_a(s2, "web.shop.svc.clusterset.local") == []
        wait_until("c2's listener closed", lambda: not s2.status()["listeners"])
    except BaseException:
        for s in (s1, s2):
            print(f"--- log of site {s.name}:\n{s.log_tail(60)}")
        raise
    finally:
        s1.stop()
        s2.stop()
