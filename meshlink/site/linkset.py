"""The links of a running site as the records on disk say (the CLI writes them; a running
site picks a change up within a second).

``poll`` reads the link records and hands the gateway one dial per link (its client context
built per dial from the files, so a renewed link certificate applies at once), and drops
the link of a peer that was revoked (one this site does not dial itself and whose peer
record is gone). A link deleted here (its record gone) or a peer revoked here is first
``unlink``-ed: the peer is told, so unlinking is symmetric. ``unlinked_by`` is the other
half: a peer unlinked itself, and its records here go. ``peer_authorizer`` is the
gateway's check of an accepting link.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Collection

from meshlink import links
from meshlink.errors import MeshlinkError
from meshlink.site.identity import CurrentIdentity
from meshlink.store import StateLike
from meshlink.tunnel import DialSpec, Gateway

log = logging.getLogger(__name__)


def peer_authorizer(state: StateLike) -> Callable[[str], bool]:
    """The gateway's question on every accepted link: may this peer link to us?"""

    def authorize(peer: str) -> bool:
        allowed = links.is_peer_allowed(state, peer)
        if not allowed:
            log.warning("refused link from %s: not a linked peer (revoked or never linked)", peer)
        return allowed

    return authorize


class LinkSet:
    """See the module docstring."""

    def __init__(
        self,
        state: StateLike,
        identity: CurrentIdentity,
        gateway: Gateway,
        peers: Callable[[], Collection[str]],
        unlink: Callable[[str], None],
    ) -> None:
        self._state = state
        self._identity = identity
        self._gateway = gateway
        self._peers = peers
        self._unlink = unlink
        self._records: list[links.LinkRecord] = []
        self.peer_records: list[links.PeerRecord] = []
        """The peer records (sites that dial us) as last read."""

    def poll(self) -> None:
        """Follow the records (a periodic job); a damaged record is one log line."""
        try:
            records = links.LINKS.list(self._state)
            dialled = {r.peer_site for r in records}
            for peer in sorted({r.peer_site for r in self._records} - dialled):
                self._unlink(peer)  # deleted here: say so before the dial closes the link
            self._records = records
            self.peer_records = links.PEERS.list(self._state)
            self._gateway.set_dials([self._dial(rec) for rec in records])
            for peer in self._peers():
                if peer not in dialled and not links.is_peer_allowed(self._state, peer):
                    self._unlink(peer)
                    self._gateway.drop_peer(peer, "revoked")
        except MeshlinkError as e:
            log.warning("link records: %s", e)

    def records(self) -> list[links.LinkRecord]:
        """The link records as last read."""
        return self._records

    def on_record(self) -> set[str]:
        """The peers this site has records of (links it dials, peers that dial it): those
        a starting site waits for in its initial catalog sync; not a peer we dialled in
        vain (it is away or refused us: it will send nothing soon). A damaged record counts
        for nothing here (``poll`` says what is wrong with it)."""
        away = {
            st.peer_site
            for st in self._gateway.status()
            if st.refused or (st.state == "backoff" and st.last_error)
        }
        try:
            dialled = {r.peer_site for r in links.LINKS.list(self._state)}
            return (dialled - away) | {p.site for p in links.PEERS.list(self._state)}
        except MeshlinkError:
            return set()

    def unlinked_by(self, peer: str) -> None:
        """``peer`` deleted its side of our link (``meshlink link delete`` there, or
        ``meshlink peer revoke``): forget it here too, so a new token links the two
        again without a command on this site."""
        try:
            removed = links.forget_site(self._state, peer)
        except MeshlinkError as e:
            log.warning("site %s unlinked itself, but its records here stay: %s", peer, e)
            return
        if any(r.startswith("link record") for r in removed):
            log.warning(
                "site %s revoked this site's link (%s removed): a new token from %s links "
                "the two sites again",
                peer,
                ", ".join(removed),
                peer,
            )
        else:
            log.info(
                "site %s deleted its link to this site (%s removed)",
                peer,
                ", ".join(removed) or "nothing left to remove",
            )

    def _dial(self, rec: links.LinkRecord) -> DialSpec:
        return DialSpec(
            name=rec.name,
            peer_site=rec.peer_site,
            endpoints=tuple(rec.endpoints),
            ssl_context=self._client_context(rec),
        )

    def _client_context(self, rec: links.LinkRecord) -> Callable[[], ssl.SSLContext]:
        return lambda: links.link_client_context(self._identity.current, rec)
