"""The site-to-site control channel: link up and down, control messages, renewal, and the
catalog they drive.

``ControlChannel`` is the gateway's handler (``tunnel.GatewayHandler``). A link with an
instance of a peer site coming up or going down, an update from a peer, and this site's own
exports (``publish``) all change the catalog (one RIB-in per linked instance: a site's
instances are separate speakers, ``catalog.sync``); what the catalog says to send goes out
over the links through the control codec (``catalog.control``), and the platform is handed
the clusterset's services by one coalescing task (``run``), whatever the burst. Renewal
requests and answers travel here too; ``Renewals`` keeps their state. So does the unlink:
``unlink(peer)`` tells a peer that this site deleted its side of the link (before the link
closes), and an unlink received is handed to ``on_unlinked`` (the link records); either way
the catalog then drops what the link carried at once.

Which link a message takes: catalog updates go to the instance the catalog addressed them
to (each linked instance gets its own stream); a renewal request goes to one instance of
the issuer and its answer back over the link it came on (one certificate signed per
request); an unlink goes to every linked instance (each drops its links), and receiving it
again from another instance does nothing more.

The platform gets its first view of the catalog only once the catalog has synced: every
peer on record (``expected``) has sent its snapshot since its link came up, or
``INITIAL_SYNC_TIMEOUT`` passed. Before that the catalog knows only this site's exports,
and a restarted controller would take every import for an orphan. ``synced`` says when
that is over (the site is not ready before). ``expire`` (a periodic job) ends the grace
period of unreachable sites' records (``Catalog``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final, Protocol

from meshlink import links
from meshlink.catalog import control
from meshlink.catalog.records import ExportRecord, ServiceKey
from meshlink.catalog.sync import Catalog, Send
from meshlink.errors import MeshlinkError
from meshlink.site.identity import CurrentIdentity
from meshlink.site.metrics import Metrics
from meshlink.tasks import Coalescer

log = logging.getLogger(__name__)

Services = Mapping[ServiceKey, Sequence[ExportRecord]]

INITIAL_SYNC_TIMEOUT: Final = 15.0
"""Seconds a starting site waits for the snapshots of its peers before it hands the
platform the catalog without them: a restarted peer redials within its backoff (5 s at
most) once it sees us again."""


class ControlLinks(Protocol):
    """What the channel needs of the gateway."""

    def send_control(self, peer_site: str, payload: bytes, instance: str | None = None) -> bool: ...

    def broadcast_control(self, peer_site: str, payload: bytes) -> bool: ...

    def instances(self, peer_site: str) -> list[str]: ...

    def live_peers(self) -> list[str]: ...


class ControlChannel:
    """See the module docstring. ``attach`` the gateway before it runs."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        identity: CurrentIdentity,
        renewals: links.Renewals,
        metrics: Metrics,
        on_services: Callable[[Services], None],
        on_unlinked: Callable[[str], None],
    ) -> None:
        self.catalog = catalog
        self.identity = identity
        self.renewals = renewals
        self.metrics = metrics
        self._on_services = on_services
        self._on_unlinked = on_unlinked
        self._unlinked: set[str] = set()
        """Peers whose link ends in an unlink (sent or received), not an outage."""
        self._links: ControlLinks | None = None
        self._seen_generation = -1
        self._link_up_ns: dict[str, int] = {}  # peer -> when its link came up (wall clock)
        self._snapshots: set[str] = set()  # peers whose snapshot arrived since link-up
        self._snapshot_arrived = asyncio.Event()
        self.synced = False
        """The initial sync is over: the platform has the catalog."""
        self.waiting_for: tuple[str, ...] = ()
        """The peers the initial sync still waits for."""
        self._stale_sites: set[str] = set()
        self._feed = Coalescer(self._feed_services)

    def attach(self, gateway: ControlLinks) -> None:
        self._links = gateway

    # -- gateway events (tunnel.GatewayHandler) ------------------------------------------

    def link_up(self, peer_site: str) -> None:
        log.info("link up: %s", peer_site)
        self._unlinked.discard(peer_site)
        self._link_up_ns[peer_site] = time.time_ns()
        self._snapshots.discard(peer_site)

    def link_down(self, peer_site: str, reason: str) -> None:
        log.info("link down: %s (%s)", peer_site, reason)
        self._link_up_ns.pop(peer_site, None)
        self._snapshots.discard(peer_site)

    def instance_up(self, peer_site: str, instance: str) -> None:
        self._send(self.catalog.peer_up(peer_site, instance))
        self._feed.wake()

    def instance_down(self, peer_site: str, instance: str, reason: str) -> None:
        unlinked = peer_site in self._unlinked
        self._send(self.catalog.peer_down(peer_site, instance, unlinked=unlinked))
        self._feed.wake()

    def control_received(self, peer_site: str, instance: str, payload: bytes) -> None:
        try:
            msg = control.decode(payload)
            if isinstance(msg, control.Update):
                sends, refused = self.catalog.receive(peer_site, msg, instance)
                self._observe_propagation(peer_site, msg)
                for line in refused:
                    self.metrics.refused.inc()
                    log.warning("catalog entry refused %s", line)
                self._send(sends)
                self._feed.wake()
                if not msg.more and peer_site not in self._snapshots:
                    self._snapshots.add(peer_site)  # the first whole update: its snapshot
                    self._snapshot_arrived.set()
            elif isinstance(msg, control.RenewRequest):
                answer = self.renewals.answer(self.identity.current, peer_site, msg)
                self.send(peer_site, answer, instance)
            elif isinstance(msg, control.RenewAnswer):
                self.renewals.store(self.identity.current, peer_site, msg)
            elif peer_site not in self._unlinked:
                self._unlinked.add(peer_site)
                self._on_unlinked(peer_site)
        except MeshlinkError as e:
            log.warning("bad control message from %s: %s", peer_site, e)

    # -- this site's side ----------------------------------------------------------------

    def publish(self, records: Sequence[ExportRecord]) -> None:
        """The platform's full set of this site's exports."""
        self._send(self.catalog.set_local(records))
        self._feed.wake()

    def renew(self, records: Sequence[links.LinkRecord]) -> None:
        """Ask the peers of the links due for renewal (a periodic job)."""
        assert self._links is not None
        for rec in self.renewals.due(records, self._links.live_peers()):
            if self.send(rec.peer_site, self.renewals.request(self.identity.current)):
                self.renewals.asked(rec.peer_site)

    def unlink(self, peer_site: str) -> None:
        """This site deleted its side of the link with ``peer_site`` (its link record, or
        its peer record): tell the peer, if the link is up, before it is closed. Nothing
        to say to a peer that unlinked itself first."""
        if peer_site in self._unlinked:
            return
        self._unlinked.add(peer_site)
        assert self._links is not None
        (frame,) = control.encode(control.Unlink())
        if self._links.broadcast_control(peer_site, frame):
            log.info("told %s that the link between us is deleted", peer_site)
        elif self.catalog.forget(peer_site):  # unreachable: its records were kept
            self._feed.wake()

    def not_ready(self) -> str | None:
        """Why the site is not ready yet, as far as the catalog goes: until the initial sync
        is over the platform has no catalog, and DNS would answer NXDOMAIN for names a
        peer exports (resolvers would cache that)."""
        if self.synced:
            return None
        return f"waiting for the catalog of {', '.join(self.waiting_for) or 'its peers'}"

    def expire(self) -> None:
        """End the grace period of the records it is over for (a periodic job)."""
        before = self.catalog.stale()
        if self.catalog.expire():
            after = self.catalog.stale()
            for site, (n, _) in sorted(before.items()):
                left = after.get(site, (0, 0.0))[0]
                if left < n:
                    log.info(
                        "grace period over for unreachable site %s: %d of its exports withdrawn",
                        site,
                        n - left,
                    )
            self._feed.wake()

    def send(
        self, peer_site: str, message: control.ControlMessage, instance: str | None = None
    ) -> bool:
        """Send one message over the live link to ``instance`` of ``peer_site`` (None: to
        one of its instances); False if there is none."""
        assert self._links is not None
        if instance is None:  # all frames of one message over one link, however many
            linked = self._links.instances(peer_site)
            if not linked:
                return False
            instance = linked[0]
        # No live link fails the first frame and every other: stopping there loses nothing.
        frames = control.encode(message)
        return all(self._links.send_control(peer_site, f, instance) for f in frames)

    async def run(
        self, expected: Callable[[], Collection[str]], sync_for: float = INITIAL_SYNC_TIMEOUT
    ) -> None:
        """The initial sync with the peers ``expected``, for ``sync_for`` seconds at most
        (see the module docstring), then hand the platform the clusterset's services after
        every change (coalesced)."""
        await self._initial_sync(expected, sync_for)
        self._feed.wake()
        await self._feed.run()

    async def _initial_sync(self, expected: Callable[[], Collection[str]], limit: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + limit
        while True:
            self.waiting_for = tuple(sorted(set(expected()) - self._snapshots))
            left = deadline - time.monotonic()
            if not self.waiting_for or left <= 0:
                break
            self._snapshot_arrived.clear()
            try:
                async with asyncio.timeout(min(left, 1.0)):  # the records may change too
                    await self._snapshot_arrived.wait()
            except TimeoutError:
                pass
        if self.waiting_for:
            log.warning(
                "catalog: no snapshot from %s within %g s; going on without it (its exports "
                "appear when its link comes up)",
                ", ".join(self.waiting_for),
                limit,
            )
        else:
            log.info(
                "catalog synced with %d peer(s) in %.2f s",
                len(self._snapshots),
                time.monotonic() - t0,
            )
        self.waiting_for = ()
        self.synced = True

    # -- internals -----------------------------------------------------------------------

    def _send(self, sends: Sequence[Send]) -> None:
        for s in sends:
            self.send(s.peer, s.message, s.instance)

    async def _feed_services(self) -> None:
        if self.catalog.generation == self._seen_generation:
            return
        self._seen_generation = self.catalog.generation
        self._on_services(self.catalog.services())
        self.metrics.sites.set(len(self.catalog.sites()))
        stale = self.catalog.stale()
        for site in sorted(stale.keys() - self._stale_sites):
            log.info(
                "site %s is unreachable: its %d export(s) stay for the grace period (%g s), "
                "with no ready endpoint",
                site,
                stale[site][0],
                self.catalog.grace,
            )
        self._stale_sites = set(stale)

    def _observe_propagation(self, peer_site: str, msg: control.Update) -> None:
        # A record older than the link that brought it (the snapshot sent at link-up) has
        # waited for the link, not for propagation: count from the link-up.
        now = time.time_ns()
        since = self._link_up_ns.get(peer_site, 0)
        for entry in msg.add:
            rec = entry.get("rec") if isinstance(entry, dict) else None
            if isinstance(rec, dict) and isinstance(rec.get("version"), int):
                delay = (now - max(rec["version"], since)) / 1e9
                if 0 <= delay < 3600:
                    self.metrics.propagation.observe(delay)
