"""The link commands of the CLI: each takes the site config and returns the text to print.

Nothing here prints; errors are MeshlinkError subclasses whose message is the line to show.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from meshlink.config import HostPort, SiteConfig
from meshlink.errors import ConfigError, PkiError
from meshlink.links.issuer import create_token
from meshlink.links.records import (
    LINKS,
    PEERS,
    TOKENS,
    delete_link,
    link_cert,
    revoke_peer,
    revoke_token,
)
from meshlink.links.redeem import redeem
from meshlink.links.tokens import TOKEN_PREFIX
from meshlink.pki import SiteIdentity, atomic_write, cert_from_pem
from meshlink.store import StateLike
from meshlink.text import table, timestamp


def _table(rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(table(rows))


def _identity(cfg: SiteConfig, state: StateLike | None) -> SiteIdentity:
    return SiteIdentity.load_or_create(cfg.state_dir if state is None else state, cfg.site)


def _state(cfg: SiteConfig, state: StateLike | None) -> StateLike:
    return cfg.state_dir if state is None else state


def read_token_arg(arg: str) -> str:
    """The token itself, ``-`` for standard input, or a file holding it."""
    if arg.startswith(TOKEN_PREFIX[: len("meshlink-token-")]):
        return arg
    if arg == "-":
        return sys.stdin.read().strip()
    try:
        return Path(arg).read_text(encoding="utf-8", errors="replace").strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {arg}: {e.strerror}") from None


def cmd_token_create(
    cfg: SiteConfig,
    *,
    expiry: timedelta = timedelta(minutes=15),
    uses: int = 1,
    output: Path | None = None,
    state: StateLike | None = None,
) -> str:
    """Create a token; with ``output`` write it there (0600) and say so, else return it."""
    _check_dialable(cfg)
    token = create_token(_identity(cfg, state), str(cfg.grant_address), expiry=expiry, uses=uses)
    if output is None:
        return token
    try:
        atomic_write(Path(output), (token + "\n").encode(), 0o600)
    except PkiError as e:
        raise ConfigError(str(e), key="-o") from None
    return (
        f"token written to {output} (valid {expiry}, {uses} use(s)); "
        f"on the other site run: meshlink link create {output}"
    )


def _check_dialable(cfg: SiteConfig) -> None:
    """Refuse to hand out addresses the redeeming site cannot dial: a token names the grant
    address, and redemption answers with the gateway's. ``0.0.0.0`` or ``::`` there is a
    listen address left as the advertised one."""
    wanted: list[tuple[str, HostPort]] = [("grant.advertise", cfg.grant_address)]
    wanted += [("gateway.advertise", hp) for hp in cfg.advertise]
    for key, hp in wanted:
        try:
            unspecified = ipaddress.ip_address(hp.host).is_unspecified
        except ValueError:
            continue  # a host name
        if unspecified:
            raise ConfigError(
                f"{hp} is not an address another site can dial ({hp.host} means any address of "
                f"this host); set {key} to one it can reach, e.g. the gateway Service's "
                "NodePort or LoadBalancer address",
                key=key,
                source=cfg.source,
            )


def cmd_token_list(cfg: SiteConfig, state: StateLike | None = None) -> str:
    now = time.time()
    rows = [("TOKEN", "USES LEFT", "EXPIRES", "STATE")]
    for t in TOKENS.list(_state(cfg, state)):
        state = "expired" if now >= t.expires else ("used up" if t.uses_left <= 0 else "valid")
        rows.append((t.id, f"{t.uses_left}/{t.uses}", timestamp(t.expires), state))
    return _table(rows)


def cmd_token_revoke(cfg: SiteConfig, token_id: str, state: StateLike | None = None) -> str:
    revoke_token(_state(cfg, state), token_id)
    return f"token {token_id} revoked"


async def cmd_link_create(
    cfg: SiteConfig, token_arg: str, *, name: str | None = None, state: StateLike | None = None
) -> str:
    """Redeem a token: link this site to its issuer."""
    ident = _identity(cfg, state)
    rec = await redeem(ident, ident.state, read_token_arg(token_arg), name=name)
    return f"linked to site {rec.peer_site} as {rec.name!r} via {', '.join(rec.endpoints)}"


def cmd_link_list(cfg: SiteConfig, state: StateLike | None = None) -> str:
    rows = [("NAME", "PEER", "ENDPOINTS", "CERT EXPIRES", "CREATED")]
    for r in LINKS.list(_state(cfg, state)):
        pem = link_cert(_state(cfg, state), r.name)
        try:
            expires = (
                "missing"
                if pem is None
                else timestamp(cert_from_pem(pem).not_valid_after_utc.timestamp())
            )
        except PkiError:
            expires = "damaged"
        rows.append((r.name, r.peer_site, ",".join(r.endpoints), expires, timestamp(r.created)))
    return _table(rows)


def cmd_link_delete(cfg: SiteConfig, name: str, state: StateLike | None = None) -> str:
    rec = delete_link(_state(cfg, state), name)
    return f"link {name} to site {rec.peer_site} deleted"


def cmd_peer_list(cfg: SiteConfig, state: StateLike | None = None) -> str:
    rows = [("PEER", "LINKED AT", "TOKEN", "CERT EXPIRES")]
    rows += [
        (p.site, timestamp(p.linked_at), p.token_id, timestamp(p.cert_not_after))
        for p in PEERS.list(_state(cfg, state))
    ]
    return _table(rows)


def cmd_peer_revoke(cfg: SiteConfig, site: str, state: StateLike | None = None) -> str:
    revoke_peer(_state(cfg, state), site)
    return f"peer {site} revoked: its gateway is refused from now on"
