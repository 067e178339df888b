"""Link and peer records on disk, and the issuer's token store.

Layout under the state directory (directories 0700, files 0600, every write atomic)::

    tokens/<id>.json   issuer: {id, secret_sha256, uses, uses_left, expires, created}
                       (only a hash of the secret is ever stored)
    peers/<site>.json  issuer: a site that redeemed one of our tokens
                       {site, ca_pem, linked_at, token_id, cert_not_after}
    links/<name>.json  redeemer: a site we linked to
                       {name, peer_site, peer_ca_pem, endpoints, cert_path, created, grant}
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
from typing import Any, Final, Generic, TypeVar

from meshlink.errors import ConfigError, MeshlinkError
from meshlink.links.tokens import is_token_id
from meshlink.pki import atomic_write, ensure_dir, is_site_id

log = logging.getLogger(__name__)

TOKENS_DIR: Final = "tokens"
PEERS_DIR: Final = "peers"
LINKS_DIR: Final = "links"
RECORD_MODE: Final = 0o600

R = TypeVar("R")


class RecordNotFound(MeshlinkError):
    """No link, peer or token record by that name."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class RecordStore(Generic[R]):
    """One kind of record: a JSON file per record in one directory of the state directory,
    named by the record's key (checked by ``check_key``: a name can never leave it)."""

    def __init__(
        self,
        directory: str,
        parse: Callable[[dict[str, Any]], R],
        dump: Callable[[R], dict[str, Any]],
        key_of: Callable[[R], str],
        check_key: Callable[[str], str],
    ) -> None:
        self.directory = directory
        self._parse = parse
        self._dump = dump
        self._key_of = key_of
        self._check_key = check_key

    def path(self, state_dir: Path, key: str) -> Path:
        return Path(state_dir) / self.directory / f"{self._check_key(key)}.json"

    def write(self, state_dir: Path, rec: R) -> None:
        path = self.path(state_dir, self._key_of(rec))
        ensure_dir(path.parent)
        data = json.dumps(self._dump(rec), indent=1, sort_keys=True) + "\n"
        atomic_write(path, data.encode(), RECORD_MODE)

    def load(self, state_dir: Path, key: str) -> R | None:
        """The record, or None if there is none. A damaged file is a clear error."""
        return self._read(self.path(state_dir, key))

    def list(self, state_dir: Path) -> list[R]:
        """Every record, by file name (one removed meanwhile is skipped)."""
        out = []
        for p in sorted((Path(state_dir) / self.directory).glob("*.json")):
            rec = self._read(p)
            if rec is not None:
                out.append(rec)
        return out

    def _read(self, path: Path) -> R | None:
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
            return self._parse(data)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"damaged record ({e}); remove the file and redo the link", source=str(path)
            ) from None


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


def _token_id(token_id: str) -> str:
    if not is_token_id(token_id):
        raise ConfigError(f"{token_id!r} is not a token id (16 hex digits)")
    return token_id


TOKENS: Final = RecordStore(TOKENS_DIR, TokenRecord.from_json, asdict, lambda r: r.id, _token_id)


def revoke_token(state_dir: Path, token_id: str) -> None:
    path = TOKENS.path(state_dir, token_id)
    if not path.exists():
        raise RecordNotFound(f"no token {token_id}; `meshlink token list` shows the tokens")
    path.unlink()


def prune_tokens(state_dir: Path, *, now: float | None = None, keep: float = 86400.0) -> int:
    """Remove token records that expired more than ``keep`` seconds ago; return how many."""
    now = time.time() if now is None else now
    n = 0
    for rec in TOKENS.list(state_dir):
        if rec.expires + keep < now:
            TOKENS.path(state_dir, rec.id).unlink(missing_ok=True)
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


PEERS: Final = RecordStore(
    PEERS_DIR, PeerRecord.from_json, asdict, lambda r: r.site, lambda k: check_name(k, "site id")
)


def revoke_peer(state_dir: Path, site: str) -> PeerRecord:
    """Forget a peer: its gateway is refused from now on (the gateway checks on every link)."""
    rec = PEERS.load(state_dir, site)
    if rec is None:
        raise RecordNotFound(f"no peer {site!r}; `meshlink peer list` shows the linked peers")
    PEERS.path(state_dir, site).unlink(missing_ok=True)
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
    grant: str = ""
    """The peer's grant endpoint (``host:port``, from the token): where the link
    re-authenticates when its certificate expired. Empty in links made before 0.1.0."""

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
            grant=str(d.get("grant", "")),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["endpoints"] = list(self.endpoints)
        return d


LINKS: Final = RecordStore(
    LINKS_DIR,
    LinkRecord.from_json,
    LinkRecord.to_json,
    lambda r: r.name,
    lambda k: check_name(k, "link name"),
)


def link_cert_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / LINKS_DIR / f"{check_name(name, 'link name')}.crt"


def find_link_to(state_dir: Path, site: str) -> LinkRecord | None:
    return next((r for r in LINKS.list(state_dir) if r.peer_site == site), None)


def forget_site(state_dir: Path, site: str) -> list[str]:
    """The site ``site`` unlinked itself from us: remove its peer record and our link
    records to it (and their certificates). Returns what was removed, for the log line."""
    removed = []
    if PEERS.load(state_dir, site) is not None:
        PEERS.path(state_dir, site).unlink(missing_ok=True)
        removed.append(f"peer record {site}")
    for rec in LINKS.list(state_dir):
        if rec.peer_site == site:
            LINKS.path(state_dir, rec.name).unlink(missing_ok=True)
            link_cert_path(state_dir, rec.name).unlink(missing_ok=True)
            removed.append(f"link record {rec.name}")
    return removed


def delete_link(state_dir: Path, name: str) -> LinkRecord:
    """Forget a link: remove its record and its client certificate."""
    rec = LINKS.load(state_dir, name)
    if rec is None:
        raise RecordNotFound(f"no link named {name!r}; `meshlink link list` shows the links")
    LINKS.path(state_dir, name).unlink(missing_ok=True)
    link_cert_path(state_dir, name).unlink(missing_ok=True)
    log.info("link %s to site %s deleted", name, rec.peer_site)
    return rec
