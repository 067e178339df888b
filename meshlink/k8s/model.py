"""Pure translation between Kubernetes objects (JSON dicts) and the catalog.

Export side: a ServiceExport, its Service and the Service's EndpointSlices become an
``ExportRecord`` (or a refusal with its ``Valid`` reason). Import side: a ``MergedService``
becomes the bodies meshlink server-side-applies (derived Service, ServiceImport and its
status, EndpointSlices). Conditions follow metav1.Condition: ``lastTransitionTime`` moves
only when the status does. No I/O here; everything is unit-tested on plain dicts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from meshlink.catalog.merge import MergedService
from meshlink.catalog.records import (
    MAX_ENDPOINTS,
    Endpoint,
    ExportRecord,
    Port,
    ServiceKey,
    ServiceType,
)
from meshlink.catalog.view import ClusterEndpoints, ImportedService, ListenerSpec, ReplicaPod
from meshlink.names import address_family

Obj = dict[str, Any]
"""A Kubernetes object as JSON."""

EXPORT_ANNOTATION: Final = "meshlink.io/export"
AUTO_EXPORT_ANNOTATION: Final = "meshlink.io/auto-export"
"""Set on ServiceExports meshlink created for an annotated Service: only those it deletes."""
SPEC_HASH_ANNOTATION: Final = "meshlink.io/spec-hash"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "meshlink"
SLICE_MANAGED_BY_LABEL: Final = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER: Final = "meshlink.io"
MCS_SERVICE_NAME: Final = "multicluster.kubernetes.io/service-name"
MCS_SOURCE_CLUSTER: Final = "multicluster.kubernetes.io/source-cluster"
K8S_SERVICE_NAME: Final = "kubernetes.io/service-name"
DERIVED_ANNOTATION: Final = "multicluster.kubernetes.io/derived-service"
MCS_API_VERSION: Final = "multicluster.x-k8s.io/v1beta1"

# Condition types and reasons (MCS API v1beta1).
VALID: Final = "Valid"
READY: Final = "Ready"
CONFLICT: Final = "Conflict"
REASON_VALID: Final = "Valid"
REASON_NO_SERVICE: Final = "NoService"
REASON_INVALID_TYPE: Final = "InvalidServiceType"
REASON_NAMESPACE_REFUSED: Final = "NamespaceNotAllowed"
REASON_EXPORTED: Final = "Exported"
REASON_PENDING: Final = "Pending"
REASON_FAILED: Final = "Failed"
REASON_NO_CONFLICTS: Final = "NoConflicts"
REASON_READY: Final = "Ready"


def derived_name(namespace: str, name: str) -> str:
    """The reference controller's derived Service name: ``derived-`` and 10 characters of
    the lowercase base32 (extended hex alphabet, no padding) SHA-256 of ``<ns>/<name>``."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return "derived-" + base64.b32hexencode(digest).decode().rstrip("=").lower()[:10]


def parse_time(value: object) -> float:
    """RFC 3339 (metav1.Time) to epoch seconds; 0.0 if absent or malformed."""
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def spec_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    v = meta(obj).get("labels")
    return v if isinstance(v, dict) else {}


def annots(obj: Mapping[str, Any]) -> Mapping[str, str]:
    v = meta(obj).get("annotations")
    return v if isinstance(v, dict) else {}


def is_managed(obj: Mapping[str, Any]) -> bool:
    return labels(obj).get(MANAGED_BY_LABEL) == MANAGED_BY


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""


def next_conditions(
    current: Iterable[Mapping[str, Any]],
    desired: Sequence[Condition],
    generation: int,
    now: str,
) -> list[Obj] | None:
    """The new ``status.conditions`` list, or None when nothing would change.

    Conditions of types meshlink does not own are kept as they are. ``lastTransitionTime``
    is kept when the status is unchanged, set to ``now`` otherwise.
    """
    by_type = {str(c.get("type")): c for c in current}
    owned = {d.type for d in desired}
    out: list[Obj] = []
    changed = False
    for d in desired:
        old = by_type.get(d.type)
        same_status = old is not None and old.get("status") == d.status
        transition = str(old.get("lastTransitionTime") or now) if old and same_status else now
        new = {
            "type": d.type,
            "status": d.status,
            "reason": d.reason,
            "message": d.message,
            "lastTransitionTime": transition,
            "observedGeneration": generation,
        }
        if old is None or any(old.get(k) != v for k, v in new.items()):
            changed = True
        out.append(new)
    out.extend(dict(c) for t, c in by_type.items() if t not in owned)
    return out if changed else None


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One Event to record about an object (``kubectl describe`` lists them)."""

    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    note: str


def condition_events(
    current: Iterable[Mapping[str, Any]], desired: Sequence[Condition]
) -> list[EventSpec]:
    """The Events worth a user's attention when a ServiceExport's conditions go from
    ``current`` to ``desired``: it became exported, invalid, failed, or conflicting, or a
    conflict or a refusal ended. Steady states and transient ``Pending`` say nothing."""
    by_type = {str(c.get("type")): c for c in current}
    out: list[EventSpec] = []
    for d in desired:
        old = by_type.get(d.type)
        if old is not None and (old.get("status"), old.get("reason")) == (d.status, d.reason):
            continue
        was_bad = old is not None and old.get("status") == (
            "True" if d.type == "Conflict" else "False"
        )
        note = d.message or d.reason
        bad = (d.type == "Conflict" and d.status == "True") or (
            d.type in ("Valid", "Ready") and d.status == "False" and d.reason != "Pending"
        )
        if d.type == "Ready" and d.status == "True":
            out.append(
                EventSpec("Normal", d.reason, note if d.message else "exported to the clusterset")
            )
        elif bad:
            out.append(EventSpec("Warning", d.reason, note))
        elif was_bad:
            out.append(EventSpec("Normal", d.reason, note))
    return out


def event_body(
    spec: EventSpec, regarding: Mapping[str, Any], *, controller: str, instance: str, epoch: float
) -> Obj:
    """An ``events.k8s.io/v1`` Event about ``regarding`` (a full object)."""
    m = meta(regarding)
    micro = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1e6):06d}Z"
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {
            "name": f"{m.get('name')}.{int(epoch * 1e9):x}",
            "namespace": m.get("namespace"),
        },
        "eventTime": micro,
        "reportingController": controller,
        "reportingInstance": instance,
        "action": "Reconcile",
        "type": spec.type,
        "reason": spec.reason,
        "note": spec.note[:1024],
        "regarding": {
            "apiVersion": regarding.get("apiVersion"),
            "kind": regarding.get("kind"),
            "name": m.get("name"),
            "namespace": m.get("namespace"),
            "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"),
        },
    }


# --------------------------------------------------------------------------- export side


@dataclass(frozen=True, slots=True)
class ExportEvaluation:
    """What one ServiceExport amounts to: a record (version 0, set by the caller) or a
    refusal, and the ``Valid`` condition that says which."""

    record: ExportRecord | None
    valid: Condition


def ports_of(svc: Mapping[str, Any]) -> tuple[Port, ...]:
    out = []
    for p in (svc.get("spec") or {}).get("ports") or []:
        out.append(
            Port(
                port=int(p.get("port", 0)),
                protocol=str(p.get("protocol") or "TCP"),
                name=str(p.get("name") or ""),
                app_protocol=str(p.get("appProtocol") or ""),
            )
        )
    return tuple(out)


def _is_ready(ep: Mapping[str, Any]) -> bool:
    # An unset ready condition means ready (discovery.k8s.io/v1 semantics).
    return (ep.get("conditions") or {}).get("ready") is not False


def endpoints_of(slices: Iterable[Mapping[str, Any]]) -> tuple[int, tuple[Endpoint, ...]]:
    """Ready endpoints of a Service's EndpointSlices: their count (one per pod, dual-stack
    slices merged by targetRef) and the endpoints themselves, sorted, at most MAX_ENDPOINTS."""
    merged: dict[str, tuple[list[str], str]] = {}
    for sl in slices:
        for ep in sl.get("endpoints") or []:
            if not _is_ready(ep):
                continue
            addrs = [str(a) for a in ep.get("addresses") or []]
            if not addrs:
                continue
            ref = ep.get("targetRef") or {}
            ident = str(ref.get("uid") or ref.get("name") or "") or addrs[0]
            addrs_have, hostname = merged.get(ident, ([], str(ep.get("hostname") or "")))
            for a in addrs:
                if a not in addrs_have and len(addrs_have) < 2:
                    addrs_have.append(a)
            merged[ident] = (addrs_have, hostname)
    eps = sorted(
        (Endpoint(addresses=tuple(_sort_addrs(a)), hostname=h) for a, h in merged.values()),
        key=lambda e: (e.addresses, e.hostname),
    )
    return len(eps), tuple(eps[:MAX_ENDPOINTS])


def _sort_addrs(addrs: list[str]) -> list[str]:
    return sorted(addrs, key=lambda a: (":" in a, a))


def evaluate_export(
    svcex: Mapping[str, Any],
    svc: Mapping[str, Any] | None,
    slices: Iterable[Mapping[str, Any]],
    *,
    origin: str,
    export_kube_system: bool = False,
) -> ExportEvaluation:
    """Turn a ServiceExport (and what it points at) into a record, or refuse it."""
    m = meta(svcex)
    namespace, name = str(m.get("namespace", "")), str(m.get("name", ""))
    if namespace == "kube-system" and not export_kube_system:
        return ExportEvaluation(
            None,
            Condition(
                VALID,
                "False",
                REASON_NAMESPACE_REFUSED,
                "exports from kube-system are refused; set kubernetes.exportKubeSystem to allow",
            ),
        )
    if svc is None:
        return ExportEvaluation(
            None,
            Condition(VALID, "False", REASON_NO_SERVICE, f"Service {namespace}/{name} not found"),
        )
    spec = svc.get("spec") or {}
    stype = spec.get("type") or "ClusterIP"
    if stype == "ExternalName":
        return ExportEvaluation(
            None,
            Condition(
                VALID,
                "False",
                REASON_INVALID_TYPE,
                "ExternalName Services cannot be exported",
            ),
        )
    headless = spec.get("clusterIP") == "None"
    count, eps = endpoints_of(slices)
    affinity = str(spec.get("sessionAffinity") or "None")
    timeout: int | None = None
    if affinity == "ClientIP":
        raw = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get(
            "timeoutSeconds"
        )
        timeout = int(raw) if isinstance(raw, int) else 10800
    ex_spec = svcex.get("spec") or {}
    fams = tuple(str(f) for f in spec.get("ipFamilies") or ()) or ("IPv4",)
    record = ExportRecord(
        origin=origin,
        namespace=namespace,
        name=name,
        type=ServiceType.HEADLESS if headless else ServiceType.CLUSTERSET_IP,
        ports=ports_of(svc),
        created=parse_time(m.get("creationTimestamp")),
        version=0,
        ready_endpoints=count,
        endpoints=eps if headless else (),
        labels=_str_pairs(ex_spec.get("exportedLabels")),
        annotations=_str_pairs(ex_spec.get("exportedAnnotations")),
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        internal_traffic_policy=spec.get("internalTrafficPolicy") or None,
        traffic_distribution=spec.get("trafficDistribution") or None,
        ip_families=fams[:2],
    )
    return ExportEvaluation(record, Condition(VALID, "True", REASON_VALID, ""))


def _str_pairs(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def export_conditions(
    evaluation: ExportEvaluation, in_catalog: bool, merged: MergedService | None
) -> tuple[Condition, ...]:
    """Valid, Ready and Conflict for one ServiceExport."""
    if evaluation.record is None:
        return (
            evaluation.valid,
            Condition(READY, "False", REASON_FAILED, evaluation.valid.message),
            Condition(CONFLICT, "False", REASON_NO_CONFLICTS, ""),
        )
    ready = (
        Condition(READY, "True", REASON_EXPORTED, "")
        if in_catalog
        else Condition(READY, "False", REASON_PENDING, "waiting for the catalog")
    )
    origin = evaluation.record.origin
    if merged is not None and merged.conflicts and any(r.origin == origin for r in merged.exports):
        winner = merged.winner.origin
        conflict = Condition(
            CONFLICT,
            "True",
            ",".join(merged.conflicts),
            f"exports disagree; the oldest export (cluster {winner}) wins",
        )
    else:
        conflict = Condition(CONFLICT, "False", REASON_NO_CONFLICTS, "")
    return (evaluation.valid, ready, conflict)


def service_export_body(namespace: str, name: str) -> Obj:
    """The ServiceExport meshlink creates for a Service annotated ``meshlink.io/export``."""
    return {
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceExport",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {AUTO_EXPORT_ANNOTATION: "true"},
        },
    }


def wants_export(svc: Mapping[str, Any] | None) -> bool:
    return svc is not None and annots(svc).get(EXPORT_ANNOTATION) == "true"


def is_auto_export(svcex: Mapping[str, Any]) -> bool:
    return annots(svcex).get(AUTO_EXPORT_ANNOTATION) == "true" and is_managed(svcex)


# --------------------------------------------------------------------------- import side


def service_port_names(ports: Sequence[Port]) -> list[str]:
    """Names for the derived Service's ports: a multi-port Service needs every port named,
    and its EndpointSlices must use the same names for kube-proxy to match them."""
    if len(ports) == 1:
        return [ports[0].name]
    taken = {p.name for p in ports if p.name}
    out = []
    for p in ports:
        if p.name:
            out.append(p.name)
            continue
        base = f"{p.protocol.lower()}-{p.port}"
        cand, i = base, 1
        while cand in taken:
            i += 1
            cand = f"{base}-{i}"
        taken.add(cand)
        out.append(cand)
    return out


def _with_hash(body: Obj) -> Obj:
    body["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash(body)
    return body


def _import_labels(key: ServiceKey) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGED_BY, MCS_SERVICE_NAME: key.name}


TargetPorts = Mapping[tuple[str, int], int]
"""(protocol, service port) -> the gateway port that carries it (see k8s/ports.py)."""


def derived_service_body(merged: MergedService, target_ports: TargetPorts) -> Obj:
    """The derived Service: its ClusterIP is the clusterset IP (none for Headless). It has
    no selector: only meshlink's EndpointSlices back it (ClusterSetIP: the gateway pods,
    which tunnel the traffic, ready while some source cluster has ready endpoints;
    Headless: the remote endpoints). A selector would have the cluster's EndpointSlice
    controller publish the gateway pods too, ready or not. Each port's ``targetPort`` is
    the gateway port allocated to it."""
    key = merged.key
    names = service_port_names(merged.ports)
    spec: Obj = {
        "ports": [
            {
                "name": n,
                "protocol": p.protocol,
                "port": p.port,
                "targetPort": target_ports.get((p.protocol, p.port), p.port),
            }
            | ({"appProtocol": p.app_protocol} if p.app_protocol else {})
            for n, p in zip(names, merged.ports, strict=True)
        ],
    }
    if not spec["ports"]:
        # A Service needs a port; an export without ports still gets its clusterset IP.
        spec["ports"] = [{"name": "none", "protocol": "TCP", "port": 9, "targetPort": 9}]
    if merged.type == ServiceType.HEADLESS:
        spec["clusterIP"] = "None"
    else:
        spec["type"] = "ClusterIP"
        spec["ipFamilyPolicy"] = "PreferDualStack"
    w = merged.winner
    spec["sessionAffinity"] = w.session_affinity
    if w.session_affinity == "ClientIP" and w.session_affinity_timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": w.session_affinity_timeout}}
    # internalTrafficPolicy stays on the ServiceImport only: on the derived Service,
    # "Local" would strand every node that runs no gateway pod.
    return _with_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": derived_name(key.namespace, key.name),
                "namespace": key.namespace,
                "labels": _import_labels(key),
                "annotations": {"meshlink.io/service-import": key.name},
            },
            "spec": spec,
        }
    )


def owned_by_namespace(body: Obj, namespace: Mapping[str, Any] | None) -> Obj:
    """``body`` with an owner reference to ``namespace`` (meshlink's own Namespace object),
    re-hashed; unchanged when there is no such namespace.

    Kubernetes' garbage collector then deletes the object once that namespace is gone, so
    uninstalling meshlink (``helm uninstall``, ``kubectl delete -k``) orphans no import, even
    one applied while meshlink was being stopped. A cluster-scoped owner may own objects in
    every namespace; no ``blockOwnerDeletion``, which would need a write on namespaces."""
    m = meta(namespace or {})
    if not m.get("uid") or not m.get("name"):
        return body
    body["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Namespace", "name": m["name"], "uid": m["uid"]}
    ]
    body["metadata"]["annotations"].pop(SPEC_HASH_ANNOTATION, None)
    return _with_hash(body)


def recorded_gateway_ports(svc: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(protocol, service port, gateway port) recorded on a ClusterSetIP derived Service:
    its TCP ports' numeric ``targetPort``. A headless one records none (its target ports
    are the service ports, which may well lie inside the gateway port range)."""
    spec = svc.get("spec") or {}
    if spec.get("clusterIP") == "None":
        return []
    out = []
    for p in spec.get("ports") or ():
        proto, port, target = str(p.get("protocol") or "TCP"), p.get("port"), p.get("targetPort")
        if proto == "TCP" and isinstance(port, int) and isinstance(target, int):
            out.append((proto, port, target))
    return out


def _mcs_port(p: Port) -> Obj:
    out: Obj = {"port": p.port, "protocol": p.protocol}
    if p.name:
        out["name"] = p.name
    if p.app_protocol:
        out["appProtocol"] = p.app_protocol
    return out


def service_import_body(
    merged: MergedService, ips: Sequence[str], ip_families: Sequence[str]
) -> Obj:
    """The ServiceImport spec. ``ips`` are the derived Service's ClusterIPs (none for
    Headless); ``ip_families`` is never empty."""
    key = merged.key
    w = merged.winner
    spec: Obj = {
        "type": merged.type.value,
        "ports": [_mcs_port(p) for p in merged.ports],
        "ipFamilies": list(ip_families) or list(w.ip_families) or ["IPv4"],
        "sessionAffinity": w.session_affinity,
    }
    if merged.type == ServiceType.CLUSTERSET_IP and ips:
        spec["ips"] = list(ips)
    if w.session_affinity == "ClientIP" and w.session_affinity_timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": w.session_affinity_timeout}}
    if w.internal_traffic_policy:
        spec["internalTrafficPolicy"] = w.internal_traffic_policy
    if w.traffic_distribution:
        spec["trafficDistribution"] = w.traffic_distribution
    lab = dict(w.labels)
    lab.update(_import_labels(key))
    ann = dict(w.annotations)
    ann[DERIVED_ANNOTATION] = derived_name(key.namespace, key.name)
    return _with_hash(
        {
            "apiVersion": MCS_API_VERSION,
            "kind": "ServiceImport",
            "metadata": {
                "name": key.name,
                "namespace": key.namespace,
                "labels": lab,
                "annotations": ann,
            },
            "spec": spec,
        }
    )


def service_import_status(
    merged: MergedService,
    ready: Condition,
    current: Mapping[str, Any] | None,
    generation: int,
    now: str,
) -> Obj | None:
    """The ServiceImport status to apply, or None when the observed one is already it."""
    cur_status = (current or {}).get("status") or {}
    clusters = [{"cluster": c} for c in merged.clusters]
    conds = next_conditions(cur_status.get("conditions") or [], [ready], generation, now)
    if conds is None and cur_status.get("clusters") == clusters:
        return None
    if conds is None:
        conds = [dict(c) for c in cur_status.get("conditions") or []]
    return {
        "apiVersion": MCS_API_VERSION,
        "kind": "ServiceImport",
        "metadata": {"name": merged.key.name, "namespace": merged.key.namespace},
        "status": {"clusters": clusters, "conditions": conds},
    }


def slice_name(derived: str, cluster: str, family: str) -> str:
    return f"{derived}-{cluster}-{family.lower()}"


def endpoint_slice_bodies(
    merged: MergedService,
    gateway_endpoints: Sequence[tuple[str, bool]],
    target_ports: TargetPorts,
) -> list[Obj]:
    """EndpointSlices of one import: per serving source cluster and address family.

    Headless: the source cluster's own endpoints (their DNS answers are those addresses).
    ClusterSetIP: the local gateway pods (``gateway_endpoints``: address, ready), which
    tunnel each connection to a source cluster with ready endpoints. So a gateway endpoint
    is ready, in every cluster's slice alike, while its pod is and any source cluster has
    ready endpoints. It cannot differ between the slices: they list the same address and
    port, and kube-proxy keeps one of such duplicates, whichever it meets first, so a
    source cluster that lost its endpoints (or its link, for the grace period) would
    otherwise make the import refuse connections the other clusters could serve. Ports are
    those the source cluster exposes (a conflicting port only reaches the clusters that
    have it). A slice port is the endpoint's port: the remote endpoints' own port for
    Headless, the gateway port of ``target_ports`` for ClusterSetIP. Every source cluster
    gets at least one slice.
    """
    key = merged.key
    derived = derived_name(key.namespace, key.name)
    names = dict(zip(merged.ports, service_port_names(merged.ports), strict=True))
    headless = merged.type == ServiceType.HEADLESS
    routable = any(rec.ready_endpoints > 0 for rec in merged.serving)
    bodies = []
    for rec in merged.serving:
        ports = [
            {
                "name": names[p],
                "protocol": p.protocol,
                "port": p.port if headless else target_ports.get((p.protocol, p.port), p.port),
            }
            | ({"appProtocol": p.app_protocol} if p.app_protocol else {})
            for p, origins in merged.port_origins
            if rec.origin in origins
        ]
        by_family: dict[str, list[Obj]] = {}
        if headless:
            for ep in rec.endpoints:
                for addr in ep.addresses:
                    entry: Obj = {"addresses": [addr], "conditions": {"ready": ep.ready}}
                    if ep.hostname:
                        entry["hostname"] = ep.hostname
                    by_family.setdefault(address_family(addr), []).append(entry)
        else:
            for addr, gw_ready in gateway_endpoints:
                ready = gw_ready and routable
                by_family.setdefault(address_family(addr), []).append(
                    {"addresses": [addr], "conditions": {"ready": ready}}
                )
        if not by_family:
            by_family[rec.ip_families[0] if rec.ip_families else "IPv4"] = []
        for family, eps in sorted(by_family.items()):
            bodies.append(
                _with_hash(
                    {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": slice_name(derived, rec.origin, family),
                            "namespace": key.namespace,
                            "labels": {
                                MCS_SERVICE_NAME: key.name,
                                MCS_SOURCE_CLUSTER: rec.origin,
                                SLICE_MANAGED_BY_LABEL: SLICE_MANAGER,
                                K8S_SERVICE_NAME: derived,
                                MANAGED_BY_LABEL: MANAGED_BY,
                            },
                        },
                        "addressType": family,
                        "endpoints": eps[:MAX_ENDPOINTS],
                        "ports": ports,
                    }
                )
            )
    return bodies


def gateway_endpoints_of(pods: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, bool], ...]:
    """(address, ready) of every gateway pod that has an IP and is not being deleted."""
    out: set[tuple[str, bool]] = set()
    for pod in pods:
        if meta(pod).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if p.get("ip")]
        if not ips and status.get("podIP"):
            ips = [str(status["podIP"])]
        out.update((ip, ready) for ip in ips)
    return tuple(sorted(out))


def replica_pods(pods: Iterable[Mapping[str, Any]]) -> list[ReplicaPod]:
    """The site's meshlink pods not being deleted, by name: what `meshlink status` lists as
    the site's replicas (their readiness is the pod's Ready condition)."""
    out: list[ReplicaPod] = []
    for pod in pods:
        if meta(pod).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        out.append(
            {
                "name": str(meta(pod).get("name", "")),
                "ip": str(status["podIP"]) if status.get("podIP") else None,
                "node": str((pod.get("spec") or {}).get("nodeName") or "") or None,
                "ready": any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or []
                ),
            }
        )
    return sorted(out, key=lambda r: r["name"])


def import_ready(merged: MergedService, ips: Sequence[str]) -> Condition:
    if merged.type == ServiceType.HEADLESS or ips:
        return Condition(READY, "True", REASON_READY, "")
    return Condition(READY, "False", REASON_PENDING, "waiting for the derived Service's IP")


# -- small pure pieces of the reconcilers ----------------------------------------------------


def namespace_usable(ns: Mapping[str, Any] | None) -> bool:
    """A Namespace that exists and is not being deleted (imports go only there)."""
    if ns is None:
        return False
    return (
        not meta(ns).get("deletionTimestamp")
        and (ns.get("status") or {}).get("phase") != "Terminating"
    )


def import_key(obj: Mapping[str, Any]) -> ServiceKey | None:
    """The imported service a managed object belongs to (all carry the MCS label)."""
    name = labels(obj).get(MCS_SERVICE_NAME)
    if not name:
        return None
    return ServiceKey(str(meta(obj).get("namespace", "")), name)


def trim_slice(obj: Obj) -> Obj:
    """Keep only what the controller reads from an EndpointSlice (memory at scale)."""
    m = obj.get("metadata") or {}
    return {
        "metadata": {
            k: m[k]
            for k in ("name", "namespace", "labels", "annotations", "resourceVersion", "uid")
            if k in m
        },
        "endpoints": [
            {k: ep[k] for k in ("addresses", "conditions", "hostname", "targetRef") if k in ep}
            for ep in obj.get("endpoints") or []
        ],
    }


def local_endpoint(
    rec: ExportRecord | None, svc: Mapping[str, Any] | None, port: int
) -> tuple[str, int] | None:
    """Where a flow that arrived over a link for port ``port`` of our export goes: the
    exported Service's ClusterIP (kube-proxy picks the endpoint), or for a headless export
    one ready endpoint address with the port's target. None if not exported."""
    if rec is None or svc is None or not any(p.port == port for p in rec.ports):
        return None
    spec = svc.get("spec") or {}
    cluster_ip = spec.get("clusterIP")
    if cluster_ip and cluster_ip != "None":
        return (str(cluster_ip), port)
    for ep in rec.endpoints:
        if ep.ready and ep.addresses:
            target = next(
                (
                    p.get("targetPort")
                    for p in spec.get("ports") or ()
                    if p.get("port") == port and isinstance(p.get("targetPort"), int)
                ),
                port,
            )
            return (ep.addresses[0], int(target))
    return None


def imported_service(merged: MergedService, ips: tuple[str, ...]) -> ImportedService:
    """The import as DNS and the listeners see it (Headless: with the endpoints)."""
    headless = merged.type == ServiceType.HEADLESS
    return ImportedService(
        namespace=merged.key.namespace,
        name=merged.key.name,
        type=merged.type,
        ips=ips,
        ports=merged.ports,
        clusters=tuple(
            ClusterEndpoints(r.origin, r.endpoints if headless else ())
            for r in sorted(merged.serving, key=lambda r: r.origin)
        ),
    )


def import_listeners(
    merged: MergedService, target_ports: TargetPorts, bind: str
) -> tuple[ListenerSpec, ...]:
    """The gateway listeners of an import: one per imported TCP port that has a gateway
    port (``target_ports``), on ``bind``."""
    return tuple(
        ListenerSpec(merged.key, bind, target_ports[(p.protocol, p.port)], p.port, origins)
        for p, origins in merged.port_origins
        if (p.protocol, p.port) in target_ports
    )
