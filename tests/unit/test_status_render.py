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
    assert [v for v, _ in check(STATUS)] == ["PASS", "PASS", "PASS", "WARN"]  # grant: loopback
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
    fails = [line for v, line in check(broken) if v == "FAIL"]
    assert any("link to b is connecting: connection refused" in f for f in fails)
    assert any("no reachable exporting site" in f for f in fails)
    lonely = {**STATUS, "links": [], "imports": []}
    assert any("meshlink token create" in line for v, line in check(lonely) if v == "FAIL")


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
    fails = [line for v, line in check(st) if v == "FAIL"]
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
        "PASS",
        "API server https://10.0.0.1:443 reachable, controller synced (2 exports, 3 imports)",
    ) in check(st)
    down = {**st, "kubernetes": {**k8s, "reachable": False, "unreachable_for_s": 12.5}}
    assert "(UNREACHABLE for 12.5 s)" in render(down)
    fails = [line for v, line in check(down) if v == "FAIL"]
    assert fails == [
        "API server https://10.0.0.1:443 unreachable for 12.5 s: exports and imports are "
        "frozen; check that it is up and that the kubeconfig or service account can reach it"
    ]
    syncing = {**st, "kubernetes": {**k8s, "synced": False}}
    assert any("has not finished listing" in line for v, line in check(syncing) if v == "FAIL")


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
    fails = [line for v, line in check(st) if v == "FAIL"]
    assert any("no reachable exporting site" in f for f in fails)
    assert any("cannot listen on 127.80.0.3:81" in f for f in fails)
    assert any("export conflict on demo/echo: type (site a's export wins" in f for f in fails)


def verdicts(st: object) -> list[tuple[str, str]]:
    return [(v, line) for v, line in check(st) if v != "PASS"]  # type: ignore[arg-type]


def test_check_says_a_refusing_peer_needs_a_new_token() -> None:
    refused = {
        **STATUS,
        "links": [
            {
                **STATUS["links"][0],  # type: ignore[dict-item]
                "state": "backoff",
                "last_error": "peer closed the link: NOT_AUTHORIZED (site c is not linked to b)",
                "refused": True,
            }
        ],
    }
    ((v, line),) = [x for x in verdicts(refused) if "refused" in x[1]]
    assert v == "FAIL"
    assert line.startswith("site b refused this site: its link was revoked or deleted there")
    assert "`meshlink token create` on b" in line
    assert "`meshlink link create TOKEN`" in line


def test_check_warns_before_a_down_links_certificate_expires() -> None:
    now = time.time()
    link = {**STATUS["links"][0], "state": "backoff", "cert_due": True}  # type: ignore[dict-item]
    soon = {**STATUS, "links": [{**link, "cert_expires": now + 5 * 3600}]}
    assert (
        "WARN",
        "the link certificate for b expires in 5 h ("
        + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now + 5 * 3600))
        + ") and the link is down: it is renewed without a token once b's grant endpoint "
        "answers (now: cannot reach the grant endpoint)",
    ) in verdicts(
        {
            **soon,
            "links": [{**soon["links"][0], "reauth_error": "cannot reach the grant endpoint"}],
        }
    )
    gone = {**STATUS, "links": [{**link, "cert_expires": now - 60}]}
    assert any(v == "FAIL" and "expired at" in line for v, line in verdicts(gone))
    up = {**STATUS, "links": [{**link, "state": "up", "cert_expires": now + 5 * 3600}]}
    assert not [x for x in verdicts(up) if "certificate" in x[1]]  # renewed over the link


def test_check_warns_of_the_sites_own_certificates_and_of_unusable_addresses() -> None:
    now = time.time()
    st = {
        **STATUS,
        "grant": "10.0.0.2:7444",
        "certs": {"ca_expires": now + 30 * 86400, "gateway_expires": now + 3 * 86400},
        "advertise": ["0.0.0.0:7443", "gw.example.net:7443", "169.254.1.1:7443"],
    }
    got = verdicts(st)
    assert (
        "WARN",
        "the site CA (not renewed by itself: a new CA means new links) expires in 30 d ("
        + time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now + 30 * 86400))
        + ")",
    ) in got
    assert any(
        v == "WARN" and line.startswith("the gateway certificate expires in 3 d") for v, line in got
    )
    assert (
        "FAIL",
        "gateway.advertise is 0.0.0.0:7443: 0.0.0.0 is no address another site can dial; set "
        "gateway.advertise to one it can reach",
    ) in got
    assert any(v == "WARN" and "link-local" in line for v, line in got)
    assert not any("gw.example.net" in line for _, line in got)  # a name: nothing to say


def test_check_shows_the_grace_period_and_peers_that_are_away() -> None:
    st = {
        **STATUS,
        "unreachable": [{"site": "a", "exports": 2, "grace_left_s": 250.0}],
        "peers": [{"site": "e", "up": False, "cert_expires": time.time() + 86400}],
    }
    got = verdicts(st)
    assert (
        "WARN",
        "site a is unreachable: its 2 export(s) stay, with no ready endpoint, for the rest of "
        "the grace period (4 min)",
    ) in got
    assert any(
        v == "WARN" and line.startswith("site e (it links to this site) is not connected")
        for v, line in got
    )


def test_check_exports_fails_an_unreachable_endpoint() -> None:
    from meshlink.status import check_exports

    rows = [
        {"service": "shop/web", "port": 80, "target": "10.0.0.5:8080", "error": None},
        {
            "service": "shop/web",
            "port": 80,
            "target": "10.0.0.6:8080",
            "error": "Connection refused",
        },
        {
            "service": "shop/db",
            "port": 5432,
            "target": None,
            "error": "no ready endpoint is configured",
        },
    ]
    assert check_exports(rows) == [  # type: ignore[arg-type]
        (
            "FAIL",
            "export shop/web port 80: 10.0.0.6:8080: Connection refused; flows from other sites "
            "to it fail: check the endpoint (is it running?)",
        ),
        (
            "FAIL",
            "export shop/db port 5432: no ready endpoint is configured; flows from other sites "
            "to it fail: check the endpoint (is it running?)",
        ),
    ]
    assert check_exports(rows[:1]) == [("PASS", "every exported endpoint answers (1 probed)")]  # type: ignore[arg-type]
    assert check_exports([]) == []
