"""This site's identity as the running site sees it: loaded once, reloaded on a schedule."""

from __future__ import annotations

from meshlink import pki
from meshlink.store import StateLike


class CurrentIdentity:
    """The site's CA and gateway certificate; ``reload`` (hourly) re-issues the gateway
    certificate when two thirds of its life are used. Holders read ``current`` at each use,
    so a reload applies everywhere at once (TLS contexts are built from the files)."""

    def __init__(self, state: StateLike, site: str) -> None:
        self._state = state
        self._site = site
        self.current = pki.SiteIdentity.load_or_create(state, site)

    def reload(self) -> None:
        self.current = pki.SiteIdentity.load_or_create(self._state, self._site)
