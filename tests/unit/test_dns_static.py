"""Records files for ``meshlink dns --records``: parsed into ImportedServices, errors name
the offending key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshlink.catalog.records import ServiceType
from meshlink.dns.static import load_services, parse_services
from meshlink.errors import ConfigError

GOOD = """
services:
  - name: web
    namespace: default
    ips: [10.0.0.1, "fd00::1"]
    ports:
      - {port: 80, protocol: TCP, name: http}
      - {port: 42, protocol: UDP}
    clusters: [{cluster: east}]
  - name: db
    namespace: default
    type: Headless
    ports: [{port: 5432, name: pg}]
    clusters:
      - cluster: east
        endpoints:
          - {addresses: [10.1.2.3], hostname: db-0}
          - {addresses: [10.1.2.4, "fd00::4"], ready: false}
"""


def test_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "records.yaml"
    p.write_text(GOOD)
    web, db = load_services(p)
    assert web.type is ServiceType.CLUSTERSET_IP
    assert web.ips == ("10.0.0.1", "fd00::1")
    assert [(x.port, x.protocol, x.name) for x in web.ports] == [
        (80, "TCP", "http"),
        (42, "UDP", ""),
    ]
    assert db.type is ServiceType.HEADLESS
    assert db.clusters[0].cluster == "east"
    assert db.clusters[0].endpoints[0].hostname == "db-0"
    assert db.clusters[0].endpoints[1].ready is False
    assert db.clusters[0].endpoints[1].addresses == ("10.1.2.4", "fd00::4")


def test_json_file(tmp_path: Path) -> None:
    p = tmp_path / "records.json"
    p.write_text(json.dumps({"services": [{"name": "a", "namespace": "b", "ips": ["10.0.0.9"]}]}))
    (svc,) = load_services(p)
    assert (svc.namespace, svc.name, svc.ips) == ("b", "a", ("10.0.0.9",))


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"services": [{"name": "Web", "namespace": "d"}]}, "services[0].name"),
        ({"services": [{"name": "w"}]}, "services[0].namespace"),
        (
            {"services": [{"name": "w", "namespace": "d", "type": "ExternalName"}]},
            "services[0].type",
        ),
        (
            {"services": [{"name": "w", "namespace": "d", "ips": ["300.1.1.1"]}]},
            "services[0].ips[0]",
        ),
        (
            {"services": [{"name": "w", "namespace": "d", "ports": [{"port": 80}, {"port": 0}]}]},
            "services[0].ports[1].port",
        ),
        (
            {
                "services": [
                    {"name": "w", "namespace": "d", "ports": [{"port": 1, "protocol": "tcp"}]}
                ]
            },
            "services[0].ports[0].protocol",
        ),
        (
            {
                "services": [
                    {
                        "name": "w",
                        "namespace": "d",
                        "type": "Headless",
                        "clusters": [{"cluster": "c", "endpoints": [{"addresses": []}]}],
                    }
                ]
            },
            "services[0].clusters[0].endpoints[0].addresses",
        ),
        ({"services": [{"name": "w", "namespace": "d", "colour": "red"}]}, "services[0].colour"),
        (
            {
                "services": [
                    {"name": "w", "namespace": "d", "type": "Headless", "ips": ["10.0.0.1"]}
                ]
            },
            "services[0].ips",
        ),
        (
            {"services": [{"name": "w", "namespace": "d", "ips": ["10.0.0.1", "10.0.0.2"]}]},
            "services[0].ips",
        ),
        (
            {"services": [{"name": "w", "namespace": "d"}, {"name": "w", "namespace": "d"}]},
            "services[1]",
        ),
    ],
)
def test_errors_name_the_key(doc: object, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_services(doc, "f.yaml")
    assert e.value.key == key
    assert str(e.value).startswith(f"f.yaml: {key}: ")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_services(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_services(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="'services'"):
        load_services(top)
