"""The status contract of a running site: its schema, how it is collected, fetched, shown
and checked.

- ``SiteStatus`` (and its row types) is the JSON the ops server serves at ``/api/status``;
  it carries no secrets (no keys, no token material).
- ``collect`` builds it from the site's parts (the runtime calls it; ops serves the result).
- ``fetch`` is the one client of that API (``meshlink status``/``check``, the demo, tests).
- ``replicas`` gathers a Kubernetes site's replica set (each meshlink pod's own status,
  fetched from its pod address), ``render_replicas`` and ``check_replicas`` show and judge
  it: which replica leads, each one's links and readiness.
- ``render`` is `meshlink status`'s one screen; ``check`` the health verdicts of
  `meshlink check` (PASS, WARN or FAIL), one line each saying what is wrong and what to
  do; ``probes`` the checks that ask the site itself (its DNS server), with ``dns_query``
  their client; ``probe_exports`` (run in the site, served at ``/api/probe``) connects
  to every exported endpoint, and ``check_exports`` judges what it found.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, NotRequired, Protocol, TypedDict, cast
from urllib.parse import urlsplit

from dnslib import QTYPE, RCODE, DNSRecord

from meshlink import __version__, text
from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import (
    Conflict,
    ExportTarget,
    ImportedService,
    ListenerSpec,
    PlatformStatus,
    ReplicaPod,
)
from meshlink.config import HostPort, SiteConfig, parse_hostport
from meshlink.errors import MeshlinkError
from meshlink.links import PeerRecord
from meshlink.pki import SiteIdentity
from meshlink.tunnel import LinkStatus

MAX_ROWS = 1000
"""Exports, imports and listeners listed at most (the counts stay right in metrics)."""
MAX_ERROR_ROWS = 100


Verdict = Literal["PASS", "WARN", "FAIL"]
CERT_WARN_DAYS: Final = 14
"""A certificate of this site that nothing renews by itself warns this long before it
expires (the gateway certificate is re-issued a month ahead: a warning means that broke)."""
CA_WARN_DAYS: Final = 90
"""The site CA is not renewed automatically (a new CA means new links): warn early."""


class LinkRow(TypedDict):
    peer: str
    instance: NotRequired[str]
    """The peer's instance at the other end ("" for a dialer still trying, or a peer that
    names no instance)."""
    replicas: NotRequired[int]
    """How many instances the peer site runs, as that instance announced."""
    direction: str
    state: str
    rtt_ms: float | None
    since: float
    flows: int
    bytes_in: int
    bytes_out: int
    last_error: str | None
    refused: NotRequired[bool]
    """The peer refused this site as not authorized: revoked or unlinked there."""
    cert_expires: NotRequired[float | None]
    """A dialled link: when its link certificate expires (epoch seconds)."""
    cert_due: NotRequired[bool]
    """A dialled link: its certificate has less than a third of its life left."""
    reauth_error: NotRequired[str | None]
    """A dialled link that is down: why re-authenticating with the peer failed."""


class PeerRow(TypedDict):
    """A site that redeemed one of our tokens (it dials us)."""

    site: str
    up: bool
    cert_expires: float
    """When the link certificate we signed for it last expires (epoch seconds)."""


class CertsRow(TypedDict):
    ca_expires: float
    gateway_expires: float


class UnreachableRow(TypedDict):
    """A site with no live path whose exports are kept for the grace period."""

    site: str
    exports: int
    grace_left_s: float


class SiteRow(TypedDict):
    site: str
    hops: int
    via: str | None
    path: list[str]


class ExportRow(TypedDict):
    service: str
    ports: list[int]


class ImportRow(TypedDict):
    service: str
    name: str
    """The clusterset DNS name."""
    type: str
    ips: list[str]
    ports: list[int]
    clusters: list[str]
    reachable: list[str]
    """The exporting clusters with a live path from this site."""


class ListenerRow(TypedDict):
    address: str
    service: str
    port: int


class ListenerErrorRow(ListenerRow):
    error: str


class ConflictRow(TypedDict):
    service: str
    reasons: list[str]
    winner: str


class SiteStatus(TypedDict):
    site: str
    instance: NotRequired[str]
    """This process's instance id (several may run for one site)."""
    replicas: NotRequired[int]
    """How many instances this site runs (``gateway.replicas``, announced to peers)."""
    version: str
    mode: str
    """"local" or "kubernetes"."""
    uptime_s: float
    gateway: str
    grant: str
    dns: str | None
    """The DNS server's address, None when this process serves no DNS."""
    zone: str
    ca_pin: str
    links: list[LinkRow]
    sites: list[SiteRow]
    exports: list[ExportRow]
    imports: list[ImportRow]
    listeners: NotRequired[list[ListenerRow]]
    listener_errors: NotRequired[list[ListenerErrorRow]]
    conflicts: NotRequired[list[ConflictRow]]
    kubernetes: NotRequired[PlatformStatus | None]
    """Kubernetes mode with the controller component: the API server and controller."""
    advertise: NotRequired[list[str]]
    """The gateway addresses other sites dial (``gateway.advertise``)."""
    peers: NotRequired[list[PeerRow]]
    certs: NotRequired[CertsRow]
    unreachable: NotRequired[list[UnreachableRow]]


class ProbeRow(TypedDict):
    """One exported endpoint as the site could reach it (``/api/probe``)."""

    service: str
    port: int
    target: str | None
    """host:port connected to; None when nothing serves the port (no ready endpoint)."""
    error: str | None


class LinkCertInfo(Protocol):
    """What the status shows of a dialled link's certificate (``site.LinkCertState``)."""

    @property
    def expires(self) -> float | None: ...
    @property
    def due(self) -> bool: ...
    @property
    def refused(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


# -- collecting (in the site) ------------------------------------------------------------


def _listener_row(spec: ListenerSpec) -> ListenerRow:
    return {
        "address": f"{spec.address}:{spec.port}",
        "service": str(spec.key),
        "port": spec.service_port,
    }


def collect(
    *,
    config: SiteConfig,
    mode: str,
    started: float,
    dns_served: bool,
    ca_pin: str,
    links: Sequence[LinkStatus],
    catalog: Catalog,
    imports: Sequence[ImportedService],
    listeners: Sequence[ListenerSpec],
    listener_errors: Sequence[tuple[ListenerSpec, str]],
    conflicts: Sequence[Conflict],
    platform: PlatformStatus | None,
    identity: SiteIdentity | None = None,
    link_certs: Mapping[str, LinkCertInfo] | None = None,
    peers: Sequence[PeerRecord] = (),
    instance: str = "",
) -> SiteStatus:
    """The status of a site from its parts (see ``SiteStatus``)."""
    sites = catalog.sites()
    zone = config.dns.zone
    certs = link_certs or {}
    up = {st.peer_site for st in links if st.state == "up"}
    now = time.monotonic()
    out: SiteStatus = {
        "site": config.site,
        "instance": instance,
        "replicas": config.replicas,
        "version": __version__,
        "mode": mode,
        "uptime_s": round(time.time() - started, 1),
        "gateway": str(config.gateway_listen),
        "grant": str(config.grant_address),
        "dns": str(config.dns.listen) if dns_served else None,
        "zone": zone,
        "ca_pin": ca_pin,
        "links": [
            {
                "peer": st.peer_site,
                "instance": st.peer_instance,
                "replicas": st.peer_replicas,
                "direction": st.direction,
                "state": st.state,
                "rtt_ms": st.rtt_ms,
                "since": st.since,
                "flows": st.flows_open,
                "bytes_in": st.bytes_in,
                "bytes_out": st.bytes_out,
                "last_error": st.last_error,
                "refused": st.refused
                or (c is not None and c.refused is not None and st.state != "up"),
                "cert_expires": c.expires if c is not None else None,
                "cert_due": c.due if c is not None else False,
                "reauth_error": (c.refused or c.error) if c is not None else None,
            }
            for st in links
            for c in [certs.get(st.peer_site) if st.direction == "dial" else None]
        ],
        "sites": [
            {"site": r.site, "hops": r.hops, "via": r.via, "path": list(r.path)}
            for r in sorted(sites.values(), key=lambda r: (r.hops, r.site))
        ],
        "exports": [
            ExportRow(service=str(k), ports=[p.port for p in r.ports])
            for k, recs in sorted(catalog.services().items())
            for r in recs
            if r.origin == config.site
        ][:MAX_ROWS],
        "imports": [
            ImportRow(
                service=f"{i.namespace}/{i.name}",
                name=f"{i.name}.{i.namespace}.svc.{zone}",
                type=i.type.value,
                ips=list(i.ips),
                ports=[p.port for p in i.ports],
                clusters=[c.cluster for c in i.clusters],
                reachable=[c.cluster for c in i.clusters if c.cluster in sites],
            )
            for i in sorted(imports, key=lambda i: (i.namespace, i.name))
        ][:MAX_ROWS],
        "listeners": [
            _listener_row(s) for s in sorted(listeners, key=lambda s: (s.address, s.port))
        ][:MAX_ROWS],
        "listener_errors": [
            ListenerErrorRow(**_listener_row(s), error=err)
            for s, err in sorted(listener_errors, key=lambda e: (e[0].address, e[0].port))
        ][:MAX_ERROR_ROWS],
        "conflicts": [
            {"service": str(c.service), "reasons": list(c.reasons), "winner": c.winner}
            for c in sorted(conflicts, key=lambda c: c.service)
        ],
        "kubernetes": platform,
        "advertise": [str(a) for a in config.advertise],
        "peers": [
            {"site": p.site, "up": p.site in up, "cert_expires": p.cert_not_after} for p in peers
        ],
        "unreachable": [
            {"site": site, "exports": n, "grace_left_s": round(max(0.0, until - now), 1)}
            for site, (n, until) in sorted(catalog.stale().items())
        ],
    }
    if identity is not None:
        out["certs"] = {
            "ca_expires": identity.ca.cert.not_valid_after_utc.timestamp(),
            "gateway_expires": identity.gateway.cert.not_valid_after_utc.timestamp(),
        }
    return out


# -- fetching (in the CLI, the demo, tests) -----------------------------------------------


class StatusUnavailable(MeshlinkError):
    """The site's status API did not answer."""


def _get_json(base_url: str, path: str, timeout: float) -> Any:
    base = base_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=timeout) as resp:  # noqa: S310
            return json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, urllib.error.HTTPError):  # fetch_probes tells a 404 by this text
            reason = f"HTTP {e.code} {e.reason}"
        raise StatusUnavailable(
            f"cannot reach the site's status API at {base} ({reason}); is `meshlink run` up?"
        ) from None


def fetch(base_url: str, *, timeout: float = 5.0) -> SiteStatus:
    """GET ``<base_url>/api/status``; StatusUnavailable (one line) if it does not answer."""
    data = _get_json(base_url, "/api/status", timeout)
    if not isinstance(data, dict) or "site" not in data:
        raise StatusUnavailable(f"{base_url.rstrip('/')}/api/status did not answer a site status")
    return cast(SiteStatus, data)


def fetch_probes(base_url: str, *, timeout: float = 15.0) -> list[ProbeRow] | None:
    """GET ``<base_url>/api/probe`` (the site connects to its exported endpoints); None
    from a site too old to probe."""
    try:
        data = _get_json(base_url, "/api/probe", timeout)
    except StatusUnavailable as e:
        if "404" in str(e):
            return None
        raise
    if not isinstance(data, list):
        raise StatusUnavailable(f"{base_url.rstrip('/')}/api/probe did not answer a probe list")
    return cast(list[ProbeRow], data)


class ReplicaView(TypedDict):
    """One replica of a Kubernetes site as `meshlink status` shows it: its pod, and what its
    own status API says (``error`` when it did not answer)."""

    name: str
    node: str | None
    ready: bool
    here: bool
    """The replica whose status API was asked first (the CLI's own pod)."""
    leading: bool | None
    links: list[str]
    """The peers it has a link up with."""
    imports: int | None
    error: str | None


REPLICA_TIMEOUT: Final = 2.0


def _links_up(s: SiteStatus) -> list[str]:
    return sorted({str(lk["peer"]) for lk in s["links"] if lk["state"] == "up"})


def _view(pod: ReplicaPod, s: SiteStatus | None, *, here: bool, error: str | None) -> ReplicaView:
    k: PlatformStatus = (s.get("kubernetes") if s is not None else None) or {}
    return {
        "name": pod["name"],
        "node": pod.get("node"),
        "ready": pod["ready"],
        "here": here,
        "leading": k.get("leading") if s is not None else None,
        "links": _links_up(s) if s is not None else [],
        "imports": k.get("imports") if s is not None else None,
        "error": error,
    }


def replicas(
    s: SiteStatus, base_url: str, *, timeout: float = REPLICA_TIMEOUT
) -> list[ReplicaView]:
    """The site's replica set: each meshlink pod the controller knows, with its own status
    (fetched from ``http://<pod IP>:<the ops port of base_url>``; another replica that does
    not answer in ``timeout`` is shown with the error). Empty outside Kubernetes mode."""
    k = s.get("kubernetes") or {}
    pods = k.get("replicas") or []
    me = k.get("replica")
    port = urlsplit(base_url).port or 80
    out: list[ReplicaView] = []
    for pod in pods:
        if pod["name"] == me:
            out.append(_view(pod, s, here=True, error=None))
            continue
        if not pod.get("ip"):
            out.append(_view(pod, None, here=False, error="no pod IP yet"))
            continue
        host = pod["ip"] if ":" not in str(pod["ip"]) else f"[{pod['ip']}]"
        try:
            other = fetch(f"http://{host}:{port}", timeout=timeout)
        except StatusUnavailable as e:
            out.append(_view(pod, None, here=False, error=str(e)))
            continue
        out.append(_view(pod, other, here=False, error=None))
    return out


def render_replicas(views: Sequence[ReplicaView], leader: str | None) -> list[str]:
    """The REPLICAS section of `meshlink status` (nothing for a site with no replica set)."""
    if not views:
        return []
    rows = [["REPLICA", "NODE", "READY", "ROLE", "LINKS UP", "IMPORTS"]]
    for v in views:
        if v["error"] is not None:
            role = "?"
        elif v["leading"] is None:
            role = "-"
        else:
            role = "leader" if v["leading"] else "standby"
        rows.append(
            [
                v["name"] + (" (this)" if v["here"] else ""),
                v["node"] or "-",
                "yes" if v["ready"] else "no",
                role,
                ", ".join(v["links"]) or ("-" if v["error"] is None else f"({v['error']})"),
                "-" if v["imports"] is None else str(v["imports"]),
            ]
        )
    head = f"REPLICAS (lease holder: {leader})" if leader else "REPLICAS"
    return ["", head, *_section(rows)]


def check_replicas(
    views: Sequence[ReplicaView], leader: str | None, *, elected: bool
) -> list[tuple[Verdict, str]]:
    """`meshlink check` on the replica set: one leader, every replica ready and answering,
    and the same links on each (a replica missing a link fails the flows it carries)."""
    if not views:
        return []
    out: list[tuple[Verdict, str]] = []
    ready = [v for v in views if v["ready"]]
    if not ready:
        out.append(
            ("FAIL", "no meshlink replica is ready: see `kubectl -n meshlink-system get pods`")
        )
    elif len(ready) < len(views):
        names = ", ".join(v["name"] for v in views if not v["ready"])
        out.append(
            (
                "WARN",
                f"{len(ready)} of {len(views)} meshlink replicas ready ({names} not): one more "
                "failure is an outage; see `kubectl -n meshlink-system describe pod`",
            )
        )
    else:
        out.append(("PASS", f"{len(views)} meshlink replica(s) ready"))
    if elected:
        leaders = [v["name"] for v in views if v["leading"]]
        if len(leaders) > 1:
            out.append(("FAIL", f"more than one replica says it leads: {', '.join(leaders)}"))
        elif not leader or leader not in {v["name"] for v in views}:
            out.append(
                (
                    "WARN" if leader else "FAIL",
                    "no replica holds the Lease meshlink-leader"
                    + (f" (it names {leader}, gone)" if leader else "")
                    + ": imports and export status are not written until one does (a Lease "
                    "is taken over once it expires)",
                )
            )
        else:
            out.append(("PASS", f"replica {leader} holds the Lease and writes"))
    for v in views:
        if v["error"] is not None and v["ready"]:
            out.append(("WARN", f"replica {v['name']} did not answer: {v['error']}"))
    answered = [v for v in views if v["error"] is None and v["ready"]]
    every = set().union(*(set(v["links"]) for v in answered)) if answered else set()
    for v in answered:
        missing = sorted(every - set(v["links"]))
        if missing:
            out.append(
                (
                    "WARN",
                    f"replica {v['name']} has no link up with {', '.join(missing)} (another "
                    "replica has): new flows it carries to those sites fail until it links "
                    "again; see its log",
                )
            )
    return out


# -- showing and checking ------------------------------------------------------------------


def _section(rows: list[list[str]]) -> list[str]:
    return ["  (none)"] if len(rows) <= 1 else text.table(rows, "  ")


def _rtt(v: object) -> str:
    return f"{v:.2f} ms" if isinstance(v, (int, float)) else "-"


def _bytes(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n //= 1024
    return f"{n} TiB"


def render(s: SiteStatus) -> str:
    """`meshlink status`: one screen."""
    out = [
        f"site {s['site']}{_instance(s)}  ({s['mode']} mode, meshlink {s['version']}, "
        f"up {s['uptime_s']} s)",
        f"  gateway {s['gateway']}   grant {s['grant']}   dns {s.get('dns') or 'off'}   "
        f"zone {s['zone']}",
        f"  CA pin {s['ca_pin']}",
    ]
    k = s.get("kubernetes")
    if k:
        if k.get("reachable") is False:
            api = f"UNREACHABLE for {k.get('unreachable_for_s')} s"
        else:
            api = "synced" if k.get("synced") else "syncing"
        out.append(
            f"  kubernetes: API server {k.get('api_server') or '-'} ({api}), "
            f"{k.get('exports', 0)} exports, {k.get('imports', 0)} imports, "
            f"{k.get('queued', 0)} queued"
        )
    out += ["", "LINKS"]
    rows = [["PEER", "INSTANCE", "DIR", "STATE", "RTT", "FLOWS", "IN", "OUT", "LAST ERROR"]]
    rows += [
        [
            str(link["peer"]),
            _peer_instance(link),
            str(link["direction"]),
            str(link["state"]),
            _rtt(link.get("rtt_ms")),
            str(link.get("flows", 0)),
            _bytes(link.get("bytes_in")),
            _bytes(link.get("bytes_out")),
            str(link.get("last_error") or ""),
        ]
        for link in s["links"]
    ]
    out += _section(rows)
    out += ["", "SITES IN THE CLUSTERSET"]
    rows = [["SITE", "HOPS", "PATH"]]
    rows += [
        [x["site"], str(x["hops"]), " > ".join([s["site"], *x["path"]]) if x["path"] else "(self)"]
        for x in s["sites"]
    ]
    out += _section(rows)
    out += ["", "EXPORTS (this site)"]
    rows = [["SERVICE", "PORTS"]]
    rows += [[e["service"], ",".join(map(str, e["ports"]))] for e in s["exports"]]
    out += _section(rows)
    out += ["", "IMPORTS"]
    rows = [["NAME", "TYPE", "IP", "PORTS", "CLUSTERS (reachable)"]]
    for i in s["imports"]:
        clusters = ", ".join(c if c in i["reachable"] else f"{c} (down)" for c in i["clusters"])
        rows.append(
            [
                i["name"],
                i["type"],
                ",".join(i["ips"]) or "-",
                ",".join(map(str, i["ports"])),
                clusters,
            ]
        )
    out += _section(rows)
    if s.get("listener_errors"):
        out += ["", "IMPORT LISTENERS THAT CANNOT LISTEN (retried every 5 s)"]
        rows = [["SERVICE", "PORT", "ADDRESS", "ERROR"]]
        rows += [
            [e["service"], str(e["port"]), e["address"], e["error"]]
            for e in s.get("listener_errors", [])
        ]
        out += _section(rows)
    if s.get("conflicts"):
        out += ["", "CONFLICTS"]
        rows = [["SERVICE", "WINNER", "REASONS"]]
        rows += [
            [c["service"], c["winner"], ", ".join(c["reasons"])] for c in s.get("conflicts", [])
        ]
        out += _section(rows)
    return "\n".join(out)


def _instance(s: SiteStatus) -> str:
    """`` instance X (1 of 2)`` for the header line (nothing from an older site)."""
    name = s.get("instance")
    if not name:
        return ""
    return f" instance {name} (of {s.get('replicas', 1)})"


def _peer_instance(link: LinkRow) -> str:
    name = link.get("instance") or "-"
    replicas = link.get("replicas", 1)
    return f"{name} (of {replicas})" if link.get("instance") and replicas > 1 else name


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _in(seconds: float) -> str:
    """A duration for a person: "3 d", "5 h", "12 min", "40 s"."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _check_link(link: LinkRow, now: float) -> list[tuple[Verdict, str]]:
    peer = link["peer"]
    out: list[tuple[Verdict, str]] = []
    if link.get("refused") and link["state"] != "up":
        out.append(
            (
                "FAIL",
                f"site {peer} refused this site: its link was revoked or deleted there. A new "
                f"token is the fix: `meshlink token create` on {peer}, then here "
                f"`meshlink link delete {peer}` and `meshlink link create TOKEN`",
            )
        )
    elif link["state"] == "up":
        out.append(("PASS", f"link to {peer} is up (RTT {_rtt(link.get('rtt_ms'))})"))
    else:
        err = link.get("last_error") or "no error recorded"
        out.append(
            (
                "FAIL",
                f"link to {peer} is {link['state']}: {err}; check that the peer runs and its "
                "gateway address is reachable",
            )
        )
    expires = link.get("cert_expires")
    if link["direction"] == "dial" and link.get("cert_due") and not link.get("refused"):
        why = link.get("reauth_error")
        if expires is None:
            out.append(("FAIL", f"the link certificate for {peer} is missing or unreadable"))
        elif expires <= now:
            out.append(
                (
                    "FAIL",
                    f"the link certificate for {peer} expired at {_when(expires)}; it is "
                    f"re-issued without a token once {peer}'s grant endpoint answers"
                    + (f" (now: {why})" if why else ""),
                )
            )
        elif link["state"] != "up":
            out.append(
                (
                    "WARN",
                    f"the link certificate for {peer} expires in {_in(expires - now)} "
                    f"({_when(expires)}) and the link is down: it is renewed without a token "
                    f"once {peer}'s grant endpoint answers" + (f" (now: {why})" if why else ""),
                )
            )
    return out


def _check_address(key: str, address: str) -> tuple[Verdict, str] | None:
    """An advertised address other sites cannot use, if it is one."""
    try:
        host = parse_hostport(address, key).host
        ip = ipaddress.ip_address(host)
    except (MeshlinkError, ValueError):
        return None  # a host name: it resolves elsewhere, nothing to say here
    if ip.is_unspecified:
        return (
            "FAIL",
            f"{key} is {address}: {host} is no address another site can dial; set {key} to "
            "one it can reach",
        )
    if ip.is_loopback:
        return (
            "WARN",
            f"{key} is {address}: only sites on this very host can dial a loopback address",
        )
    if ip.is_link_local:
        return ("WARN", f"{key} is {address}: a link-local address is only usable on one LAN")
    return None


def check(s: SiteStatus) -> list[tuple[Verdict, str]]:
    """Health checks with one line each: what is wrong and what to do (no I/O)."""
    now = time.time()
    out: list[tuple[Verdict, str]] = [
        ("PASS", f"site {s['site']} is running (up {s['uptime_s']} s)")
    ]
    links = s["links"]
    if not links and not s.get("peers"):
        out.append(
            (
                "FAIL",
                "no links: run `meshlink token create` on one site and "
                "`meshlink link create TOKEN` on the other",
            )
        )
    for link in links:
        out += _check_link(link, now)
    any_up = any(lk["state"] == "up" for lk in links) or any(p["up"] for p in s.get("peers", []))
    for peer in s.get("peers", []):
        if not peer["up"] and peer["site"] not in {lk["peer"] for lk in links}:
            left = peer["cert_expires"] - now
            out.append(
                (
                    "WARN" if any_up else "FAIL",
                    f"site {peer['site']} (it links to this site) is not connected; the link "
                    f"certificate this site gave it "
                    + (f"expires in {_in(left)}" if left > 0 else "has expired")
                    + f" ({_when(peer['cert_expires'])}), after which it re-authenticates",
                )
            )
    for i in s["imports"]:
        if i["type"] == "ClusterSetIP" and not i["reachable"]:
            out.append(
                (
                    "FAIL",
                    f"import {i['name']} has no reachable exporting site "
                    f"({', '.join(i['clusters'])})",
                )
            )
    if s["imports"] and all(i["reachable"] or i["type"] != "ClusterSetIP" for i in s["imports"]):
        out.append(("PASS", f"{len(s['imports'])} import(s), each with a reachable exporting site"))
    for u in s.get("unreachable", []):
        out.append(
            (
                "WARN",
                f"site {u['site']} is unreachable: its {u['exports']} export(s) stay, with no "
                f"ready endpoint, for the rest of the grace period ({_in(u['grace_left_s'])})",
            )
        )
    k = s.get("kubernetes")
    if k:
        api = k.get("api_server") or "(not connected yet)"
        if k.get("reachable") is False:
            out.append(
                (
                    "FAIL",
                    f"API server {api} unreachable for {k.get('unreachable_for_s')} s: exports "
                    "and imports are frozen; check that it is up and that the kubeconfig or "
                    "service account can reach it",
                )
            )
        elif not k.get("synced"):
            out.append(
                (
                    "FAIL",
                    f"the controller has not finished listing from API server {api}; if this "
                    "lasts, check its RBAC (meshlink's logs name the refused request)",
                )
            )
        else:
            out.append(
                (
                    "PASS",
                    f"API server {api} reachable, controller synced "
                    f"({k.get('exports', 0)} exports, {k.get('imports', 0)} imports)",
                )
            )
    for e in s.get("listener_errors", []):
        out.append(
            (
                "FAIL",
                f"import {e['service']} port {e['port']}: cannot listen on {e['address']}: "
                f"{e['error']}; free that address or change the import range "
                "(imports.pool or kubernetes.importPorts)",
            )
        )
    for c in s.get("conflicts", []):
        out.append(
            (
                "FAIL",
                f"export conflict on {c['service']}: {', '.join(c['reasons'])} "
                f"(site {c['winner']}'s export wins; align the exports)",
            )
        )
    certs = s.get("certs")
    if certs:
        for what, expires, days in (
            (
                "the site CA (not renewed by itself: a new CA means new links)",
                certs["ca_expires"],
                CA_WARN_DAYS,
            ),
            ("the gateway certificate", certs["gateway_expires"], CERT_WARN_DAYS),
        ):
            if expires - now < days * 86400:
                verdict: Verdict = "FAIL" if expires <= now else "WARN"
                out.append((verdict, f"{what} expires in {_in(expires - now)} ({_when(expires)})"))
    for addr in s.get("advertise", []):
        if (found := _check_address("gateway.advertise", addr)) is not None:
            out.append(found)
    if (found := _check_address("grant.advertise", s["grant"])) is not None:
        out.append(found)
    return out


PROBE_TIMEOUT: Final = 2.0
PROBE_CONCURRENCY: Final = 32
MAX_PROBES: Final = 1000


async def probe_exports(targets: Sequence[ExportTarget]) -> list[ProbeRow]:
    """Connect to every exported endpoint (at most ``MAX_PROBES``, ``PROBE_CONCURRENCY``
    at a time), as the gateway would for a flow: what ``meshlink check`` judges."""
    sem = asyncio.Semaphore(PROBE_CONCURRENCY)

    async def one(t: ExportTarget) -> ProbeRow:
        row: ProbeRow = {
            "service": str(t.service),
            "port": t.port,
            "target": None if t.address is None else str(HostPort(*t.address)),
            "error": t.why,
        }
        if t.address is None:
            return row
        async with sem:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    _, writer = await asyncio.open_connection(*t.address)
            except TimeoutError:
                row["error"] = f"no answer within {PROBE_TIMEOUT:g} s"
                return row
            except OSError as e:
                row["error"] = os.strerror(e.errno) if e.errno else str(e)
                return row
        writer.transport.abort()
        return row

    return list(await asyncio.gather(*(one(t) for t in targets[:MAX_PROBES])))


def check_exports(rows: Sequence[ProbeRow]) -> list[tuple[Verdict, str]]:
    """The verdicts on what ``probe_exports`` found."""
    bad = [r for r in rows if r["error"] is not None]
    out: list[tuple[Verdict, str]] = [
        (
            "FAIL",
            f"export {r['service']} port {r['port']}: "
            + (f"{r['target']}: {r['error']}" if r["target"] else str(r["error"]))
            + "; flows from other sites to it fail: check the endpoint (is it running?)",
        )
        for r in bad
    ]
    if rows and not bad:
        out.append(("PASS", f"every exported endpoint answers ({len(rows)} probed)"))
    return out


def dns_query(host: str, port: int, name: str, qtype: str, *, timeout: float = 2.0) -> DNSRecord:
    """One DNS question over UDP; OSError (or ValueError for a garbled reply) on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name, qtype).pack(), (host, port))
        return DNSRecord.parse(sock.recv(4096))


def probe_dns(address: str, zone: str) -> tuple[Verdict, str]:
    """Ask the site's DNS server for ``dns-version.<zone>`` TXT over UDP."""
    hp = parse_hostport(address, "dns")
    name = f"dns-version.{zone}"
    try:
        reply = dns_query(hp.host, hp.port, name, "TXT")
    except (OSError, ValueError) as e:
        return ("FAIL", f"DNS at {hp} does not answer ({e}); check dns.listen and the logs")
    texts = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.TXT]
    if reply.header.rcode != RCODE.NOERROR or not texts:
        return ("FAIL", f"DNS at {hp} answered {RCODE[reply.header.rcode]} for {name}")
    return ("PASS", f"DNS at {hp} answers {name} {texts[0]}")


def probes(s: SiteStatus) -> list[tuple[Verdict, str]]:
    """The checks that ask the site itself (I/O): its DNS server, when it serves one."""
    dns = s.get("dns")
    return [probe_dns(dns, s["zone"])] if dns else []
