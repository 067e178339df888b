"""The status contract of a running site: its schema, how it is collected, fetched, shown
and checked.

- ``SiteStatus`` (and its row types) is the JSON the ops server serves at ``/api/status``;
  it carries no secrets (no keys, no token material).
- ``collect`` builds it from the site's parts (the runtime calls it; ops serves the result).
- ``fetch`` is the one client of that API (``meshlink status``/``check``, the demo, tests).
- ``render`` is `meshlink status`'s one screen; ``check`` the health verdicts of
  `meshlink check`, one line each saying what is wrong and what to do; ``probes`` the
  checks that ask the site itself (its DNS server), with ``dns_query`` their client.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict, cast

from dnslib import QTYPE, RCODE, DNSRecord

from meshlink import __version__, text
from meshlink.catalog.sync import Catalog
from meshlink.catalog.view import Conflict, ImportedService, ListenerSpec, PlatformStatus
from meshlink.config import SiteConfig, parse_hostport
from meshlink.errors import MeshlinkError
from meshlink.tunnel import LinkStatus

MAX_ROWS = 1000
"""Exports, imports and listeners listed at most (the counts stay right in metrics)."""
MAX_ERROR_ROWS = 100


class LinkRow(TypedDict):
    peer: str
    direction: str
    state: str
    rtt_ms: float | None
    since: float
    flows: int
    bytes_in: int
    bytes_out: int
    last_error: str | None


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
) -> SiteStatus:
    """The status of a site from its parts (see ``SiteStatus``)."""
    sites = catalog.sites()
    zone = config.dns.zone
    return {
        "site": config.site,
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
                "direction": st.direction,
                "state": st.state,
                "rtt_ms": st.rtt_ms,
                "since": st.since,
                "flows": st.flows_open,
                "bytes_in": st.bytes_in,
                "bytes_out": st.bytes_out,
                "last_error": st.last_error,
            }
            for st in links
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
    }


# -- fetching (in the CLI, the demo, tests) -----------------------------------------------


class StatusUnavailable(MeshlinkError):
    """The site's status API did not answer."""


def fetch(base_url: str, *, timeout: float = 5.0) -> SiteStatus:
    """GET ``<base_url>/api/status``; StatusUnavailable (one line) if it does not answer."""
    base = base_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/api/status", timeout=timeout) as resp:  # noqa: S310
            data: Any = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise StatusUnavailable(
            f"cannot reach the site's status API at {base} ({reason}); is `meshlink run` up?"
        ) from None
    if not isinstance(data, dict) or "site" not in data:
        raise StatusUnavailable(f"{base}/api/status did not answer a site status")
    return cast(SiteStatus, data)


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
        f"site {s['site']}  ({s['mode']} mode, meshlink {s['version']}, up {s['uptime_s']} s)",
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
    rows = [["PEER", "DIR", "STATE", "RTT", "FLOWS", "IN", "OUT", "LAST ERROR"]]
    rows += [
        [
            str(link["peer"]),
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


def check(s: SiteStatus) -> list[tuple[bool, str]]:
    """Health checks with one line each: what is wrong and what to do (no I/O)."""
    out: list[tuple[bool, str]] = [(True, f"site {s['site']} is running (up {s['uptime_s']} s)")]
    links = s["links"]
    if not links:
        out.append(
            (
                False,
                "no links: run `meshlink token create` on one site and "
                "`meshlink link create TOKEN` on the other",
            )
        )
    for link in links:
        if link["state"] == "up":
            out.append((True, f"link to {link['peer']} is up (RTT {_rtt(link.get('rtt_ms'))})"))
        else:
            err = link.get("last_error") or "no error recorded"
            out.append(
                (
                    False,
                    f"link to {link['peer']} is {link['state']}: {err}; check that the "
                    "peer runs and its gateway address is reachable",
                )
            )
    for i in s["imports"]:
        if i["type"] == "ClusterSetIP" and not i["reachable"]:
            out.append(
                (
                    False,
                    f"import {i['name']} has no reachable exporting site "
                    f"({', '.join(i['clusters'])})",
                )
            )
    if s["imports"] and all(i["reachable"] or i["type"] != "ClusterSetIP" for i in s["imports"]):
        out.append((True, f"{len(s['imports'])} import(s), each with a reachable exporting site"))
    k = s.get("kubernetes")
    if k:
        api = k.get("api_server") or "(not connected yet)"
        if k.get("reachable") is False:
            out.append(
                (
                    False,
                    f"API server {api} unreachable for {k.get('unreachable_for_s')} s: exports "
                    "and imports are frozen; check that it is up and that the kubeconfig or "
                    "service account can reach it",
                )
            )
        elif not k.get("synced"):
            out.append(
                (
                    False,
                    f"the controller has not finished listing from API server {api}; if this "
                    "lasts, check its RBAC (meshlink's logs name the refused request)",
                )
            )
        else:
            out.append(
                (
                    True,
                    f"API server {api} reachable, controller synced "
                    f"({k.get('exports', 0)} exports, {k.get('imports', 0)} imports)",
                )
            )
    for e in s.get("listener_errors", []):
        out.append(
            (
                False,
                f"import {e['service']} port {e['port']}: cannot listen on {e['address']}: "
                f"{e['error']}; free that address or change the import range "
                "(imports.pool or kubernetes.importPorts)",
            )
        )
    for c in s.get("conflicts", []):
        out.append(
            (
                False,
                f"export conflict on {c['service']}: {', '.join(c['reasons'])} "
                f"(site {c['winner']}'s export wins; align the exports)",
            )
        )
    return out


def dns_query(host: str, port: int, name: str, qtype: str, *, timeout: float = 2.0) -> DNSRecord:
    """One DNS question over UDP; OSError (or ValueError for a garbled reply) on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name, qtype).pack(), (host, port))
        return DNSRecord.parse(sock.recv(4096))


def probe_dns(address: str, zone: str) -> tuple[bool, str]:
    """Ask the site's DNS server for ``dns-version.<zone>`` TXT over UDP."""
    hp = parse_hostport(address, "dns")
    name = f"dns-version.{zone}"
    try:
        reply = dns_query(hp.host, hp.port, name, "TXT")
    except (OSError, ValueError) as e:
        return (False, f"DNS at {hp} does not answer ({e}); check dns.listen and the logs")
    texts = [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.TXT]
    if reply.header.rcode != RCODE.NOERROR or not texts:
        return (False, f"DNS at {hp} answered {RCODE[reply.header.rcode]} for {name}")
    return (True, f"DNS at {hp} answers {name} {texts[0]}")


def probes(s: SiteStatus) -> list[tuple[bool, str]]:
    """The checks that ask the site itself (I/O): its DNS server, when it serves one."""
    dns = s.get("dns")
    return [probe_dns(dns, s["zone"])] if dns else []
