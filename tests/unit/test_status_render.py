"""`meshlink status` and `meshlink check` rendering from the status JSON."""

from meshlink.status import check, render

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
