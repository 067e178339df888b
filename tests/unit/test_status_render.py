"""`meshlink status` and `meshlink check` rendering from the status JSON."""

import json
import time
from pathlib import Path

from meshlink import config
from meshlink.catalog.records import ServiceKey, ServiceType
from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import Conflict, ImportedService, ListenerSpec
from meshlink.status import check, collect, render
from meshlink.tunnel import LinkStatus

STATUS = {
    "site": "c",
    "mode": "local",
    "version": "0.1.0",
    "uptime_s": 3.0,
    "gateway": "127.0.0.1:1",
    "grant": "127.0.0.1:2",
    "dns": "127.0.0.1:3",
    "zone": "clusterset.local",
    "ca_pin": "sha256:ab",
    "links": [
        {
            "peer": "b",
            "direction": "dial",
            "state": "up",
            "rtt_ms": 0.25,
            "flows": 1,
            "bytes_in": 2048,
            "bytes_out": 10,
            "last_error": None,
        }
    ],
    "sites": [
        {"site": "c", "hops": 0, "via": None, "path": []},
        {"site": "a", "hops": 2, "via": "b", "path": ["b", "a"]},
    ],
    "exports": [],
    "imports": [
        {
            "service": "demo/echo",
            "name": "echo.demo.svc.clusterset.local",
            "type": "ClusterSetIP",
            "ips": ["127.80.0.2"],
            "ports": [80],
            "clusters": ["a", "d"],
            "reachable": ["a"],
        }
    ],
    "conflicts": [],
}


def test_render_shows_links_paths_and_imports_on_one_screen() -> None:
    out = render(STATUS)
    assert "0.25 ms" in out
    assert "c > b > a" in out
    assert "echo.demo.svc.clusterset.local" in out
    assert "d (down)" in out
    assert len(out.splitlines()) < 40


def test_check_passes_healthy_and_names_what_is_wrong() -> None:
    assert all(ok for ok, _ in check(STATUS))
    broken = {
        **STATUS,
        "links": [
            {
                **STATUS["links"][0],
                "state": "connecting",  # type: ignore[dict-item]
                "last_error": "connection refused",
            }
        ],
        "imports": [{**STATUS["imports"][0], "reachable": []}],
    }  # type: ignore[dict-item]
    fails = [line for ok, line in check(broken) if not ok]
    assert any("link to b is connecting: connection refused" in f for f in fails)
    assert any("no reachable exporting site" in f for f in fails)
    lonely = {**STATUS, "links": [], "imports": []}
    assert any("meshlink token create" in line for ok, line in check(lonely) if not ok)


def test_check_names_an_import_listener_that_cannot_listen() -> None:
    st = {
        **STATUS,
        "listener_errors": [
            {
                "address": "0.0.0.0:20001",
                "service": "shop/web",
                "port": 80,
                "error": "Address already in use",
            }
        ],
    }
    assert "0.0.0.0:20001  Address already in use" in render(st)
    fails = [line for ok, line in check(st) if not ok]
    assert fails == [
        "import shop/web port 80: cannot listen on 0.0.0.0:20001: Address already in use; "
        "free that address or change the import range (imports.pool or kubernetes.importPorts)"
    ]


def test_kubernetes_mode_shows_and_checks_the_api_server() -> None:
    k8s = {
        "api_server": "https://10.0.0.1:443",
        "cluster_id": "c",
        "reachable": True,
        "unreachable_for_s": None,
        "synced": True,
        "exports": 2,
        "imports": 3,
        "import_ports": 3,
        "queued": 0,
    }
    st = {**STATUS, "mode": "kubernetes", "kubernetes": k8s}
    assert "kubernetes: API server https://10.0.0.1:443 (synced), 2 exports, 3 imports" in render(
        st
    )
    assert (
        True,
        "API server https://10.0.0.1:443 reachable, controller synced (2 exports, 3 imports)",
    ) in check(st)
    down = {**st, "kubernetes": {**k8s, "reachable": False, "unreachable_for_s": 12.5}}
    assert "(UNREACHABLE for 12.5 s)" in render(down)
    fails = [line for ok, line in check(down) if not ok]
    assert fails == [
        "API server https://10.0.0.1:443 unreachable for 12.5 s: exports and imports are "
        "frozen; check that it is up and that the kubeconfig or service account can reach it"
    ]
    syncing = {**st, "kubernetes": {**k8s, "synced": False}}
    assert any("has not finished listing" in line for ok, line in check(syncing) if not ok)


def test_collect_builds_the_schema_that_render_and_check_read(tmp_path: Path) -> None:
    cfg = config.parse({"site": "c", "stateDir": str(tmp_path)})
    cat = Catalog("c")
    cat.set_local([])
    key = ServiceKey("demo", "echo")
    imp = ImportedService("demo", "echo", ServiceType.CLUSTERSET_IP, ("127.80.0.2",), (), ())
    spec = ListenerSpec(key, "127.80.0.2", 80, 80, ("a",))
    busy = ListenerSpec(ServiceKey("demo", "busy"), "127.80.0.3", 81, 81, ("a",))
    link = LinkStatus("b", "dial", "up", 0.25, 0.25, 1.0, 10, 20, 1, None)
    st = collect(
        config=cfg,
        mode="local",
        started=time.time() - 3,
        dns_served=True,
        ca_pin="sha256:ab",
        links=[link],
        catalog=cat,
        imports=[imp],
        listeners=[spec],
        listener_errors=[(busy, "Address already in use")],
        conflicts=[Conflict(key, ("type",), "a")],
        platform=None,
    )
    assert st["site"] == "c"
    assert st["mode"] == "local"
    assert st["dns"] == "127.0.0.1:5353"
    assert st["links"][0]["peer"] == "b"
    assert st["links"][0]["flows"] == 1
    assert st["sites"] == [{"site": "c", "hops": 0, "via": None, "path": []}]
    assert st["imports"][0]["name"] == "echo.demo.svc.clusterset.local"
    assert st["imports"][0]["reachable"] == []  # site a has no live path from c
    assert st.get("listeners") == [{"address": "127.80.0.2:80", "service": "demo/echo", "port": 80}]
    assert st.get("conflicts") == [{"service": "demo/echo", "reasons": ["type"], "winner": "a"}]
    assert json.loads(json.dumps(st)) == st  # JSON as it is
    assert "127.80.0.3:81  Address already in use" in render(st)
    fails = [line for ok, line in check(st) if not ok]
    assert any("no reachable exporting site" in f for f in fails)
    assert any("cannot listen on 127.80.0.3:81" in f for f in fails)
    assert any("export conflict on demo/echo: type (site a's export wins" in f for f in fails)
