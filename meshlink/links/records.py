"""Link and peer records on disk, and the issuer's token store.

Layout under the state directory (directories 0700, files 0600, every write atomic)::

    tokens/<id>.json   issuer: {id, secret_sha256, uses, uses_left, expires, created}
                       (only a hash of the secret is ever stored)
    peers/<site>.json  issuer: a site that redeemed one of our tokens
                       {site, ca_pem, linked_at, token_id, cert_not_after}
    links/<name>.json  redeemer: a site we linked to
                       {name, peer_site, peer_ca_pem, endpoints, cert_path, created}
    links/<name>.crt   redeemer: the client certificate the peer signed for our gateway key
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from meshlink.errors import ConfigError, MeshlinkError
from meshlink.links.tokens import is_token_id
from meshlink.pki import atomic_write, ensure_dir, is_site_id

log = logging.getLogger(__name__)

TOKENS_DIR: Final = "tokens"
PEERS_DIR: Final = "peers"
LINKS_DIR: Final = "links"
RECORD_MODE: Final = 0o600

T = TypeVar("T")


class RecordNotFound(MeshlinkError):
    """No link, peer or token record by that name."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    ensure_dir(path.parent)
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), RECORD_MODE)


def _read_json(path: Path, build: Callable[[dict[str, Any]], T]) -> T | None:
    """The record in ``path``, or None if there is none. A damaged file is a clear error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=str(path)) from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return build(data)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"damaged record ({e}); remove the file and redo the link", source=str(path)
        ) from None


def _list_json(directory: Path, build: Callable[[dict[str, Any]], T]) -> list[T]:
    """Every record in ``directory``, by file name (one removed meanwhile is skipped)."""
    out = []
    for p in sorted(directory.glob("*.json")):
        rec = _read_json(p, build)
        if rec is not None:
            out.append(rec)
    return out


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not is_site_id(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use one lowercase DNS label (a-z, 0-9, '-')"
        )
    return name


# -- tokens (issuer) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    secret_sha256: str
    uses: int
    uses_left: int
    expires: int
    created: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenRecord:
        rec = cls(
            id=str(d["id"]),
            secret_sha256=str(d["secret_sha256"]),
            uses=int(d["uses"]),
            uses_left=int(d["uses_left"]),
            expires=int(d["expires"]),
            created=int(d["created"]),
        )
        if not is_token_id(rec.id) or len(rec.secret_sha256) != 64:
            raise ValueError("bad id or hash")
        return rec


def token_path(state_dir: Path, token_id: str) -> Path:
    if not is_token_id(token_id):
        raise ConfigError(f"{token_id!r} is not a token id (16 hex digits)")
    return Path(state_dir) / TOKENS_DIR / f"{token_id}.json"


def write_token_record(state_dir: Path, rec: TokenRecord) -> None:
    _write_json(token_path(state_dir, rec.id), asdict(rec))


def load_token_record(state_dir: Path, token_id: str) -> TokenRecord | None:
    return _read_json(token_path(state_dir, token_id), TokenRecord.from_json)


def list_tokens(state_dir: Path) -> list[TokenRecord]:
    return _list_json(Path(state_dir) / TOKENS_DIR, TokenRecord.from_json)


def revoke_token(state_dir: Path, token_id: str) -> None:
    path = token_path(state_dir, token_id)
    if not path.exists():
        raise RecordNotFound(f"no token {token_id}; `meshlink token list` shows the tokens")
    path.unlink()


def prune_tokens(state_dir: Path, *, now: float | None = None, keep: float = 86400.0) -> int:
    """Remove token records that expired more than ``keep`` seconds ago; return how many."""
    now = time.time() if now is None else now
    n = 0
    for rec in list_tokens(state_dir):
        if rec.expires + keep < now:
            token_path(state_dir, rec.id).unlink(missing_ok=True)
            n += 1
    return n


# -- peers (issuer) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A site that redeemed one of our tokens; its gateway may connect to ours."""

    site: str
    ca_pem: str
    linked_at: float
    token_id: str
    cert_not_after: float = 0.0
    """When the last client certificate we signed for it expires (unix seconds)."""

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PeerRecord:
        return cls(
            site=check_name(str(d["site"]), "site"),
            ca_pem=str(d["ca_pem"]),
            linked_at=float(d["linked_at"]),
            token_id=str(d["token_id"]),
            cert_not_after=float(d.get("cert_not_after", 0.0)),
        )


def peer_path(state_dir: Path, site: str) -> Path:
    return Path(state_dir) / PEERS_DIR / f"{check_name(site, 'site id')}.json"


def write_peer(state_dir: Path, rec: PeerRecord) -> None:
    _write_json(peer_path(state_dir, rec.site), asdict(rec))


def load_peer(state_dir: Path, site: str) -> PeerRecord | None:
    return _read_json(peer_path(state_dir, site), PeerRecord.from_json)


def list_peers(state_dir: Path) -> list[PeerRecord]:
    return _list_json(Path(state_dir) / PEERS_DIR, PeerRecord.from_json)


def revoke_peer(state_dir: Path, site: str) -> PeerRecord:
    """Forget a peer: its gateway is refused from now on (the gateway checks on every link)."""
    path = peer_path(state_dir, site)
    rec = _read_json(path, PeerRecord.from_json)
    if rec is None:
        raise RecordNotFound(f"no peer {site!r}; `meshlink peer list` shows the linked peers")
    path.unlink(missing_ok=True)
    log.info("peer %s revoked", site)
    return rec


def is_peer_allowed(state_dir: Path, site: str) -> bool:
    """Cheap check made on every accepted link: is ``site`` a current peer?"""
    if not isinstance(site, str) or not is_site_id(site):
        return False
    return (Path(state_dir) / PEERS_DIR / f"{site}.json").is_file()


# -- links (redeemer) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """A site we linked to by redeeming its token; our gateway dials it."""

    name: str
    peer_site: str
    peer_ca_pem: str
    endpoints: tuple[str, ...]
    """The peer's gateway addresses, ``host:port``, in the order to try."""
    cert_path: str
    """Our client certificate for this link (signed by the peer's CA, for our gateway key)."""
    created: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinkRecord:
        eps = d["endpoints"]
        if not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
            raise TypeError("endpoints must be a list of host:port")
        return cls(
            name=check_name(str(d["name"]), "link name"),
            peer_site=check_name(str(d["peer_site"]), "site"),
            peer_ca_pem=str(d["peer_ca_pem"]),
            endpoints=tuple(eps),
            cert_path=str(d["cert_path"]),
            created=float(d["created"]),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["endpoints"] = list(self.endpoints)
        return d


def link_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / LINKS_DIR / f"{check_name(name, 'link name')}.json"


def link_cert_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / LINKS_DIR / f"{check_name(name, 'link name')}.crt"


def write_link(state_dir: Path, rec: LinkRecord) -> None:
    _write_json(link_path(state_dir, rec.name), rec.to_json())


def load_link(state_dir: Path, name: str) -> LinkRecord | None:
    return _read_json(link_path(state_dir, name), LinkRecord.from_json)


def list_links(state_dir: Path) -> list[LinkRecord]:
    return _list_json(Path(state_dir) / LINKS_DIR, LinkRecord.from_json)


def find_link_to(state_dir: Path, site: str) -> LinkRecord | None:
    return next((r for r in list_links(state_dir) if r.peer_site == site), None)


def delete_link(state_dir: Path, name: str) -> LinkRecord:
    """Forget a link: remove its record and its client certificate."""
    path = link_path(state_dir, name)
    rec = _read_json(path, LinkRecord.from_json)
    if rec is None:
        raise RecordNotFound(f"no link named {name!r}; `meshlink link list` shows the links")
    path.unlink(missing_ok=True)
    link_cert_path(state_dir, name).unlink(missing_ok=True)
    log.info("link %s to site %s deleted", name, rec.peer_site)
    return rec
