"""Site configuration: the YAML file of `meshlink run --config`, parsed into frozen dataclasses.

Every error names the offending key (``exports[0].ports[1].port: ...``) so a user can fix the
file without reading code. Defaults are chosen so that a minimal file (just ``site``) works
on loopback.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from meshlink.errors import ConfigError
from meshlink.names import (
    MAX_REPLICAS,
    PROTOCOLS,
    is_ascii_number,
    is_dns_label,
    is_instance_id,
    split_hostport,
)

DEFAULT_ZONE: Final = "clusterset.local"
DEFAULT_TTL: Final = 5
DEFAULT_GATEWAY_SELECTOR: Final = (("app.kubernetes.io/name", "meshlink"),)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ExportPortConfig:
    port: int
    """The port the service is offered on in the clusterset."""
    target_port: int
    """The port the local endpoints listen on."""
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    address: str
    hostname: str = ""
    ready: bool = True


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """A service this site offers, in local mode."""

    name: str
    namespace: str
    ports: tuple[ExportPortConfig, ...]
    endpoints: tuple[EndpointConfig, ...]
    headless: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: HostPort = HostPort("127.0.0.1", 5353)
    """UDP and TCP address of the clusterset DNS server."""
    zone: str = DEFAULT_ZONE
    ttl: int = DEFAULT_TTL
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Kubernetes mode: where the API server is and how imports are materialised."""

    kubeconfig: Path | None = None
    """None: in-cluster configuration (service account)."""
    context: str | None = None
    namespace: str = "meshlink-system"
    """Where meshlink itself runs (its gateway pods live here)."""
    gateway_selector: tuple[tuple[str, str], ...] = DEFAULT_GATEWAY_SELECTOR
    """Labels of the gateway pods: the endpoints meshlink writes for derived Services."""
    export_kube_system: bool = False
    """Exports from kube-system are refused unless this is set."""
    request_timeout: float = 10.0
    """Every API request carries this timeout (seconds)."""
    resync_seconds: float = 300.0
    import_address: str = "0.0.0.0"
    """Where the gateway listens for imported traffic (the derived Services' endpoints are
    the gateway pods, each imported port on a target port of its own)."""
    import_ports: tuple[int, int] = (20000, 29999)
    """The range target ports are allocated from, inclusive; below Linux's ephemeral range."""
    leader_election: bool = False
    """Several replicas of one site: only the holder of the Lease meshlink-leader (in
    ``namespace``) writes to the API server; the others keep warm caches, serve, and take
    over when it expires (what the manifests set). False: one replica, always writing."""
    lease_duration: float = 4.0
    """Seconds a Lease not renewed stays its holder's (a crashed leader is replaced after
    this; its right to write ends 40 % earlier)."""
    state: str = "files"
    """Where the site's state (CA, certificates, links, peers, token hashes) lives:
    "secrets" (Secrets meshlink-* in ``namespace``, shared by every replica: what the
    manifests set) or "files" (under stateDir)."""


@dataclass(frozen=True, slots=True)
class SiteConfig:
    site: str
    """The site id (MCS cluster id): one DNS label, at most 63 characters."""
    state_dir: Path
    """Where keys (0600), certificates, links and token hashes live."""
    gateway_listen: HostPort = HostPort("127.0.0.1", 7443)
    """Where the gateway accepts links from peers."""
    gateway_advertise: tuple[HostPort, ...] = ()
    """Addresses peers should dial (default: gateway_listen)."""
    max_streams_per_link: int = 512
    """Flows a peer may have open at once over its link (each can hold an upstream socket);
    announced to the peer, the excess is refused."""
    new_flows_per_second: float = 2000.0
    """New flows a peer may open per second over its link; the excess is refused."""
    instance: str = ""
    """This process's instance id, announced to peers (several instances of one site may
    run at once, active/active). Empty: the pod name in Kubernetes mode (POD_NAME, else
    the host name), a random id per process in local mode."""
    replicas: int = 1
    """How many instances of this site run: peers dial until they hold links with that
    many distinct instances (the Deployment's replicas)."""
    grant_listen: HostPort = HostPort("127.0.0.1", 7444)
    """Where the token grant endpoint listens (TLS, server cert from this site's CA)."""
    grant_advertise: HostPort | None = None
    ops_listen: HostPort = HostPort("127.0.0.1", 7480)
    """/healthz, /readyz, /metrics and the JSON status API."""
    dns: DnsConfig = field(default_factory=DnsConfig)
    import_pool: ipaddress.IPv4Network | ipaddress.IPv6Network = field(
        default_factory=lambda: ipaddress.ip_network("127.77.0.0/16")
    )
    """Local-mode addresses handed to import listeners, one per imported service."""
    exports: tuple[ExportConfig, ...] = ()
    namespaces: tuple[str, ...] | None = None
    """Local-mode namespaces that "exist" here (None: every namespace exists)."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats; a link is declared dead after 3 missed (failover)."""
    link_cert_lifetime: float = 86400.0
    """Seconds a link client certificate issued by this site is valid; redeemers renew it
    over the link when a third of it is left."""
    import_grace_period: float = 300.0
    """Seconds the imports of a site that became unreachable (a link loss, a restart, a
    partition) are kept, with no ready endpoint: names and clusterset IPs stay, flows fail
    over. 0: they go at once."""
    kubernetes: KubernetesConfig | None = None
    """Set: Kubernetes mode (exports from ServiceExports); None: local mode (exports above)."""
    source: str = "<config>"

    @property
    def advertise(self) -> tuple[HostPort, ...]:
        return self.gateway_advertise or (self.gateway_listen,)

    @property
    def grant_address(self) -> HostPort:
        return self.grant_advertise or self.grant_listen


class _Reader:
    """Typed access into a YAML mapping that reports errors with the full key path."""

    def __init__(self, data: object, path: str, source: str):
        if not isinstance(data, dict):
            raise ConfigError("must be a mapping", key=path or None, source=source)
        self.data: dict[str, Any] = data
        self.path = path
        self.source = source

    def key(self, k: str | int) -> str:
        if isinstance(k, int):
            return f"{self.path}[{k}]"
        return f"{self.path}.{k}" if self.path else k

    def err(self, k: str, msg: str) -> ConfigError:
        return ConfigError(msg, key=self.key(k), source=self.source)

    def unknown(self, allowed: set[str]) -> None:
        for k in self.data:
            if k not in allowed:
                raise self.err(str(k), f"unknown key (known: {', '.join(sorted(allowed))})")

    def text(self, k: str, default: str | None = None) -> str:
        v = self.data.get(k, default)
        if not isinstance(v, str) or not v:
            msg = "required, a non-empty string" if v is None else f"{v!r} is not a string"
            raise self.err(k, msg)
        return v

    def integer(self, k: str, default: int | None, lo: int, hi: int) -> int:
        v = self.data.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.err(k, f"{v!r} is not an integer in [{lo}, {hi}]")
        return v

    def number(self, k: str, default: float, lo: float, hi: float) -> float:
        v = self.data.get(k, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.err(k, f"{v!r} is not a number in [{lo}, {hi}]")
        return float(v)

    def flag(self, k: str, default: bool) -> bool:
        v = self.data.get(k, default)
        if not isinstance(v, bool):
            raise self.err(k, f"{v!r} is not true or false")
        return v

    def hostport(self, k: str, default: HostPort | None) -> HostPort:
        v = self.data.get(k)
        if v is None:
            if default is None:
                raise self.err(k, "required, HOST:PORT")
            return default
        return parse_hostport(v, self.key(k), self.source)

    def sub(self, k: str) -> _Reader:
        return _Reader(self.data.get(k, {}), self.key(k), self.source)

    def items(self, k: str) -> list[Any]:
        v = self.data.get(k, [])
        if not isinstance(v, list):
            raise self.err(k, "must be a list")
        return v

    def str_map(self, k: str) -> tuple[tuple[str, str], ...]:
        v = self.data.get(k, {})
        if not isinstance(v, dict) or not all(
            isinstance(a, str) and isinstance(b, str) for a, b in v.items()
        ):
            raise self.err(k, "must be a map of strings to strings")
        return tuple(sorted(v.items()))


def parse_hostport(value: object, key: str = "address", source: str | None = None) -> HostPort:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``."""
    try:
        return HostPort(*split_hostport(value if isinstance(value, str) else ""))
    except ValueError:
        raise ConfigError(f"{value!r} is not HOST:PORT", key=key, source=source) from None


def _ip(value: object, key: str, source: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address", key=key, source=source) from None


def _export(r: _Reader) -> ExportConfig:
    r.unknown({"name", "namespace", "ports", "endpoints", "headless", "labels", "annotations"})
    name, namespace = r.text("name"), r.text("namespace", "default")
    for k, v in (("name", name), ("namespace", namespace)):
        if not is_dns_label(v):
            raise r.err(k, f"{v!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    ports = []
    raw_ports = r.items("ports")
    if not raw_ports:
        raise r.err("ports", "at least one port is required")
    for i, p in enumerate(raw_ports):
        pr = _Reader(p, r.key("ports") + f"[{i}]", r.source)
        pr.unknown({"port", "targetPort", "name", "protocol", "appProtocol"})
        port = pr.integer("port", None, 1, 65535)
        proto = pr.text("protocol", "TCP").upper()
        if proto not in PROTOCOLS:
            raise pr.err("protocol", f"{proto!r} is not TCP, UDP or SCTP")
        pname = str(pr.data.get("name", ""))
        if pname and not is_dns_label(pname):
            raise pr.err("name", f"{pname!r} is not a DNS label")
        ports.append(
            ExportPortConfig(
                port=port,
                target_port=pr.integer("targetPort", port, 1, 65535),
                name=pname,
                protocol=proto,
                app_protocol=str(pr.data.get("appProtocol", "")),
            )
        )
    endpoints = []
    for i, e in enumerate(r.items("endpoints")):
        key = r.key("endpoints") + f"[{i}]"
        if isinstance(e, str):
            endpoints.append(EndpointConfig(address=_ip(e, key, r.source)))
            continue
        er = _Reader(e, key, r.source)
        er.unknown({"address", "hostname", "ready"})
        hostname = str(er.data.get("hostname", ""))
        if hostname and not is_dns_label(hostname):
            raise er.err("hostname", f"{hostname!r} is not a DNS label")
        endpoints.append(
            EndpointConfig(
                address=_ip(er.data.get("address"), er.key("address"), r.source),
                hostname=hostname,
                ready=er.flag("ready", True),
            )
        )
    return ExportConfig(
        name=name,
        namespace=namespace,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        headless=r.flag("headless", False),
        labels=r.str_map("labels"),
        annotations=r.str_map("annotations"),
    )


def _instance(r: _Reader) -> str:
    v = r.data.get("instance", "")
    if not isinstance(v, str) or (v and not is_instance_id(v)):
        raise r.err("instance", f"{v!r} is not 1-253 of a-z, A-Z, 0-9, '.', '_', '-'")
    return v


def _kubernetes(r: _Reader) -> KubernetesConfig:
    r.unknown(
        {
            "kubeconfig",
            "context",
            "namespace",
            "gatewaySelector",
            "exportKubeSystem",
            "requestTimeout",
            "resyncSeconds",
            "importAddress",
            "importPorts",
            "state",
            "leaderElection",
            "leaseDuration",
        }
    )
    kubeconfig = r.data.get("kubeconfig")
    context = r.data.get("context")
    selector = r.str_map("gatewaySelector") or DEFAULT_GATEWAY_SELECTOR
    return KubernetesConfig(
        kubeconfig=Path(r.text("kubeconfig")) if kubeconfig is not None else None,
        context=r.text("context") if context is not None else None,
        namespace=r.text("namespace", _default(KubernetesConfig, "namespace")),
        gateway_selector=selector,
        export_kube_system=r.flag(
            "exportKubeSystem", _default(KubernetesConfig, "export_kube_system")
        ),
        request_timeout=r.number(
            "requestTimeout", _default(KubernetesConfig, "request_timeout"), 0.5, 300.0
        ),
        resync_seconds=r.number(
            "resyncSeconds", _default(KubernetesConfig, "resync_seconds"), 5.0, 86400.0
        ),
        import_address=_ip(
            r.data.get("importAddress", _default(KubernetesConfig, "import_address")),
            r.key("importAddress"),
            r.source,
        ),
        import_ports=_port_range(r, "importPorts", _default(KubernetesConfig, "import_ports")),
        state=_choice(r, "state", _default(KubernetesConfig, "state"), ("files", "secrets")),
        leader_election=r.flag("leaderElection", _default(KubernetesConfig, "leader_election")),
        lease_duration=r.number(
            "leaseDuration", _default(KubernetesConfig, "lease_duration"), 2.0, 300.0
        ),
    )


def _choice(r: _Reader, k: str, default: str, allowed: tuple[str, ...]) -> str:
    v = r.data.get(k, default)
    if v not in allowed:
        raise r.err(k, f"{v!r} is not one of {', '.join(allowed)}")
    return str(v)


def _port_range(r: _Reader, k: str, default: tuple[int, int]) -> tuple[int, int]:
    v = r.data.get(k)
    if v is None:
        return default
    first, sep, last = str(v).partition("-")
    if (
        not sep
        or not is_ascii_number(first.strip())
        or not is_ascii_number(last.strip())
        or not 1024 <= int(first) <= int(last) <= 65535
    ):
        raise r.err(k, f"{v!r} is not a port range FIRST-LAST within 1024-65535")
    return int(first), int(last)


def _default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of config dataclass ``cls``: defaults are written once,
    on the dataclass fields, and the parser takes them from there."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def parse(data: object, source: str = "<config>") -> SiteConfig:
    """Build a SiteConfig from decoded YAML. Raises ConfigError naming the key."""
    r = _Reader(data, "", source)
    r.unknown(
        {
            "site",
            "stateDir",
            "gateway",
            "grant",
            "ops",
            "dns",
            "imports",
            "exports",
            "namespaces",
            "heartbeatInterval",
            "linkCertLifetime",
            "importGracePeriod",
            "kubernetes",
        }
    )
    site = r.text("site")
    if not is_dns_label(site):
        raise r.err("site", f"{site!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    state_dir = Path(r.text("stateDir", os.path.join("/var/lib/meshlink", site)))
    gw = r.sub("gateway")
    gw.unknown(
        {"listen", "advertise", "maxStreamsPerLink", "newFlowsPerSecond", "instance", "replicas"}
    )
    listen = gw.hostport("listen", _default(SiteConfig, "gateway_listen"))
    adv_raw = gw.data.get("advertise", [])
    if isinstance(adv_raw, str):
        adv_raw = [adv_raw]
    if not isinstance(adv_raw, list):
        raise gw.err("advertise", "must be HOST:PORT or a list of them")
    advertise = tuple(
        parse_hostport(a, gw.key("advertise") + f"[{i}]", source) for i, a in enumerate(adv_raw)
    )
    grant = r.sub("grant")
    grant.unknown({"listen", "advertise"})
    ops = r.sub("ops")
    ops.unknown({"listen"})
    dns = r.sub("dns")
    dns.unknown({"listen", "zone", "ttl", "enabled"})
    zone = dns.text("zone", DEFAULT_ZONE).strip(".").lower()
    if not all(is_dns_label(part) for part in zone.split(".")):
        raise dns.err("zone", f"{zone!r} is not a DNS name")
    imports = r.sub("imports")
    imports.unknown({"pool"})
    pool_raw = imports.data.get("pool", str(_default(SiteConfig, "import_pool")))
    try:
        pool = ipaddress.ip_network(str(pool_raw))
    except ValueError:
        raise imports.err("pool", f"{pool_raw!r} is not a CIDR") from None
    if pool.num_addresses < 4:
        raise imports.err("pool", f"{pool} is too small (at least a /30)")
    exports = tuple(
        _export(_Reader(e, f"exports[{i}]", source)) for i, e in enumerate(r.items("exports"))
    )
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(exports):
        if (e.namespace, e.name) in seen:
            raise ConfigError(
                f"{e.namespace}/{e.name} is exported twice", key=f"exports[{i}]", source=source
            )
        seen.add((e.namespace, e.name))
    ns_raw = r.data.get("namespaces")
    namespaces: tuple[str, ...] | None = None
    if ns_raw is not None:
        if not isinstance(ns_raw, list) or not all(
            isinstance(n, str) and is_dns_label(n) for n in ns_raw
        ):
            raise r.err("namespaces", "must be a list of DNS labels")
        namespaces = tuple(ns_raw)
    grant_adv = grant.data.get("advertise")
    kube = _kubernetes(r.sub("kubernetes")) if "kubernetes" in r.data else None
    cfg = SiteConfig(
        site=site,
        state_dir=state_dir,
        gateway_listen=listen,
        gateway_advertise=advertise,
        max_streams_per_link=gw.integer(
            "maxStreamsPerLink", _default(SiteConfig, "max_streams_per_link"), 1, 1 << 20
        ),
        new_flows_per_second=gw.number(
            "newFlowsPerSecond", _default(SiteConfig, "new_flows_per_second"), 1.0, 1e6
        ),
        instance=_instance(gw),
        replicas=gw.integer("replicas", _default(SiteConfig, "replicas"), 1, MAX_REPLICAS),
        grant_listen=grant.hostport("listen", _default(SiteConfig, "grant_listen")),
        grant_advertise=parse_hostport(grant_adv, grant.key("advertise"), source)
        if grant_adv is not None
        else None,
        ops_listen=ops.hostport("listen", _default(SiteConfig, "ops_listen")),
        dns=DnsConfig(
            listen=dns.hostport("listen", _default(DnsConfig, "listen")),
            zone=zone,
            ttl=dns.integer("ttl", _default(DnsConfig, "ttl"), 0, 86400),
            enabled=dns.flag("enabled", _default(DnsConfig, "enabled")),
        ),
        import_pool=pool,
        exports=exports,
        namespaces=namespaces,
        heartbeat_interval=r.number(
            "heartbeatInterval", _default(SiteConfig, "heartbeat_interval"), 0.05, 60.0
        ),
        link_cert_lifetime=r.number(
            "linkCertLifetime",
            _default(SiteConfig, "link_cert_lifetime"),
            30.0,
            365 * 86400.0,
        ),
        import_grace_period=r.number(
            "importGracePeriod", _default(SiteConfig, "import_grace_period"), 0.0, 7 * 86400.0
        ),
        kubernetes=kube,
        source=source,
    )
    if kube is not None:
        first, last = kube.import_ports
        for what, hp in (
            ("gateway.listen", cfg.gateway_listen),
            ("grant.listen", cfg.grant_listen),
            ("ops.listen", cfg.ops_listen),
            ("dns.listen", cfg.dns.listen),
        ):
            if first <= hp.port <= last:
                raise ConfigError(
                    f"{first}-{last} contains {what}'s port {hp.port}; choose a range without it",
                    key="kubernetes.importPorts",
                    source=source,
                )
    return cfg


def load(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and parse a YAML config file, or a directory of them.

    A directory (how Kubernetes mounts a ConfigMap) is read as its ``*.yaml`` files in name
    order, each merged over the ones before it: mappings key by key, anything else replaced.
    So a base ``config.yaml`` and a per-cluster ``site.yaml`` make one configuration, and a
    kustomize overlay adds the second file without editing the first."""
    where = Path(path)
    if not where.is_dir():
        return parse(_read_yaml(where), str(path))
    files = sorted(p for p in where.glob("*.yaml") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError("a directory without *.yaml files", source=str(path))
    data: object = {}
    for file in files:
        layer = _read_yaml(file)
        if not isinstance(layer, dict):
            raise ConfigError("must be a mapping", source=str(file))
        data = _merged(data, layer)
    return parse(data, f"{where} ({' + '.join(f.name for f in files)})")


def _read_yaml(path: Path) -> object:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=source) from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); "
            "save the file as UTF-8",
            source=source,
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{where}", source=source) from None
    return {} if data is None else data


def _merged(base: object, over: object) -> object:
    """``over`` laid on ``base``: mappings merge key by key, other values replace."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out.get(k), v)
    return out


_BIND_HINTS: Final = {
    errno.EADDRINUSE: "the address is in use (another process listens there: stop it, or "
    "choose another port)",
    errno.EADDRNOTAVAIL: "that IP address is not on this host (use one of its addresses, "
    "or 0.0.0.0)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


def listen_error(key: str, host: str, port: int, e: OSError) -> ConfigError:
    """The one line for a listener that cannot bind: the config key, the address, why.
    (asyncio and uvloop reword bind errors; the errno says it best.)"""
    if e.errno is None and isinstance(e.__cause__, OSError):
        e = e.__cause__  # uvloop's datagram endpoints wrap the bind error
    why = _BIND_HINTS.get(e.errno or 0) or (os.strerror(e.errno) if e.errno else str(e))
    return ConfigError(f"cannot listen on {HostPort(host, port)}: {why}", key=key)
