"""Static records: ImportedServices read from a YAML or JSON file (``meshlink dns --records``).

The file is a mapping with one key, ``services``, a list of::

    - name: web                 # DNS label
      namespace: default        # DNS label
      type: ClusterSetIP        # or Headless (default ClusterSetIP)
      ips: [10.0.0.1, fd00::1]  # ClusterSetIP only, at most one per family
      ports:
        - {port: 80, protocol: TCP, name: http}
      clusters:
        - cluster: east         # DNS label
          endpoints:            # Headless only
            - {addresses: [10.1.2.3], hostname: web-0, ready: true}

Every error is a ConfigError naming the offending key (``services[0].ports[1].port``).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Final

import yaml

from meshlink.catalog.records import Endpoint, Port, ServiceType
from meshlink.catalog.view import ClusterEndpoints, ImportedService
from meshlink.errors import ConfigError
from meshlink.names import PROTOCOLS, is_dns_label

_SERVICE_KEYS: Final = frozenset({"name", "namespace", "type", "ips", "ports", "clusters"})
_PORT_KEYS: Final = frozenset({"port", "protocol", "name", "appProtocol"})
_CLUSTER_KEYS: Final = frozenset({"cluster", "endpoints"})
_ENDPOINT_KEYS: Final = frozenset({"addresses", "hostname", "ready"})


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, key: str, msg: str) -> ConfigError:
        return ConfigError(msg, key=key, source=self.source)

    def mapping(self, v: object, key: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.err(key, "must be a mapping")
        for k in v:
            if k not in allowed:
                raise self.err(f"{key}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
        return v

    def seq(self, v: object, key: str) -> list[Any]:
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.err(key, "must be a list")
        return v

    def label(self, d: dict[str, Any], k: str, key: str, *, required: bool = True) -> str:
        v = d.get(k)
        if v is None and not required:
            return ""
        if not is_dns_label(v):
            raise self.err(f"{key}.{k}", f"{v!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
        return v

    def ip(self, v: object, key: str) -> str:
        if not isinstance(v, str):
            raise self.err(key, f"{v!r} is not an IP address")
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise self.err(key, f"{v!r} is not an IP address") from None


def _port(c: _Ctx, raw: object, key: str) -> Port:
    d = c.mapping(raw, key, _PORT_KEYS)
    num = d.get("port")
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= 65535:
        raise c.err(f"{key}.port", f"{num!r} is not a port number in [1, 65535]")
    proto = d.get("protocol", "TCP")
    if proto not in PROTOCOLS:
        raise c.err(f"{key}.protocol", f"{proto!r} is not TCP, UDP or SCTP")
    app = d.get("appProtocol", "")
    if not isinstance(app, str):
        raise c.err(f"{key}.appProtocol", f"{app!r} is not a string")
    return Port(num, proto, c.label(d, "name", key, required=False), app)


def _endpoint(c: _Ctx, raw: object, key: str) -> Endpoint:
    d = c.mapping(raw, key, _ENDPOINT_KEYS)
    addrs = d.get("addresses")
    if not isinstance(addrs, list) or not 1 <= len(addrs) <= 2:
        raise c.err(f"{key}.addresses", "must be a list of 1 or 2 IP addresses")
    ready = d.get("ready", True)
    if not isinstance(ready, bool):
        raise c.err(f"{key}.ready", f"{ready!r} is not true or false")
    return Endpoint(
        addresses=tuple(c.ip(a, f"{key}.addresses[{i}]") for i, a in enumerate(addrs)),
        hostname=c.label(d, "hostname", key, required=False),
        ready=ready,
    )


def _service(c: _Ctx, raw: object, key: str) -> ImportedService:
    d = c.mapping(raw, key, _SERVICE_KEYS)
    name = c.label(d, "name", key)
    namespace = c.label(d, "namespace", key)
    try:
        stype = ServiceType(d.get("type", "ClusterSetIP"))
    except ValueError:
        raise c.err(f"{key}.type", f"{d.get('type')!r} is not ClusterSetIP or Headless") from None
    ips = tuple(c.ip(v, f"{key}.ips[{i}]") for i, v in enumerate(c.seq(d.get("ips"), f"{key}.ips")))
    if stype is ServiceType.HEADLESS and ips:
        raise c.err(f"{key}.ips", "a Headless service has no clusterset IPs")
    if len({ipaddress.ip_address(i).version for i in ips}) != len(ips):
        raise c.err(f"{key}.ips", "at most one IP per family")
    ports = tuple(
        _port(c, p, f"{key}.ports[{i}]")
        for i, p in enumerate(c.seq(d.get("ports"), f"{key}.ports"))
    )
    clusters = []
    for i, raw_cl in enumerate(c.seq(d.get("clusters"), f"{key}.clusters")):
        ck = f"{key}.clusters[{i}]"
        cd = c.mapping(raw_cl, ck, _CLUSTER_KEYS)
        eps = tuple(
            _endpoint(c, e, f"{ck}.endpoints[{j}]")
            for j, e in enumerate(c.seq(cd.get("endpoints"), f"{ck}.endpoints"))
        )
        clusters.append(ClusterEndpoints(c.label(cd, "cluster", ck), eps))
    return ImportedService(namespace, name, stype, ips, ports, tuple(clusters))


def parse_services(data: object, source: str = "<records>") -> tuple[ImportedService, ...]:
    """Validate an already-decoded document (``{"services": [...]}``)."""
    c = _Ctx(source)
    if not isinstance(data, dict) or set(data) - {"services"}:
        raise ConfigError("must be a mapping with one key, 'services'", source=source)
    out = tuple(
        _service(c, s, f"services[{i}]")
        for i, s in enumerate(c.seq(data.get("services"), "services"))
    )
    seen: set[tuple[str, str]] = set()
    for i, s in enumerate(out):
        if (s.namespace, s.name) in seen:
            raise c.err(f"services[{i}]", f"{s.namespace}/{s.name} is listed twice")
        seen.add((s.namespace, s.name))
    return out


def load_services(path: str | Path) -> tuple[ImportedService, ...]:
    """Read and validate a records file (YAML, or JSON which YAML also reads)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the records file: {e.strerror}", source=str(p)) from e
    except UnicodeDecodeError:
        raise ConfigError("the records file is not UTF-8 text", source=str(p)) from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"not valid YAML/JSON: {e}", source=str(p)) from None
    return parse_services(data, str(p))
