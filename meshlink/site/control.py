"""The site-to-site control channel: link up and down, control messages, renewal, and the
catalog they drive.

``ControlChannel`` is the gateway's handler (``tunnel.GatewayHandler``). A link coming up
or going down, an update from a peer, and this site's own exports (``publish``) all change
the catalog; what the catalog says to send goes out over the links through the control
codec (``catalog.control``), and the platform is handed the clusterset's services by one
coalescing task (``run``), whatever the burst. Renewal requests and answers travel here
too; ``Renewals`` keeps their state. So does the unlink: ``unlink(peer)`` tells a peer that
this site deleted its side of the link (before the link closes), and an unlink received is
handed to ``on_unlinked`` (the link records); either way the catalog then drops what the
link carried at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

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


class ControlLinks(Protocol):
    """What the channel needs of the gateway."""

    def send_control(self, peer_site: str, payload: bytes) -> bool: ...

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
        # Awake: the platform gets the first view of the catalog (even an empty one) at once.
        self._feed = Coalescer(self._feed_services, awake=True)

    def attach(self, gateway: ControlLinks) -> None:
        self._links = gateway

    # -- gateway events (tunnel.GatewayHandler) ------------------------------------------

    def link_up(self, peer_site: str) -> None:
        log.info("link up: %s", peer_site)
        self._unlinked.discard(peer_site)
        self._link_up_ns[peer_site] = time.time_ns()
        self._send(self.catalog.peer_up(peer_site))
        self._feed.wake()

    def link_down(self, peer_site: str, reason: str) -> None:
        log.info("link down: %s (%s)", peer_site, reason)
        self._link_up_ns.pop(peer_site, None)
        self._send(self.catalog.peer_down(peer_site))
        self._feed.wake()

    def control_received(self, peer_site: str, payload: bytes) -> None:
        try:
            msg = control.decode(payload)
            if isinstance(msg, control.Update):
                sends, refused = self.catalog.receive(peer_site, msg)
                self._observe_propagation(peer_site, msg)
                for line in refused:
                    self.metrics.refused.inc()
                    log.warning("catalog entry refused %s", line)
                self._send(sends)
                self._feed.wake()
            elif isinstance(msg, control.RenewRequest):
                answer = self.renewals.answer(self.identity.current, peer_site, msg)
                self.send(peer_site, answer)
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
        if self.send(peer_site, control.Unlink()):
            log.info("told %s that the link between us is deleted", peer_site)

    def send(self, peer_site: str, message: control.ControlMessage) -> bool:
        """Send one message over the live link to ``peer_site``; False if there is none."""
        assert self._links is not None
        # No live link fails the first frame and every other: stopping there loses nothing.
        return all(self._links.send_control(peer_site, f) for f in control.encode(message))

    async def run(self) -> None:
        """Hand the platform the clusterset's services after every change (coalesced)."""
        await self._feed.run()

    # -- internals -----------------------------------------------------------------------

    def _send(self, sends: Sequence[Send]) -> None:
        for s in sends:
            self.send(s.peer, s.message)

    async def _feed_services(self) -> None:
        if self.catalog.generation == self._seen_generation:
            return
        self._seen_generation = self.catalog.generation
        self._on_services(self.catalog.services())
        self.metrics.sites.set(len(self.catalog.sites()))

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
