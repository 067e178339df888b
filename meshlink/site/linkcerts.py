"""The link certificates this site dials with: when each expires, and their renewal without
a token while the link is down.

Over a live link, a link certificate is renewed by its issuer when a third of its life is
left (``ControlChannel`` carries ``links.Renewals``). A link that is down cannot be renewed
that way: its issuer may have been away longer than the certificate's life (24 h by
default: a weekend). ``check`` (a periodic job) then re-authenticates: it asks the peer's
grant endpoint, pinned to the peer's CA recorded in the link, for a fresh certificate,
proving this site's identity with its gateway certificate (``links.reauthenticate``; no
token, no key on the wire). It tries every ``check`` (10 s) while the certificate is due
and the link is down, and records the outcome for the status: a peer that no longer has
this site as a peer (revoked or unlinked there) is ``refused``; that needs a new token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from meshlink import links
from meshlink.errors import LinkRevoked, MeshlinkError
from meshlink.pki import cert_from_pem, renewal_due
from meshlink.site.identity import CurrentIdentity
from meshlink.store import StateLike

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkCertState:
    expires: float | None
    """When the certificate expires (epoch seconds); None when it is missing or unreadable."""
    due: bool
    """Less than a third of its life is left (or it is gone): renewal is due."""
    refused: str | None = None
    """Why the peer refused to re-authenticate us (we are no peer of it any more)."""
    error: str | None = None
    """Why the last re-authentication failed otherwise (the peer's grant endpoint is away)."""


class LinkCerts:
    """See the module docstring."""

    def __init__(
        self, state: StateLike, identity: CurrentIdentity, live: Callable[[], Collection[str]]
    ) -> None:
        self._state = state
        self._identity = identity
        self._live = live
        self._states: dict[str, LinkCertState] = {}

    def states(self) -> dict[str, LinkCertState]:
        """Per peer site (the links this site dials), as last checked."""
        return dict(self._states)

    async def check(self, records: Sequence[links.LinkRecord]) -> None:
        """Read each link's certificate; re-authenticate those due whose link is down."""
        live = set(self._live())
        states = {}
        for rec in records:
            old = self._states.get(rec.peer_site)
            state = self._read(rec)
            if state.due and rec.peer_site not in live:
                state = await self._reauth(rec, state, old)
            elif old is not None and rec.peer_site not in live:
                state = LinkCertState(state.expires, state.due, old.refused, old.error)
            states[rec.peer_site] = state
        self._states = states

    def _read(self, rec: links.LinkRecord) -> LinkCertState:
        try:
            pem = links.link_cert(self._state, rec.name)
            if pem is None:
                return LinkCertState(None, True)
            cert = cert_from_pem(pem, f"the certificate of link {rec.name}")
        except MeshlinkError:
            return LinkCertState(None, True)
        return LinkCertState(cert.not_valid_after_utc.timestamp(), renewal_due(cert))

    async def _reauth(
        self, rec: links.LinkRecord, state: LinkCertState, old: LinkCertState | None
    ) -> LinkCertState:
        try:
            cert = await links.reauthenticate(self._identity.current, self._state, rec)
        except LinkRevoked as e:
            if old is None or old.refused != str(e):
                log.warning("link %s: %s", rec.name, e)
            return LinkCertState(state.expires, state.due, refused=str(e))
        except MeshlinkError as e:
            if old is None or old.error != str(e):
                log.warning("link %s: cannot re-authenticate yet (retrying): %s", rec.name, e)
            return LinkCertState(state.expires, state.due, error=str(e))
        log.info(
            "link %s: site %s issued a new link certificate (re-authenticated without a "
            "token), valid until %s",
            rec.name,
            rec.peer_site,
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        )
        return LinkCertState(cert.not_valid_after_utc.timestamp(), renewal_due(cert))
