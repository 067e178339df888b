"""Catalog replication between sites: a sans-IO path-vector protocol.

Every site originates entries (its exports, plus one ``SiteInfo`` announcing itself) and
learns entries from its direct peers. An entry travels with its *path*: the list of sites
it crossed, from the sending peer back to its origin. The rules:

- From peer ``P`` an entry is accepted only if ``path[0] == P`` (the certificate identity
  of the link) and ``path[-1] == origin``: a peer can only originate its own records, and
  can only re-advertise others' with itself prepended. Entries whose origin is this site
  are refused; entries whose path already contains this site are dropped (loop freedom).
- A site may run several instances (replicas), each its own speaker with its own links
  and its own version counter: the unit of replication is the link with one *instance* of
  a peer site (``peer_up(site, instance)``; instance "" for a peer that names none). Each
  such link's advertisements are kept apart (like BGP's Adj-RIB-In per neighbour), and
  deltas are kept per link: each instance gets the whole stream.
- The best entry for a key is the local one; else, among the entries of the newest
  content (the content of the highest version; the instances of one origin stamp the same
  content with different versions), the shortest path, then the lowest peer site, then
  instance. Among equally good entries the current best is kept (RFC 5004's rule against
  best-path flaps): when one instance of a site goes away and another carries the same
  content, nothing changes at all (no update sent, ``services()`` the same), even though
  the other's version differs.
- Best entries are re-advertised to every peer except the site they came from and any site
  already on their path (split horizon with poison), as ordered deltas.
- A site says nothing before it knows its own exports (``hold_until_local``): its first
  ``set_local`` releases the snapshots of the links already up. A restarted site whose
  platform has not listed its exports yet would otherwise announce itself reachable without
  them, and every peer would withdraw them at once (a ServiceImport deleted and recreated
  with a new ClusterSetIP: the churn the grace period exists to prevent).
- On link up, the peer instance gets a full snapshot: one update, however large (the codec
  splits it into fragments, and ``receive`` applies them together, so a snapshot is never
  seen in part). On link down, everything learned over that link is dropped from its
  RIB-in at once, and entries no other link has a path for are withdrawn from every peer:
  an instance's records that its site's other instances lack go with it (no ghosts).

The grace period (``grace`` seconds; 0 turns it off): endpoints follow liveness, names
follow the export. When an export record loses its last path *and its origin site is no
longer reachable* (its ``SiteInfo`` went too: a link loss, a restart, a partition), it is
kept here as *stale* for ``grace`` seconds: ``services()`` still lists it, with no ready
endpoint, so DNS keeps the name and the clusterset IP while new flows fail over to other
exporters (``route_to`` knows no unreachable site). A stale record goes when a live one
replaces it, when ``expire`` finds its grace over, or when its origin is reachable again
without it (the update that made the origin reachable carried all its current records:
the origin withdrew that export meanwhile). A record withdrawn while its origin stays
reachable is an export withdrawn at its origin, and goes at once. Stale records are never
advertised: each site keeps its own. ``peer_down(peer, unlinked=True)`` and ``forget``
keep nothing: an unlink is not an outage. This is the KEP's endpoint lease done right.

Across a restart: ``remembered`` lists the other sites' export records this site knows
(with when each was last live), for the caller to keep in the state directory; a
restarted site ``restore``-s them as stale, each for what is left of its grace period, so
an importer restarted while an exporter is away keeps that exporter's imports too.

Messages are ``control.Update``s, one per peer and change, whose entries are JSON-ready:
entry = ``{"path": [...], "rec": record}`` or ``{"path": [...], "site": {...}}``,
key = ``(origin, namespace, name)`` (namespace and name empty for a SiteInfo).
``catalog.control`` owns encoding (and splitting by size); this module owns only the state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from meshlink.catalog.control import Update
from meshlink.catalog.records import (
    ExportRecord,
    ServiceKey,
    SiteInfo,
    check_site_id,
    record_from_wire,
    record_to_wire,
)
from meshlink.errors import CatalogError

MAX_PATH: Final = 16
MAX_FRAGMENTS: Final = 64
"""Fragments of one update a peer may send before the last one (64 x 512 KiB): beyond,
the partial update is dropped and refused."""

EntryKey = tuple[str, str, str]
"""(origin, namespace, name); ("site", "", "") style keys hold SiteInfo."""
Peer = tuple[str, str]
"""(site, instance): one link's speaker."""


@dataclass(frozen=True, slots=True)
class Entry:
    path: tuple[str, ...]
    """Sites from the peer that sent it to the origin; empty for local entries."""
    value: ExportRecord | SiteInfo

    @property
    def origin(self) -> str:
        return self.value.origin if isinstance(self.value, ExportRecord) else self.value.site

    @property
    def version(self) -> int:
        return self.value.version

    @property
    def key(self) -> EntryKey:
        v = self.value
        if isinstance(v, ExportRecord):
            return (v.origin, v.namespace, v.name)
        return (v.site, "", "")


@dataclass(frozen=True, slots=True)
class Send:
    """A message for one peer instance (over the link with it)."""

    peer: str
    message: Update
    instance: str = ""


@dataclass(frozen=True, slots=True)
class SiteRoute:
    site: str
    path: tuple[str, ...]
    """Empty for this site; else the sites crossed, the first being the next hop."""
    info: SiteInfo

    @property
    def hops(self) -> int:
        return len(self.path)

    @property
    def via(self) -> str | None:
        return self.path[0] if self.path else None


def _content(value: ExportRecord | SiteInfo) -> ExportRecord | SiteInfo:
    """``value`` without its version: what two instances of one origin agree on."""
    return dataclasses.replace(value, version=0)


def _entry_to_wire(site: str, e: Entry) -> dict[str, Any]:
    path = [site, *e.path]
    if isinstance(e.value, ExportRecord):
        return {"path": path, "rec": record_to_wire(e.value)}
    info = e.value
    return {
        "path": path,
        "site": {"site": info.site, "version": info.version, "gw": list(info.gateway_endpoints)},
    }


def _site_from_wire(d: object) -> SiteInfo:
    if not isinstance(d, dict):
        raise CatalogError("site entry is not an object")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CatalogError(f"site version {version!r} is not a non-negative integer")
    gw = d.get("gw", [])
    if not isinstance(gw, list) or len(gw) > 16 or not all(isinstance(x, str) for x in gw):
        raise CatalogError("site gw must be a list of at most 16 strings")
    return SiteInfo(site=check_site_id(d.get("site")), version=version, gateway_endpoints=tuple(gw))


@dataclass(frozen=True, slots=True)
class Stale:
    """An export record of an unreachable site, kept for the grace period."""

    record: ExportRecord
    """As served meanwhile: the record with no ready endpoint."""
    until: float
    """When the grace period ends (the catalog's clock)."""


def unready(rec: ExportRecord) -> ExportRecord:
    """``rec`` with none of its endpoints ready (what a stale record serves)."""
    return dataclasses.replace(
        rec,
        ready_endpoints=0,
        endpoints=tuple(dataclasses.replace(ep, ready=False) for ep in rec.endpoints),
    )


class Catalog:
    """The replicated catalog of one site. Sans-IO: methods return the messages to send.
    ``grace`` is the grace period in seconds and ``clock`` the monotonic clock it is
    measured with; ``hold_until_local``: advertise nothing before the first ``set_local``
    (see the module docstring)."""

    def __init__(
        self,
        site: str,
        *,
        gateway_endpoints: Iterable[str] = (),
        grace: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        hold_until_local: bool = False,
    ):
        self.site = check_site_id(site)
        self.holding = hold_until_local
        """Nothing is advertised yet: this site's exports are not known."""
        self.grace = grace
        self._now = clock
        self._clock = time.time_ns()
        self._local: dict[EntryKey, Entry] = {}
        self._rib: dict[Peer, dict[EntryKey, Entry]] = {}
        self._best: dict[EntryKey, tuple[str | None, Entry]] = {}
        self._sent: dict[Peer, dict[EntryKey, tuple[int, tuple[str, ...]]]] = {}
        self._stale: dict[EntryKey, Stale] = {}
        self._partial: dict[Peer, list[Update]] = {}
        self._keep_lost = True  # False while a peer_down of an unlink recomputes
        self.generation = 0
        """Bumped whenever any best entry changes: consumers compare it to skip work."""
        info = SiteInfo(self.site, self._next_version(), tuple(gateway_endpoints))
        self._local[(self.site, "", "")] = Entry((), info)
        self._recompute(self._local.keys())

    # -- local side ----------------------------------------------------------------------

    def _next_version(self) -> int:
        self._clock = max(self._clock + 1, time.time_ns())
        return self._clock

    def set_local(self, records: Iterable[ExportRecord]) -> list[Send]:
        """Replace this site's exports. Versions are stamped here: a record whose content
        did not change keeps its version, a changed one gets a newer one."""
        wanted: dict[EntryKey, ExportRecord] = {}
        for r in records:
            if r.origin != self.site:
                raise ValueError(f"local record {r.key} has origin {r.origin}, not {self.site}")
            wanted[(r.origin, r.namespace, r.name)] = r
        touched: set[EntryKey] = set()
        for key, prev in list(self._local.items()):
            if isinstance(prev.value, ExportRecord) and key not in wanted:
                del self._local[key]
                touched.add(key)
        for key, rec in wanted.items():
            old = self._local.get(key)
            if (
                old is not None
                and isinstance(old.value, ExportRecord)
                and dataclasses.replace(rec, version=old.value.version) == old.value
            ):
                continue
            stamped = dataclasses.replace(rec, version=self._next_version())
            self._local[key] = Entry((), stamped)
            touched.add(key)
        if self.holding:  # each link up meanwhile gets its snapshot now, in one update
            self._recompute(touched)
            self.holding = False
            return [s for link in sorted(self._rib) for s in self._sync_peer(link, self._best)]
        return self._recompute(touched)

    # -- peers ---------------------------------------------------------------------------

    def peer_up(self, peer: str, instance: str = "") -> list[Send]:
        """A link to ``instance`` of ``peer`` came up: send it everything it should know."""
        check_site_id(peer)
        key = (peer, instance)
        self._rib.setdefault(key, {})
        self._sent[key] = {}
        return self._sync_peer(key, self._best.keys())

    def peer_down(self, peer: str, instance: str = "", *, unlinked: bool = False) -> list[Send]:
        """The link to ``instance`` of ``peer`` is gone: forget what it told us, withdraw
        what only it had (records of sites now unreachable go stale for the grace period,
        unless the link ended in an unlink)."""
        key = (peer, instance)
        learned = self._rib.pop(key, {})
        self._sent.pop(key, None)
        self._partial.pop(key, None)
        self._keep_lost = not unlinked
        try:
            return self._recompute(learned.keys())
        finally:
            self._keep_lost = True

    def forget(self, site: str) -> bool:
        """Drop the stale records of ``site`` (it was unlinked while unreachable); True if
        there were any."""
        keys = [k for k in self._stale if k[0] == site]
        for k in keys:
            del self._stale[k]
        if keys:
            self.generation += 1
        return bool(keys)

    def expire(self) -> bool:
        """Drop the stale records whose grace period is over; True if there were any."""
        now = self._now()
        keys = [k for k, st in self._stale.items() if st.until <= now]
        for k in keys:
            del self._stale[k]
        if keys:
            self.generation += 1
        return bool(keys)

    def stale(self) -> dict[str, tuple[int, float]]:
        """The unreachable sites whose records are kept: site -> (how many, the earliest
        end of their grace period, on the catalog's clock)."""
        out: dict[str, tuple[int, float]] = {}
        for (origin, _, _), st in self._stale.items():
            n, until = out.get(origin, (0, st.until))
            out[origin] = (n + 1, min(until, st.until))
        return out

    def remembered(self, now: float) -> list[dict[str, Any]]:
        """Other sites' export records, live and stale, as ``{"rec": wire record, "seen":
        when it was last live}`` (``now`` and ``seen`` are wall-clock seconds)."""
        out = [
            {"rec": record_to_wire(e.value), "seen": now}
            for via, e in self._best.values()
            if via is not None and isinstance(e.value, ExportRecord)
        ]
        mono = self._now()
        out += [
            {"rec": record_to_wire(st.record), "seen": now - (mono - (st.until - self.grace))}
            for st in self._stale.values()
        ]
        return out

    def restore(self, saved: Iterable[object], now: float) -> tuple[int, list[str]]:
        """Take back ``remembered`` records (of an earlier run) as stale, each for what is
        left of its grace period (``now``: wall-clock seconds). Returns how many, and one
        line per entry refused (a damaged file loses those entries only)."""
        if self.grace <= 0:
            return 0, []
        mono = self._now()
        taken = 0
        refused = []
        for item in saved:
            try:
                if not isinstance(item, dict) or not isinstance(item.get("seen"), (int, float)):
                    raise CatalogError("not a remembered record")
                rec = record_from_wire(item.get("rec"))
            except CatalogError as e:
                refused.append(str(e))
                continue
            key = (rec.origin, rec.namespace, rec.name)
            left = float(item["seen"]) + self.grace - now
            if rec.origin == self.site or key in self._best or not 0 < left <= self.grace:
                continue
            self._stale[key] = Stale(unready(rec), mono + left)
            taken += 1
        if taken:
            self.generation += 1
        return taken, refused

    def peers(self) -> tuple[str, ...]:
        """The sites with a live link (to any of their instances)."""
        return tuple(sorted({site for site, _ in self._rib}))

    def receive(
        self, peer: str, message: Update, instance: str = ""
    ) -> tuple[list[Send], list[str]]:
        """Apply an update from ``instance`` of ``peer``. Returns messages to send and one
        line per refused entry (the rest of the message is still applied). The fragments of
        an update (``more``) are held until its last one and applied together. Raises
        CatalogError only when the peer has no live link, or sends too many fragments."""
        link = (peer, instance)
        if link not in self._rib:
            raise CatalogError(f"update from {peer}, which has no live link")
        if message.more or link in self._partial:
            parts = self._partial.setdefault(link, [])
            parts.append(message)
            if message.more:
                if len(parts) > MAX_FRAGMENTS:
                    del self._partial[link]
                    raise CatalogError(
                        f"update from {peer} in more than {MAX_FRAGMENTS} fragments: dropped"
                    )
                return [], []
            del self._partial[link]
            message = Update(
                tuple(a for p in parts for a in p.add), tuple(d for p in parts for d in p.delete)
            )
        rib = self._rib[link]
        touched: set[EntryKey] = set()
        refused: list[str] = []
        for key in message.delete:
            if key in rib:
                del rib[key]
                touched.add(key)
        for raw in message.add:
            try:
                entry = self._parse_entry(peer, raw)
            except CatalogError as e:
                refused.append(f"from {peer}: {e}")
                continue
            if entry is None:
                continue
            rib[entry.key] = entry
            touched.add(entry.key)
        return self._recompute(touched), refused

    def _parse_entry(self, peer: str, raw: object) -> Entry | None:
        if not isinstance(raw, dict):
            raise CatalogError("entry is not an object")
        path_raw = raw.get("path")
        if not isinstance(path_raw, list) or not 1 <= len(path_raw) <= MAX_PATH:
            raise CatalogError(f"entry path must be a list of 1 to {MAX_PATH} site ids")
        path = tuple(check_site_id(p, "path element") for p in path_raw)
        if len(set(path)) != len(path):
            raise CatalogError(f"entry path {'>'.join(path)} has a loop")
        if path[0] != peer:
            raise CatalogError(f"entry path starts at {path[0]}, but the link is to {peer}")
        value: ExportRecord | SiteInfo
        if "rec" in raw:
            value = record_from_wire(raw["rec"])
            origin = value.origin
        elif "site" in raw:
            value = _site_from_wire(raw["site"])
            origin = value.site
        else:
            raise CatalogError("entry has neither rec nor site")
        if origin == self.site:
            raise CatalogError(f"entry claims this site ({self.site}) as its origin")
        if path[-1] != origin:
            who = "direct peer" if len(path) == 1 else f"path {'>'.join(path)}"
            raise CatalogError(f"{who} carries a record of origin {origin}: refused")
        if self.site in path:
            return None  # would loop through us: drop silently, as path-vector does
        return Entry(path, value)

    # -- best-path selection and advertisement -------------------------------------------

    def _select(self, key: EntryKey) -> tuple[str | None, Entry] | None:
        """The best entry for ``key`` (see the module docstring for the order)."""
        local = self._local.get(key)
        if local is not None:
            return (None, local)
        found = [(p, e) for p, rib in self._rib.items() if (e := rib.get(key)) is not None]
        if not found:
            return None
        if len(found) == 1:
            (site, _), entry = found[0]
            return self._keep_current(key, site, entry)
        newest = _content(max(found, key=lambda pe: pe[1].version)[1].value)
        same = [(p, e) for p, e in found if _content(e.value) == newest]
        (site, _), entry = min(same, key=lambda pe: (len(pe[1].path), pe[0]))
        return self._keep_current(key, site, entry)

    def _keep_current(self, key: EntryKey, site: str, entry: Entry) -> tuple[str, Entry]:
        """``(site, entry)``, or the current best if it is as good: the same next hop, path
        and content, another version (another instance's)."""
        old = self._best.get(key)
        if old is not None:
            via, current = old
            if (
                via == site
                and current.path == entry.path
                and current.version != entry.version
                and _content(current.value) == _content(entry.value)
            ):
                return (site, current)
        return (site, entry)

    def _recompute(self, keys: Iterable[EntryKey]) -> list[Send]:
        changed: set[EntryKey] = set()
        lost: list[Entry] = []
        for key in set(keys):
            new = self._select(key)
            old = self._best.get(key)
            if new == old:
                continue
            if new is None:
                del self._best[key]
                assert old is not None
                if old[0] is not None and isinstance(old[1].value, ExportRecord):
                    lost.append(old[1])
            else:
                self._best[key] = new
            changed.add(key)
        if not changed:
            return []
        self._follow_stale(changed, lost)
        self.generation += 1
        out: list[Send] = []
        for link in sorted(self._rib):
            out.extend(self._sync_peer(link, changed))
        return out

    def _reachable(self, site: str) -> bool:
        return (site, "", "") in self._best

    def _follow_stale(self, changed: set[EntryKey], lost: list[Entry]) -> None:
        """The stale set after a change of best entries (see the module docstring)."""
        for key in changed & self._stale.keys():
            if key in self._best:
                del self._stale[key]  # live again
        back = {k[0] for k in changed if k[1:] == ("", "") and k in self._best}
        if back:  # sites reachable again: what they did not re-advertise, they withdrew
            for key in [k for k in self._stale if k[0] in back]:
                del self._stale[key]
        if self.grace > 0 and self._keep_lost:
            until = self._now() + self.grace
            for entry in lost:
                if not self._reachable(entry.origin):
                    assert isinstance(entry.value, ExportRecord)
                    self._stale[entry.key] = Stale(unready(entry.value), until)

    def _advertisable(self, peer: str, key: EntryKey) -> Entry | None:
        """The entry to advertise to (any instance of) site ``peer`` for ``key``."""
        best = self._best.get(key)
        if best is None:
            return None
        via, entry = best
        if via == peer or peer in entry.path or entry.origin == peer:
            return None
        return entry

    def _sync_peer(self, link: Peer, keys: Iterable[EntryKey]) -> list[Send]:
        if self.holding:
            return []
        peer, instance = link
        sent = self._sent.setdefault(link, {})
        adds: list[dict[str, Any]] = []
        dels: list[EntryKey] = []
        for key in sorted(keys):
            entry = self._advertisable(peer, key)
            if entry is None:
                if sent.pop(key, None) is not None:
                    dels.append(key)
                continue
            stamp = (entry.version, entry.path)
            if sent.get(key) == stamp:
                continue
            sent[key] = stamp
            adds.append(_entry_to_wire(self.site, entry))
        if not adds and not dels:
            return []
        return [Send(peer, Update(tuple(adds), tuple(dels)), instance)]

    # -- queries -------------------------------------------------------------------------

    def services(self) -> dict[ServiceKey, tuple[ExportRecord, ...]]:
        """Every live export in the clusterset (own included), and every stale one with no
        ready endpoint, grouped by service."""
        out: dict[ServiceKey, list[ExportRecord]] = {}
        for _via, entry in self._best.values():
            if isinstance(entry.value, ExportRecord):
                out.setdefault(entry.value.key, []).append(entry.value)
        for st in self._stale.values():
            out.setdefault(st.record.key, []).append(st.record)
        return {k: tuple(sorted(v, key=lambda r: r.origin)) for k, v in out.items()}

    def sites(self) -> dict[str, SiteRoute]:
        """Every site with a live path, this one included (path empty)."""
        out = {}
        for via, entry in self._best.values():
            if isinstance(entry.value, SiteInfo):
                path = entry.path if via is not None else ()
                out[entry.value.site] = SiteRoute(entry.value.site, path, entry.value)
        return out

    def route_to(self, site: str) -> SiteRoute | None:
        """One site's route (``sites()`` without walking every record: per-flow use)."""
        best = self._best.get((site, "", ""))
        if best is None:
            return None
        via, entry = best
        if not isinstance(entry.value, SiteInfo):
            return None
        return SiteRoute(site, entry.path if via is not None else (), entry.value)

    def next_hop(self, site: str) -> str | None:
        """The peer to send a flow for ``site`` to; None for this site or no path."""
        best = self._best.get((site, "", ""))
        if best is None or best[0] is None:
            return None
        return best[0]
