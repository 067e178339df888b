"""Export records: the unit of the catalog, shared by every platform adapter.

A record describes one service exported by one site (its *origin*). Records are immutable;
a change is a new record with a higher ``version``. ``to_wire``/``from_wire`` are the only
(de)serialisers, and ``from_wire`` validates everything a peer could get wrong: names,
ports, and addresses (no loopback, link-local, multicast or unspecified address from peers).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Any, Final

from meshlink.errors import CatalogError
from meshlink.names import PROTOCOLS, is_dns_label

MAX_PORTS: Final = 256
MAX_ENDPOINTS: Final = 1000
MAX_LABELS: Final = 64


class ServiceType(enum.StrEnum):
    CLUSTERSET_IP = "ClusterSetIP"
    HEADLESS = "Headless"


@dataclass(frozen=True, slots=True)
class Port:
    """One service port as exported (the MCS ServicePort)."""

    port: int
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a headless export. ``hostname`` may be empty (dashed IP is used)."""

    addresses: tuple[str, ...]
    hostname: str = ""
    ready: bool = True


@dataclass(frozen=True, slots=True)
class ExportRecord:
    """One service exported by one site.

    ``ready_endpoints`` is the count of ready local endpoints (ClusterSetIP traffic goes
    through the gateways, so addresses are not replicated); ``endpoints`` is filled only
    for Headless exports, whose DNS answers are the endpoint addresses themselves.
    """

    origin: str
    namespace: str
    name: str
    type: ServiceType
    ports: tuple[Port, ...]
    created: float
    """Export creation time (ServiceExport creationTimestamp), epoch seconds: oldest wins."""
    version: int
    """Per-origin, strictly increasing across restarts (seeded from the clock)."""
    ready_endpoints: int = 0
    endpoints: tuple[Endpoint, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    session_affinity: str = "None"
    session_affinity_timeout: int | None = None
    internal_traffic_policy: str | None = None
    traffic_distribution: str | None = None
    ip_families: tuple[str, ...] = ("IPv4",)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class SiteInfo:
    """What a site says about itself; replicated like a record so every site knows every
    other site and how to reach it (path vector)."""

    site: str
    version: int
    gateway_endpoints: tuple[str, ...] = ()


def check_site_id(value: object, what: str = "site id") -> str:
    if not is_dns_label(value):
        raise CatalogError(f"{what} {value!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    return value


def check_peer_address(value: object) -> str:
    """An address a peer gave us: must be a unicast, routable-looking IP."""
    if not isinstance(value, str):
        raise CatalogError(f"address {value!r} is not a string")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise CatalogError(f"address {value!r} is not an IP address") from None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        raise CatalogError(
            f"address {value} is loopback, link-local, multicast or unspecified: refused"
        )
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return check_peer_address(str(ip.ipv4_mapped))
    return str(ip)


def _port_to_wire(p: Port) -> dict[str, Any]:
    out: dict[str, Any] = {"port": p.port, "protocol": p.protocol}
    if p.name:
        out["name"] = p.name
    if p.app_protocol:
        out["appProtocol"] = p.app_protocol
    return out


def record_to_wire(r: ExportRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "origin": r.origin,
        "namespace": r.namespace,
        "name": r.name,
        "type": r.type.value,
        "ports": [_port_to_wire(p) for p in r.ports],
        "created": r.created,
        "version": r.version,
        "ready": r.ready_endpoints,
        "sessionAffinity": r.session_affinity,
        "ipFamilies": list(r.ip_families),
    }
    if r.endpoints:
        out["endpoints"] = [
            {"addresses": list(e.addresses), "hostname": e.hostname, "ready": e.ready}
            for e in r.endpoints
        ]
    if r.labels:
        out["labels"] = dict(r.labels)
    if r.annotations:
        out["annotations"] = dict(r.annotations)
    if r.session_affinity_timeout is not None:
        out["sessionAffinityTimeout"] = r.session_affinity_timeout
    if r.internal_traffic_policy is not None:
        out["internalTrafficPolicy"] = r.internal_traffic_policy
    if r.traffic_distribution is not None:
        out["trafficDistribution"] = r.traffic_distribution
    return out


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CatalogError(f"{key} {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _str(d: dict[str, Any], key: str, default: str | None = None, maxlen: int = 253) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or len(v) > maxlen:
        raise CatalogError(f"{key} {v!r} is not a string of at most {maxlen} characters")
    return v


def _str_map(d: dict[str, Any], key: str) -> tuple[tuple[str, str], ...]:
    v = d.get(key, {})
    if not isinstance(v, dict) or len(v) > MAX_LABELS:
        raise CatalogError(f"{key} must be a map of at most {MAX_LABELS} entries")
    out = []
    for k, val in v.items():
        if not isinstance(k, str) or not isinstance(val, str) or len(k) > 317 or len(val) > 4096:
            raise CatalogError(f"{key} entry {k!r} is not a short string pair")
        out.append((k, val))
    return tuple(sorted(out))


def port_from_wire(d: object) -> Port:
    if not isinstance(d, dict):
        raise CatalogError(f"port {d!r} is not an object")
    proto = _str(d, "protocol", "TCP", 8)
    if proto not in PROTOCOLS:
        raise CatalogError(f"port protocol {proto!r} is not TCP, UDP or SCTP")
    name = _str(d, "name", "", 63)
    if name and not is_dns_label(name):
        raise CatalogError(f"port name {name!r} is not a DNS label")
    return Port(
        port=_int(d, "port", 1, 65535),
        protocol=proto,
        name=name,
        app_protocol=_str(d, "appProtocol", "", 253),
    )


def record_from_wire(d: object, *, validate_addresses: bool = True) -> ExportRecord:
    """Parse and validate a record received from a peer. Raises CatalogError."""
    if not isinstance(d, dict):
        raise CatalogError("record is not an object")
    origin = check_site_id(d.get("origin"), "origin")
    namespace = _str(d, "namespace", maxlen=63)
    name = _str(d, "name", maxlen=63)
    if not is_dns_label(namespace):
        raise CatalogError(f"namespace {namespace!r} is not a DNS label")
    if not is_dns_label(name):
        raise CatalogError(f"service name {name!r} is not a DNS label")
    try:
        stype = ServiceType(_str(d, "type", maxlen=16))
    except ValueError:
        raise CatalogError(f"type {d.get('type')!r} is not ClusterSetIP or Headless") from None
    ports_raw = d.get("ports", [])
    if not isinstance(ports_raw, list) or len(ports_raw) > MAX_PORTS:
        raise CatalogError(f"ports must be a list of at most {MAX_PORTS}")
    ports = tuple(port_from_wire(p) for p in ports_raw)
    created = d.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or created < 0:
        raise CatalogError(f"created {created!r} is not a timestamp")
    eps_raw = d.get("endpoints", [])
    if not isinstance(eps_raw, list) or len(eps_raw) > MAX_ENDPOINTS:
        raise CatalogError(f"endpoints must be a list of at most {MAX_ENDPOINTS}")
    endpoints = []
    for e in eps_raw:
        if not isinstance(e, dict):
            raise CatalogError("endpoint is not an object")
        addrs = e.get("addresses")
        if not isinstance(addrs, list) or not 1 <= len(addrs) <= 2:
            raise CatalogError("endpoint addresses must be a list of 1 or 2 addresses")
        check = check_peer_address if validate_addresses else _plain_ip
        hostname = _str(e, "hostname", "", 63)
        if hostname and not is_dns_label(hostname):
            raise CatalogError(f"endpoint hostname {hostname!r} is not a DNS label")
        endpoints.append(
            Endpoint(
                addresses=tuple(check(a) for a in addrs),
                hostname=hostname,
                ready=bool(e.get("ready", True)),
            )
        )
    fams = d.get("ipFamilies", ["IPv4"])
    if (
        not isinstance(fams, list)
        or not 1 <= len(fams) <= 2
        or any(f not in ("IPv4", "IPv6") for f in fams)
    ):
        raise CatalogError(f"ipFamilies {fams!r} must be 1 or 2 of IPv4, IPv6")
    timeout = d.get("sessionAffinityTimeout")
    if timeout is not None and (not isinstance(timeout, int) or not 0 < timeout <= 86400):
        raise CatalogError(f"sessionAffinityTimeout {timeout!r} is out of range")
    itp = d.get("internalTrafficPolicy")
    tdist = d.get("trafficDistribution")
    return ExportRecord(
        origin=origin,
        namespace=namespace,
        name=name,
        type=stype,
        ports=ports,
        created=float(created),
        version=_int(d, "version", 0, 2**63 - 1),
        ready_endpoints=_int(d, "ready", 0, 2**31) if "ready" in d else 0,
        endpoints=tuple(endpoints),
        labels=_str_map(d, "labels"),
        annotations=_str_map(d, "annotations"),
        session_affinity=_str(d, "sessionAffinity", "None", 16),
        session_affinity_timeout=timeout,
        internal_traffic_policy=_str(d, "internalTrafficPolicy", maxlen=16) if itp else None,
        traffic_distribution=_str(d, "trafficDistribution", maxlen=64) if tdist else None,
        ip_families=tuple(fams),
    )


def _plain_ip(value: object) -> str:
    if not isinstance(value, str):
        raise CatalogError(f"address {value!r} is not a string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise CatalogError(f"address {value!r} is not an IP address") from None
