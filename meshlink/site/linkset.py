"""The links of a running site as the records on disk say (the CLI writes them; a running
site picks a change up within a second).

``poll`` reads the link records and hands the gateway one dial per link (its client context
built per dial from the files, so a renewed link certificate applies at once), and drops
the link of a peer that was revoked (one this site does not dial itself and whose peer
record is gone). ``peer_authorizer`` is the gateway's check of an accepting link.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Collection
from pathlib import Path

from meshlink import links
from meshlink.config import SiteConfig
from meshlink.errors import MeshlinkError
from meshlink.site.identity import CurrentIdentity
from meshlink.tunnel import DialSpec, Gateway

log = logging.getLogger(__name__)


def peer_authorizer(state_dir: Path) -> Callable[[str], bool]:
    """The gateway's question on every accepted link: may this peer link to us?"""

    def authorize(peer: str) -> bool:
        allowed = links.is_peer_allowed(state_dir, peer)
        if not allowed:
            log.warning("refused link from %s: not a linked peer (revoked or never linked)", peer)
        return allowed

    return authorize


class LinkSet:
    """See the module docstring."""

    def __init__(
        self,
        config: SiteConfig,
        identity: CurrentIdentity,
        gateway: Gateway,
        peers: Callable[[], Collection[str]],
    ) -> None:
        self._state_dir = config.state_dir
        self._identity = identity
        self._gateway = gateway
        self._peers = peers
        self.records: list[links.LinkRecord] = []
        """The link records as last read."""

    def poll(self) -> None:
        """Follow the records (a periodic job); a damaged record is one log line."""
        try:
            self.records = links.LINKS.list(self._state_dir)
            self._gateway.set_dials([self._dial(rec) for rec in self.records])
            dialled = {r.peer_site for r in self.records}
            for peer in self._peers():
                if peer not in dialled and not links.is_peer_allowed(self._state_dir, peer):
                    log.info("peer %s was revoked: dropping its link", peer)
                    self._gateway.drop_peer(peer, "revoked")
        except MeshlinkError as e:
            log.warning("link records: %s", e)

    def _dial(self, rec: links.LinkRecord) -> DialSpec:
        return DialSpec(
            name=rec.name,
            peer_site=rec.peer_site,
            endpoints=tuple(rec.endpoints),
            ssl_context=self._client_context(rec),
        )

    def _client_context(self, rec: links.LinkRecord) -> Callable[[], ssl.SSLContext]:
        return lambda: links.link_client_context(self._identity.current, rec)
