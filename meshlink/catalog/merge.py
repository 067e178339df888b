"""The KEP-1645 merge of one service's exports from several clusters.

Pure functions. The oldest export (creation time, then origin id) wins every global
property; ports are the union (merged by name, then by protocol and port); every
disagreement is a conflict reason, reported on every export of the service in every
cluster (the MCS ``Conflict`` condition).

A port conflict is any difference between the constituent Services' port sets, not only a
clash of one name or one (protocol, port): the MCS API defines ``PortConflict`` as "the
ports are not identical in all the constituent Services" (v1beta1 ServiceExport
conditions), and the upstream conformance suite expects it when one cluster exports
tcp/42 + udp/42 and another tcp/42 + sctp/142. The union is still served, each port only
by the clusters that expose it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshlink.catalog.records import ExportRecord, Port, ServiceKey, ServiceType

# Condition reasons, in the order they are reported (MCS API v1beta1).
PORT_CONFLICT = "PortConflict"
TYPE_CONFLICT = "TypeConflict"
SESSION_AFFINITY_CONFLICT = "SessionAffinityConflict"
SESSION_AFFINITY_CONFIG_CONFLICT = "SessionAffinityConfigConflict"
LABELS_CONFLICT = "LabelsConflict"
ANNOTATIONS_CONFLICT = "AnnotationsConflict"
INTERNAL_TRAFFIC_POLICY_CONFLICT = "InternalTrafficPolicyConflict"
TRAFFIC_DISTRIBUTION_CONFLICT = "TrafficDistributionConflict"
IP_FAMILY_CONFLICT = "IPFamilyConflict"


@dataclass(frozen=True, slots=True)
class MergedService:
    """The clusterset view of one service.

    ``exports`` holds every export, oldest first; ``serving`` those whose type matches the
    winner's (the only ones traffic and DNS use). ``port_origins`` maps each union port to
    the origins that expose exactly that port: a conflicting port only reaches them.
    """

    key: ServiceKey
    winner: ExportRecord
    exports: tuple[ExportRecord, ...]
    serving: tuple[ExportRecord, ...]
    ports: tuple[Port, ...]
    port_origins: tuple[tuple[Port, tuple[str, ...]], ...]
    conflicts: tuple[str, ...]

    @property
    def type(self) -> ServiceType:
        return self.winner.type

    @property
    def clusters(self) -> tuple[str, ...]:
        """Origins of the serving exports, sorted."""
        return tuple(sorted(r.origin for r in self.serving))

    def origins_for_port(self, port: int, protocol: str = "TCP") -> tuple[str, ...]:
        for p, origins in self.port_origins:
            if p.port == port and p.protocol == protocol:
                return origins
        return ()


def age_order(r: ExportRecord) -> tuple[float, str]:
    return (r.created, r.origin)


def _union_ports(
    exports: tuple[ExportRecord, ...],
) -> tuple[list[Port], dict[Port, list[str]], bool]:
    union: list[Port] = []
    by_name: dict[str, Port] = {}
    by_num: dict[tuple[str, int], Port] = {}
    origins: dict[Port, list[str]] = {}
    # Identical means the same set of ports: their order in a Service does not matter.
    conflict = len({frozenset(rec.ports) for rec in exports}) > 1
    for rec in exports:
        for p in rec.ports:
            existing = by_name.get(p.name) if p.name else None
            if existing is None:
                existing = by_num.get((p.protocol, p.port))
            if existing is None:
                union.append(p)
                if p.name:
                    by_name[p.name] = p
                by_num[(p.protocol, p.port)] = p
                origins[p] = [rec.origin]
            elif (existing.name, existing.protocol, existing.port) == (
                p.name,
                p.protocol,
                p.port,
            ) and rec.origin not in origins[existing]:
                origins[existing].append(rec.origin)
            # Otherwise a clash of name or number: the older definition stays (the port sets
            # differ, so it is a conflict already).
    return union, origins, conflict


def merge(records: Iterable[ExportRecord]) -> MergedService:
    """Merge every origin's export of one service. ``records`` must share one key."""
    exports = tuple(sorted(records, key=age_order))
    if not exports:
        raise ValueError("merge() needs at least one export")
    winner = exports[0]
    if any(r.key != winner.key for r in exports):
        raise ValueError("merge() got exports of different services")
    reasons: list[str] = []
    serving = tuple(r for r in exports if r.type == winner.type)
    union, origins, port_conflict = _union_ports(serving)
    checks = (
        (PORT_CONFLICT, port_conflict),
        (TYPE_CONFLICT, len(serving) != len(exports)),
        (SESSION_AFFINITY_CONFLICT, _differs(exports, lambda r: r.session_affinity)),
        (
            SESSION_AFFINITY_CONFIG_CONFLICT,
            _differs(exports, lambda r: r.session_affinity_timeout),
        ),
        (LABELS_CONFLICT, _differs(exports, lambda r: r.labels)),
        (ANNOTATIONS_CONFLICT, _differs(exports, lambda r: r.annotations)),
        (INTERNAL_TRAFFIC_POLICY_CONFLICT, _differs(exports, lambda r: r.internal_traffic_policy)),
        (TRAFFIC_DISTRIBUTION_CONFLICT, _differs(exports, lambda r: r.traffic_distribution)),
        (IP_FAMILY_CONFLICT, _differs(exports, lambda r: r.ip_families)),
    )
    reasons = [reason for reason, hit in checks if hit]
    return MergedService(
        key=winner.key,
        winner=winner,
        exports=exports,
        serving=serving,
        ports=tuple(union),
        port_origins=tuple((p, tuple(sorted(origins[p]))) for p in union),
        conflicts=tuple(reasons),
    )


def _differs(exports: tuple[ExportRecord, ...], attr: Callable[[ExportRecord], object]) -> bool:
    first = attr(exports[0])
    return any(attr(r) != first for r in exports[1:])
