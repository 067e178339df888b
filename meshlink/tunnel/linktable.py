"""The live links of a gateway, by peer site and peer instance.

A site may run several instances (replicas) of meshlink, each with its own gateway and its
own links (issue 12: active/active). A gateway therefore keeps one link per *(site,
instance)* pair, not per site: links to two instances of one site are both kept, and the
rule for duplicate links (``Gateway._prefer``) applies only within one pair. The site is
up while any of its instances is linked.

Flows to a site take one of its live links, round robin, among those heard from within
``fresh_within`` seconds if there are any: a link to an instance that went away silently
(its node cut off) stops carrying new flows before the heartbeat declares it dead. Round
robin rather than the least RTT: the instances of one site sit in one cluster, their RTTs
differ by noise, and spreading the flows keeps either replica able to take them all
(kube-proxy spreads the import side the same way).

Every change of a site's links sets that site's ``changed`` event (and replaces it), which
the dialers wait on.
"""

from __future__ import annotations

import asyncio
import time

from meshlink.tunnel.link import Link


class LinkTable:
    """See the module docstring."""

    def __init__(self, fresh_within: float) -> None:
        self.fresh_within = fresh_within
        self._sites: dict[str, dict[str, Link]] = {}
        self._turn: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def get(self, site: str, instance: str) -> Link | None:
        return self._sites.get(site, {}).get(instance)

    def add(self, link: Link) -> None:
        """Register a ready link (its site and instance known from the handshake)."""
        assert link.peer_site is not None
        self._sites.setdefault(link.peer_site, {})[link.peer_instance] = link
        self._touch(link.peer_site)

    def remove(self, link: Link) -> bool:
        """Unregister ``link``; False if it was not the registered link of its pair."""
        site = link.peer_site
        links = self._sites.get(site or "")
        if site is None or links is None or links.get(link.peer_instance) is not link:
            return False
        del links[link.peer_instance]
        if not links:
            del self._sites[site]
            self._turn.pop(site, None)
        self._touch(site)
        return True

    def links(self, site: str) -> list[Link]:
        """The registered links of ``site``, by instance."""
        return [lk for _, lk in sorted(self._sites.get(site, {}).items())]

    def live(self, site: str) -> list[Link]:
        """The links of ``site`` that can carry flows now (ready, not closing)."""
        return [lk for lk in self.links(site) if lk.ready and not lk.closed]

    def sites(self) -> list[str]:
        return sorted(self._sites)

    def items(self) -> list[tuple[str, str, Link]]:
        """Every registered link as (site, instance, link), in order."""
        return [(s, i, lk) for s in sorted(self._sites) for i, lk in sorted(self._sites[s].items())]

    def wanted(self, site: str) -> int:
        """How many instances ``site`` runs, as its linked instances announced (at least 1)."""
        return max((lk.peer_replicas for lk in self.live(site)), default=1)

    def pick(self, site: str) -> Link | None:
        """A live link for a new flow to ``site`` (see the module docstring)."""
        live = self.live(site)
        if len(live) <= 1:
            return live[0] if live else None
        now = time.monotonic()
        fresh = [lk for lk in live if now - lk.last_rx <= self.fresh_within] or live
        turn = self._turn.get(site, 0)
        self._turn[site] = turn + 1
        return fresh[turn % len(fresh)]

    def changed(self, site: str) -> asyncio.Event:
        """An event set at the next change of ``site``'s links."""
        ev = self._changed.get(site)
        if ev is None:
            ev = self._changed[site] = asyncio.Event()
        return ev

    def _touch(self, site: str) -> None:
        ev = self._changed.pop(site, None)
        if ev is not None:
            ev.set()
