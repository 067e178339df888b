"""Export records on the wire: what a peer sends is checked field by field, and every
refusal names the field (the catalog refuses that entry and keeps the rest)."""

from __future__ import annotations

from typing import Any

import pytest

from meshlink.catalog.records import (
    Endpoint,
    ExportRecord,
    Port,
    ServiceType,
    check_peer_address,
    record_from_wire,
    record_to_wire,
)
from meshlink.errors import CatalogError

FULL = ExportRecord(
    origin="a",
    namespace="shop",
    name="web",
    type=ServiceType.HEADLESS,
    ports=(Port(80, "TCP", "http", "http"), Port(53, "UDP")),
    created=12.5,
    version=7,
    ready_endpoints=1,
    endpoints=(Endpoint(("10.0.0.1", "fd00::1"), "pod-0", True), Endpoint(("10.0.0.2",))),
    labels=(("tier", "front"),),
    annotations=(("team", "a"),),
    session_affinity="ClientIP",
    session_affinity_timeout=60,
    internal_traffic_policy="Local",
    traffic_distribution="PreferClose",
    ip_families=("IPv4", "IPv6"),
)


def test_every_field_round_trips() -> None:
    assert record_from_wire(record_to_wire(FULL)) == FULL


def wire(**change: Any) -> dict[str, Any]:
    d = record_to_wire(FULL)
    for k, v in change.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("not a dict", "record is not an object"),
        (wire(origin="A!"), "origin 'A!' is not a DNS label"),
        (wire(namespace="Shop"), "namespace 'Shop' is not a DNS label"),
        (wire(name="web_1"), "service name 'web_1' is not a DNS label"),
        (wire(name=7), "name 7 is not a string of at most 63"),
        (wire(type="NodePort"), "type 'NodePort' is not ClusterSetIP or Headless"),
        (wire(ports={}), "ports must be a list"),
        (wire(ports=[7]), "port 7 is not an object"),
        (wire(ports=[{"port": 80, "protocol": "HTTP"}]), "protocol 'HTTP' is not TCP"),
        (wire(ports=[{"port": 80, "name": "Web"}]), "port name 'Web' is not a DNS label"),
        (wire(ports=[{"port": 0}]), "port 0 is not an integer in [1, 65535]"),
        (wire(ports=[{"port": True}]), "port True is not an integer"),
        (wire(created=-1), "created -1 is not a timestamp"),
        (wire(created="now"), "created 'now' is not a timestamp"),
        (wire(endpoints={}), "endpoints must be a list"),
        (wire(endpoints=[1]), "endpoint is not an object"),
        (wire(endpoints=[{"addresses": []}]), "1 or 2 addresses"),
        (wire(endpoints=[{"addresses": ["10.0.0.1"], "hostname": "A"}]), "hostname 'A'"),
        (wire(endpoints=[{"addresses": [7]}]), "address 7 is not a string"),
        (wire(endpoints=[{"addresses": ["x"]}]), "address 'x' is not an IP address"),
        (wire(endpoints=[{"addresses": ["::ffff:127.0.0.1"]}]), "127.0.0.1 is loopback"),
        (wire(ipFamilies=["IPv5"]), "ipFamilies ['IPv5'] must be 1 or 2 of IPv4, IPv6"),
        (wire(sessionAffinityTimeout=0), "sessionAffinityTimeout 0 is out of range"),
        (wire(version=-1), "version -1 is not an integer"),
        (wire(ready="1"), "ready '1' is not an integer"),
        (wire(labels=[]), "labels must be a map of at most 64 entries"),
        (wire(labels={"k": 1}), "labels entry 'k' is not a short string pair"),
    ],
)
def test_refusals_name_the_field(bad: object, why: str) -> None:
    with pytest.raises(CatalogError) as err:
        record_from_wire(bad)
    assert why in str(err.value)


def test_optional_fields_default_and_own_addresses_are_not_checked_as_a_peers() -> None:
    minimal = wire(
        endpoints=...,
        labels=...,
        annotations=...,
        sessionAffinityTimeout=...,
        internalTrafficPolicy=...,
        trafficDistribution=...,
        ipFamilies=...,
        ready=...,
    )
    r = record_from_wire(minimal)
    assert (r.endpoints, r.labels, r.ready_endpoints, r.ip_families) == ((), (), 0, ("IPv4",))
    assert r.internal_traffic_policy is None
    own = wire(endpoints=[{"addresses": ["127.0.0.1"]}])
    assert record_from_wire(own, validate_addresses=False).endpoints[0].addresses == ("127.0.0.1",)
    with pytest.raises(CatalogError, match="'x' is not an IP address"):
        record_from_wire(wire(endpoints=[{"addresses": ["x"]}]), validate_addresses=False)
    with pytest.raises(CatalogError, match="7 is not a string"):
        record_from_wire(wire(endpoints=[{"addresses": [7]}]), validate_addresses=False)


def test_a_mapped_ipv6_address_is_the_ipv4_one() -> None:
    assert check_peer_address("::ffff:10.0.0.9") == "10.0.0.9"
