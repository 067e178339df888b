"""Local mode adapter: records from YAML, stable import addresses, namespace sameness."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from meshlink import config
from meshlink.catalog.records import ExportRecord, Port, ServiceKey, ServiceType
from meshlink.catalog.view import ImportView
from meshlink.local.site import LocalSite


def site(tmp_path: Path, **extra: object) -> LocalSite:
    data = {
        "site": "a",
        "stateDir": str(tmp_path),
        "imports": {"pool": "127.90.0.0/29"},
        "exports": [
            {
                "name": "web",
                "namespace": "shop",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                "endpoints": ["127.0.0.1", {"address": "127.0.0.2", "ready": False}],
            }
        ],
        **extra,
    }
    return LocalSite(config.parse(data))


def remote(
    origin: str, name: str, ns: str = "shop", port: int = 80, created: float = 1.0
) -> ExportRecord:
    return ExportRecord(
        origin=origin,
        namespace=ns,
        name=name,
        type=ServiceType.CLUSTERSET_IP,
        ports=(Port(port, "TCP", "http"),),
        created=created,
        version=1,
        ready_endpoints=1,
    )


def test_export_records_count_ready_endpoints_and_keep_creation_time(tmp_path: Path) -> None:
    (r,) = site(tmp_path).export_records()
    assert (r.origin, r.namespace, r.name, r.type) == (
        "a",
        "shop",
        "web",
        ServiceType.CLUSTERSET_IP,
    )
    assert r.ready_endpoints == 1
    assert r.endpoints == ()  # ClusterSetIP addresses are never replicated
    again = site(tmp_path).export_records()[0]
    assert again.created == r.created  # persisted: "oldest wins" survives restarts


def test_local_endpoint_maps_service_port_to_target_port_on_ready_endpoints(tmp_path: Path) -> None:
    s = site(tmp_path)
    assert {s.local_endpoint("shop", "web", 80) for _ in range(4)} == {("127.0.0.1", 8080)}
    assert s.local_endpoint("shop", "web", 81) is None
    assert s.local_endpoint("shop", "nope", 80) is None


def test_imports_get_stable_addresses_and_listeners_per_port(tmp_path: Path) -> None:
    s = site(tmp_path)
    assert s.update({ServiceKey("shop", "db"): (remote("b", "db", port=5432),)})
    (imp,) = s.imports
    assert imp.ips == ("127.90.0.2",)
    assert [(x.address, x.port, x.origins) for x in s.listeners] == [("127.90.0.2", 5432, ("b",))]
    assert not s.update({ServiceKey("shop", "db"): (remote("b", "db", port=5432),)})
    s2 = site(tmp_path)
    s2.update({ServiceKey("shop", "db"): (remote("b", "db", port=5432),)})
    assert s2.imports[0].ips == ("127.90.0.2",)  # same address after a restart


def test_namespaces_absent_locally_are_not_imported(tmp_path: Path) -> None:
    s = site(tmp_path, namespaces=["shop"])
    s.update({ServiceKey("other", "x"): (remote("b", "x", ns="other"),)})
    assert s.imports == ()
    s.update({ServiceKey("shop", "x"): (remote("b", "x"),)})
    assert [i.name for i in s.imports] == ["x"]


def test_union_of_ports_gives_a_listener_per_port_with_its_origins(tmp_path: Path) -> None:
    s = site(tmp_path)
    s.update(
        {ServiceKey("shop", "web"): (remote("b", "web", port=80), remote("c", "web", port=80))}
    )
    assert [(x.port, x.origins) for x in s.listeners] == [(80, ("b", "c"))]


async def test_as_a_platform_it_publishes_once_and_announces_views_that_changed(
    tmp_path: Path,
) -> None:
    s = site(tmp_path)
    published: list[list[ExportRecord]] = []
    views: list[ImportView] = []
    assert s.not_ready() is not None
    s.catalog_changed({ServiceKey("shop", "db"): (remote("b", "db"),)})  # before run: kept
    await s.run(lambda recs: published.append(list(recs)), views.append)
    assert s.not_ready() is None
    assert [[r.name for r in p] for p in published] == [["web"]]
    (first,) = views
    assert [i.name for i in first.imports] == ["db"]
    assert [(x.key.name, x.port, x.origins) for x in first.listeners] == [("db", 80, ("b",))]
    s.catalog_changed({ServiceKey("shop", "db"): (remote("b", "db"),)})  # the same: no view
    assert len(views) == 1
    s.catalog_changed({})
    assert views[-1] == ImportView()
    assert s.status() is None


def test_as_a_platform_it_reports_conflicts_with_their_winner(tmp_path: Path) -> None:
    s = site(tmp_path)
    old, new = remote("b", "db", port=80, created=1.0), remote("c", "db", port=81, created=2.0)
    new = dataclasses.replace(new, type=ServiceType.HEADLESS)
    s.catalog_changed({ServiceKey("shop", "db"): (old, new)})
    (c,) = s.conflicts()
    assert (c.service, c.winner) == (ServiceKey("shop", "db"), "b")
    assert c.reasons
