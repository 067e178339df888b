"""KEP-1645 merge: oldest export wins, ports are the union, conflicts named."""

from __future__ import annotations

import pytest

from meshlink.catalog.merge import merge
from meshlink.catalog.records import ExportRecord, Port, ServiceType


def rec(origin: str, created: float, *ports: Port, **kw: object) -> ExportRecord:
    base = ExportRecord(
        origin=origin,
        namespace="demo",
        name="web",
        type=ServiceType.CLUSTERSET_IP,
        ports=ports or (Port(80, "TCP", "http"),),
        created=created,
        version=1,
    )
    import dataclasses

    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_agreeing_exports_have_no_conflict() -> None:
    m = merge([rec("b", 2), rec("a", 1)])
    assert m.winner.origin == "a"
    assert m.conflicts == ()
    assert m.clusters == ("a", "b")
    assert m.origins_for_port(80) == ("a", "b")


def test_oldest_wins_then_cluster_id_breaks_ties() -> None:
    assert merge([rec("b", 1), rec("a", 1)]).winner.origin == "a"
    assert merge([rec("a", 5), rec("z", 1)]).winner.origin == "z"


def test_ports_are_the_union_by_name_then_protocol_and_port() -> None:
    """Different port sets are served as their union, and are a PortConflict: the MCS API
    calls it one whenever "the ports are not identical in all the constituent Services".
    (This test used to assert no conflict here: a narrower rule than the spec's.)"""
    m = merge(
        [
            rec("a", 1, Port(80, "TCP", "http")),
            rec("b", 2, Port(80, "TCP", "http"), Port(443, "TCP", "https")),
            rec("c", 3, Port(53, "UDP", "")),
        ]
    )
    assert [p.port for p in m.ports] == [80, 443, 53]
    assert m.conflicts == ("PortConflict",)
    assert m.origins_for_port(80) == ("a", "b")
    assert m.origins_for_port(443) == ("b",)
    assert m.origins_for_port(53, "UDP") == ("c",)


def test_an_extra_port_in_one_cluster_is_a_port_conflict() -> None:
    """The upstream conformance case: tcp/42 + udp/42 here, tcp/42 + sctp/142 there."""
    here = (Port(42, "TCP", "tcp"), Port(42, "UDP", "udp"))
    there = (Port(42, "TCP", "tcp"), Port(142, "SCTP", "stcp"))
    m = merge([rec("a", 1, *here), rec("b", 2, *there)])
    assert m.conflicts == ("PortConflict",)
    assert sorted((p.name, p.protocol, p.port) for p in m.ports) == [
        ("stcp", "SCTP", 142),
        ("tcp", "TCP", 42),
        ("udp", "UDP", 42),
    ]
    assert m.origins_for_port(42) == ("a", "b")
    assert m.origins_for_port(42, "UDP") == ("a",)
    assert m.origins_for_port(142, "SCTP") == ("b",)


def test_the_same_ports_in_another_order_are_no_conflict() -> None:
    a = (Port(80, "TCP", "http"), Port(443, "TCP", "https"))
    m = merge([rec("a", 1, *a), rec("b", 2, *reversed(a))])
    assert m.conflicts == ()
    assert m.origins_for_port(443) == ("a", "b")


def test_another_app_protocol_is_a_port_conflict() -> None:
    m = merge([rec("a", 1, Port(80, "TCP", "http")), rec("b", 2, Port(80, "TCP", "http", "h2c"))])
    assert m.conflicts == ("PortConflict",)
    assert m.ports == (Port(80, "TCP", "http"),)


def test_port_conflict_keeps_the_oldest_definition() -> None:
    m = merge([rec("b", 2, Port(8080, "TCP", "http")), rec("a", 1, Port(80, "TCP", "http"))])
    assert m.conflicts == ("PortConflict",)
    assert [p.port for p in m.ports] == [80]
    assert m.origins_for_port(80) == ("a",)


def test_type_conflict_serves_only_the_winners_type() -> None:
    m = merge([rec("a", 1), rec("b", 2, type=ServiceType.HEADLESS)])
    assert m.type is ServiceType.CLUSTERSET_IP
    assert "TypeConflict" in m.conflicts
    assert m.clusters == ("a",)
    assert [r.origin for r in m.exports] == ["a", "b"]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("session_affinity", "ClientIP", "SessionAffinityConflict"),
        ("session_affinity_timeout", 30, "SessionAffinityConfigConflict"),
        ("labels", (("tier", "web"),), "LabelsConflict"),
        ("annotations", (("a", "b"),), "AnnotationsConflict"),
        ("internal_traffic_policy", "Local", "InternalTrafficPolicyConflict"),
        ("traffic_distribution", "PreferClose", "TrafficDistributionConflict"),
        ("ip_families", ("IPv6",), "IPFamilyConflict"),
    ],
)
def test_each_global_property_conflict_is_named(field: str, value: object, reason: str) -> None:
    m = merge([rec("a", 1), rec("b", 2, **{field: value})])
    assert m.conflicts == (reason,)
    assert getattr(m.winner, field) != value


def test_empty_or_mixed_input_is_a_bug() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge([])
    with pytest.raises(ValueError, match="different services"):
        merge([rec("a", 1), rec("b", 1, name="other")])


def test_a_port_nobody_exports_has_no_origins() -> None:
    m = merge([rec("a", 1.0, Port(80, "TCP", "http"))])
    assert m.origins_for_port(80) == ("a",)
    assert m.origins_for_port(9999) == ()
    assert m.origins_for_port(80, "UDP") == ()
