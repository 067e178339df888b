"""This site's identity as the running site sees it: loaded once, reloaded on a schedule."""

from __future__ import annotations

from pathlib import Path

from meshlink import pki


class CurrentIdentity:
    """The site's CA and gateway certificate; ``reload`` (hourly) re-issues the gateway
    certificate when two thirds of its life are used. Holders read ``current`` at each use,
    so a reload applies everywhere at once (TLS contexts are built from the files)."""

    def __init__(self, state_dir: Path, site: str) -> None:
        self._state_dir = state_dir
        self._site = site
        self.current = pki.SiteIdentity.load_or_create(state_dir, site)

    def reload(self) -> None:
        self.current = pki.SiteIdentity.load_or_create(self._state_dir, self._site)
