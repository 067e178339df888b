"""Rendering the status API for humans: `meshlink status` (one screen) and `meshlink check`.

Pure functions of the JSON the ops server returns; no I/O.
"""

from __future__ import annotations

from typing import Any


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if len(rows) <= 1:
        return [indent + "(none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


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


def render(s: dict[str, Any]) -> str:
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
    out += _table(rows)
    out += ["", "SITES IN THE CLUSTERSET"]
    rows = [["SITE", "HOPS", "PATH"]]
    rows += [
        [x["site"], str(x["hops"]), " > ".join([s["site"], *x["path"]]) if x["path"] else "(self)"]
        for x in s["sites"]
    ]
    out += _table(rows)
    out += ["", "EXPORTS (this site)"]
    rows = [["SERVICE", "PORTS"]]
    rows += [[e["service"], ",".join(map(str, e["ports"]))] for e in s["exports"]]
    out += _table(rows)
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
    out += _table(rows)
    if s.get("listener_errors"):
        out += ["", "IMPORT LISTENERS THAT CANNOT LISTEN (retried every 5 s)"]
        rows = [["SERVICE", "PORT", "ADDRESS", "ERROR"]]
        rows += [
            [e["service"], str(e["port"]), e["address"], e["error"]] for e in s["listener_errors"]
        ]
        out += _table(rows)
    if s.get("conflicts"):
        out += ["", "CONFLICTS"]
        rows = [["SERVICE", "WINNER", "REASONS"]]
        rows += [[c["service"], c["winner"], ", ".join(c["reasons"])] for c in s["conflicts"]]
        out += _table(rows)
    return "\n".join(out)


def check(s: dict[str, Any]) -> list[tuple[bool, str]]:
    """Health checks with one line each: what is wrong and what to do."""
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
