"""Config parsing: defaults, and errors that name the offending key."""

import re
from pathlib import Path

import pytest

from meshlink import config, names
from meshlink.errors import ConfigError


def test_minimal_config_has_loopback_defaults() -> None:
    c = config.parse({"site": "a", "stateDir": "/tmp/x"})
    assert c.site == "a"
    assert str(c.gateway_listen) == "127.0.0.1:7443"
    assert c.dns.zone == "clusterset.local"
    assert c.dns.ttl == 5
    assert c.advertise == (c.gateway_listen,)
    assert (c.max_streams_per_link, c.new_flows_per_second) == (512, 2000.0)


def test_export_parsed_with_target_port() -> None:
    c = config.parse(
        {
            "site": "a",
            "exports": [
                {
                    "name": "echo",
                    "namespace": "demo",
                    "ports": [{"name": "http", "port": 80, "targetPort": 9000}],
                    "endpoints": ["127.0.0.1", {"address": "::1", "hostname": "web-0"}],
                }
            ],
        }
    )
    (e,) = c.exports
    assert (e.name, e.namespace) == ("echo", "demo")
    assert e.ports[0].target_port == 9000
    assert e.ports[0].protocol == "TCP"
    assert [x.address for x in e.endpoints] == ["127.0.0.1", "::1"]
    assert e.endpoints[1].hostname == "web-0"


def test_kubernetes_import_listeners() -> None:
    c = config.parse({"site": "a", "kubernetes": {}})
    assert c.kubernetes is not None
    assert (c.kubernetes.import_address, c.kubernetes.import_ports) == ("0.0.0.0", (20000, 29999))
    c = config.parse(
        {"site": "a", "kubernetes": {"importAddress": "::", "importPorts": "41000-41099"}}
    )
    assert c.kubernetes is not None
    assert (c.kubernetes.import_address, c.kubernetes.import_ports) == ("::", (41000, 41099))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({}, "site"),
        ({"site": "Not_A_Label"}, "site"),
        ({"site": "a", "gateway": {"listen": "nope"}}, "gateway.listen"),
        ({"site": "a", "bogus": 1}, "bogus"),
        ({"site": "a", "exports": [{"name": "x", "ports": []}]}, "exports[0].ports"),
        (
            {"site": "a", "exports": [{"name": "x", "ports": [{"port": 0}]}]},
            "exports[0].ports[0].port",
        ),
        (
            {"site": "a", "exports": [{"name": "x", "ports": [{"port": 1}], "endpoints": ["h"]}]},
            "exports[0].endpoints[0]",
        ),
        ({"site": "a", "dns": {"ttl": -1}}, "dns.ttl"),
        ({"site": "a", "imports": {"pool": "10.0.0.0/31"}}, "imports.pool"),
        ({"site": "a", "kubernetes": {"importPorts": "30000"}}, "kubernetes.importPorts"),
        ({"site": "a", "kubernetes": {"state": "etcd"}}, "kubernetes.state"),
        ({"site": "a", "kubernetes": {"importPorts": "900-1000"}}, "kubernetes.importPorts"),
        ({"site": "a", "kubernetes": {"importPorts": "2-1"}}, "kubernetes.importPorts"),
        ({"site": "a", "kubernetes": {"importPorts": "²-3"}}, "kubernetes.importPorts"),
        ({"site": "a", "ops": {"listen": "0.0.0.0:²"}}, "ops.listen"),
        (
            {"site": "a", "ops": {"listen": "0.0.0.0:20500"}, "kubernetes": {}},
            "kubernetes.importPorts",
        ),
        ({"site": "a", "kubernetes": {"importAddress": "pod"}}, "kubernetes.importAddress"),
        ({"site": "a", "gateway": {"maxStreamsPerLink": 0}}, "gateway.maxStreamsPerLink"),
        ({"site": "a", "gateway": {"newFlowsPerSecond": "fast"}}, "gateway.newFlowsPerSecond"),
    ],
)
def test_errors_name_the_key(data: object, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(data, source="site.yaml")
    assert str(ei.value).startswith(f"site.yaml: {key}: "), str(ei.value)
    assert ei.value.key == key


def test_unreadable_and_invalid_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        config.load(bad)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a", True),
        ("web-0", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("-a", False),
        ("a-", False),
        ("A", False),
        ("a.b", False),
        ("", False),
        ("abc\n", False),  # a regex `$` would accept this from a peer
        (None, False),
    ],
)
def test_one_dns_label_predicate(value: object, ok: bool) -> None:
    assert names.is_dns_label(value) is ok


def test_peer_record_with_newline_in_a_name_is_refused() -> None:
    from meshlink.catalog.records import (
        ExportRecord,
        Port,
        ServiceType,
        record_from_wire,
        record_to_wire,
    )
    from meshlink.errors import CatalogError

    good = record_to_wire(
        ExportRecord("b", "ns", "web", ServiceType.CLUSTERSET_IP, (Port(80),), 1.0, 1)
    )
    for field in ("origin", "namespace", "name"):
        with pytest.raises(CatalogError):
            record_from_wire({**good, field: good[field] + "\n"})


def test_a_directory_is_its_yaml_files_merged_in_name_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """How a ConfigMap is mounted: a shared config.yaml, and a site.yaml from an overlay."""
    (tmp_path / "config.yaml").write_text(
        "site: base\nstateDir: /var/lib/meshlink\n"
        "gateway: {listen: 0.0.0.0:7443}\ndns: {listen: 0.0.0.0:5353, ttl: 5}\n"
    )
    (tmp_path / "site.yaml").write_text(
        "site: c1\ngateway: {advertise: [172.18.0.2:30443]}\ndns: {ttl: 7}\n"
    )
    (tmp_path / ".hidden.yaml").write_text("site: nope\n")
    (tmp_path / "notes.txt").write_text("site: nope\n")
    cfg = config.load(tmp_path)
    assert cfg.site == "c1"
    assert cfg.gateway_listen == config.HostPort("0.0.0.0", 7443)  # kept from config.yaml
    assert cfg.advertise == (config.HostPort("172.18.0.2", 30443),)
    assert cfg.dns.listen == config.HostPort("0.0.0.0", 5353)  # merged, not replaced
    assert cfg.dns.ttl == 7
    assert "config.yaml + site.yaml" in cfg.source


def test_a_directory_errors_name_the_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"without \*\.yaml files"):
        config.load(tmp_path)
    (tmp_path / "config.yaml").write_text("site: a\n")
    (tmp_path / "site.yaml").write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match=r"site\.yaml: must be a mapping"):
        config.load(tmp_path)
    (tmp_path / "site.yaml").write_text("gateway: {listen: nowhere}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml \+ site\.yaml\): gateway\.listen: "):
        config.load(tmp_path)


def test_a_minimal_file_gets_the_dataclasses_defaults() -> None:
    """Defaults are written once, on the dataclass fields: parsing nothing gives them."""
    cfg = config.parse({"site": "a", "stateDir": "/tmp/x", "kubernetes": {}})
    assert cfg == config.SiteConfig(
        site="a",
        state_dir=Path("/tmp/x"),
        kubernetes=config.KubernetesConfig(),
        source="<config>",
    )


@pytest.mark.parametrize(
    ("text", "lenient", "strict"),
    [
        ("a:1", ("a", 1), ("a", 1)),
        ("[fd00::1]:7443", ("fd00::1", 7443), ("fd00::1", 7443)),
        ("h:0", ("h", 0), None),  # port 0: bind anywhere (config), never a peer's
        ("[h]:1", ("h", 1), None),  # brackets are for IPv6
        ("fd00::1:80", ("fd00::1", 80), None),  # IPv6 without brackets
        ("h_x:1", ("h_x", 1), None),  # not a host name
        ("h:²", None, None),
        ("h:65536", None, None),
        (":80", None, None),
        ("h", None, None),
    ],
)
def test_host_port_text_one_parser_two_strictnesses(
    text: str, lenient: tuple[str, int] | None, strict: tuple[str, int] | None
) -> None:
    for is_strict, want in ((False, lenient), (True, strict)):
        if want is None:
            with pytest.raises(ValueError, match=re.escape(repr(text))):
                names.split_hostport(text, strict=is_strict)
        else:
            assert names.split_hostport(text, strict=is_strict) == want
