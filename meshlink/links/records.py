"""Link and peer records, and the issuer's token store: three documents of the site's state
(``meshlink.store``: directories of the state directory, or Secrets).

Files (every write optimistic: see ``store.update``)::

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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from meshlink.errors import ConfigError, MeshlinkError
from meshlink.links.tokens import is_token_id
from meshlink.pki import is_site_id
from meshlink.store import FileStore, StateLike, StoreError, as_store, local_dir, update

log = logging.getLogger(__name__)

TOKENS_DIR: Final = "tokens"
PEERS_DIR: Final = "peers"
LINKS_DIR: Final = "links"

R = TypeVar("R")


class RecordNotFound(MeshlinkError):
    """No link, peer or token record by that name."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class RecordStore(Generic[R]):
    """One kind of record: a JSON file per record in one document of the state, named by
    the record's key (checked by ``check_key``: a name can never leave it)."""

    def __init__(
        self,
        directory: str,
        parse: Callable[[dict[str, Any]], R],
        dump: Callable[[R], dict[str, Any]],
        key_of: Callable[[R], str],
        check_key: Callable[[str], str],
    ) -> None:
        self.directory = directory
        """The document (a directory of the state directory in a FileStore)."""
        self._parse = parse
        self._dump = dump
        self._key_of = key_of
        self._check_key = check_key

    def file(self, key: str) -> str:
        return f"{self._check_key(key)}.json"

    def path(self, state: StateLike, key: str) -> Path:
        """The record's file in the local copy of the state."""
        return local_dir(as_store(state), self.directory) / self.file(key)

    def encode(self, rec: R) -> bytes:
        return (json.dumps(self._dump(rec), indent=1, sort_keys=True) + "\n").encode()

    def write(self, state: StateLike, rec: R) -> None:
        name, data = self.file(self._key_of(rec)), self.encode(rec)

        def put(files: dict[str, bytes]) -> bool:
            if files.get(name) == data:
                return False
            files[name] = data
            return True

        _update(state, self.directory, put)

    def update(
        self, state: StateLike, key: str, change: Callable[[R | None], R | None]
    ) -> R | None:
        """Read-modify-write one record against concurrent writers: ``change`` gets the
        record (None: there is none) and returns the new one (None: remove it); it may run
        again after a conflict. Its errors propagate, and nothing is written then."""
        name = self.file(key)
        result: list[R | None] = [None]

        def edit(files: dict[str, bytes]) -> bool:
            old = self._decode(state, name, files.get(name))
            new = result[0] = change(old)
            if new is None:
                return files.pop(name, None) is not None
            data = self.encode(new)
            if files.get(name) == data:
                return False
            files[name] = data
            return True

        _update(state, self.directory, edit)
        return result[0]

    def delete(self, state: StateLike, key: str) -> bool:
        """Remove a record; False if there was none."""
        name = self.file(key)
        gone = [False]

        def drop(files: dict[str, bytes]) -> bool:
            gone[0] = files.pop(name, None) is not None
            return gone[0]

        _update(state, self.directory, drop)
        return gone[0]

    def load(self, state: StateLike, key: str) -> R | None:
        """The record, or None if there is none. A damaged one is a clear error."""
        name = self.file(key)
        return self._decode(state, name, _read(state, self.directory).get(name))

    def list(self, state: StateLike) -> list[R]:
        """Every record, by file name."""
        files = _read(state, self.directory)
        out = []
        for name in sorted(files):
            if name.endswith(".json"):
                rec = self._decode(state, name, files[name])
                if rec is not None:
                    out.append(rec)
        return out

    def _decode(self, state: StateLike, name: str, raw: bytes | None) -> R | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return self._parse(data)
        except (ValueError, TypeError, KeyError) as e:
            where = _where(state, self.directory, name)
            raise ConfigError(
                f"damaged record ({e}); remove it and redo the link", source=where
            ) from None


def _where(state: StateLike, doc: str, name: str) -> str:
    store = as_store(state)
    if isinstance(store, FileStore):
        return str(store.root / doc / name)
    return f"{store.describe()}: {doc}/{name}"


def _read(state: StateLike, doc: str) -> Mapping[str, bytes]:
    try:
        return as_store(state).read(doc).files
    except StoreError as e:
        raise ConfigError(str(e)) from None


def _update(state: StateLike, doc: str, change: Callable[[dict[str, bytes]], bool]) -> None:
    try:
        update(as_store(state), doc, change)
    except StoreError as e:
        raise ConfigError(str(e)) from None


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


def revoke_token(state: StateLike, token_id: str) -> None:
    if not TOKENS.delete(state, token_id):
        raise RecordNotFound(f"no token {token_id}; `meshlink token list` shows the tokens")


def prune_tokens(state: StateLike, *, now: float | None = None, keep: float = 86400.0) -> int:
    """Remove token records that expired more than ``keep`` seconds ago; return how many."""
    now = time.time() if now is None else now
    gone = [0]

    def prune(files: dict[str, bytes]) -> bool:
        gone[0] = 0
        for name in sorted(files):
            rec = TOKENS._decode(state, name, files[name]) if name.endswith(".json") else None
            if rec is not None and rec.expires + keep < now:
                del files[name]
                gone[0] += 1
        return gone[0] > 0

    _update(state, TOKENS_DIR, prune)
    return gone[0]


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


def revoke_peer(state: StateLike, site: str) -> PeerRecord:
    """Forget a peer: its gateway is refused from now on (the gateway checks on every link)."""
    rec = PEERS.load(state, site)
    if rec is None or not PEERS.delete(state, site):
        raise RecordNotFound(f"no peer {site!r}; `meshlink peer list` shows the linked peers")
    log.info("peer %s revoked", site)
    return rec


def is_peer_allowed(state: StateLike, site: str) -> bool:
    """Cheap check made on every accepted link: is ``site`` a current peer?"""
    if not isinstance(site, str) or not is_site_id(site):
        return False
    try:
        return PEERS.file(site) in _read(state, PEERS_DIR)
    except MeshlinkError:
        return False


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


def link_cert_path(state: StateLike, name: str) -> Path:
    """The link's client certificate in the local copy of the state (TLS loads it)."""
    return local_dir(as_store(state), LINKS_DIR) / _cert_file(name)


def _cert_file(name: str) -> str:
    return f"{check_name(name, 'link name')}.crt"


def link_cert(state: StateLike, name: str) -> bytes | None:
    """The link's client certificate (PEM), None if there is none."""
    return _read(state, LINKS_DIR).get(_cert_file(name))


def write_link(state: StateLike, rec: LinkRecord, cert_pem: bytes | None = None) -> None:
    """Write a link record, and with ``cert_pem`` its client certificate, in one write."""
    files_new = {LINKS.file(rec.name): LINKS.encode(rec)}
    if cert_pem is not None:
        files_new[_cert_file(rec.name)] = cert_pem

    def put(files: dict[str, bytes]) -> bool:
        if all(files.get(k) == v for k, v in files_new.items()):
            return False
        files.update(files_new)
        return True

    _update(state, LINKS_DIR, put)


def write_link_cert(state: StateLike, name: str, cert_pem: bytes) -> None:
    """Replace the client certificate of an existing link (RecordNotFound if it is gone)."""
    rec_file, cert_file = LINKS.file(name), _cert_file(name)

    def put(files: dict[str, bytes]) -> bool:
        if rec_file not in files:
            raise RecordNotFound(f"no link named {name!r} to store a certificate for")
        if files.get(cert_file) == cert_pem:
            return False
        files[cert_file] = cert_pem
        return True

    _update(state, LINKS_DIR, put)


def find_link_to(state: StateLike, site: str) -> LinkRecord | None:
    return next((r for r in LINKS.list(state) if r.peer_site == site), None)


def _drop_links(files: dict[str, bytes], names: set[str]) -> bool:
    before = len(files)
    for name in names:
        files.pop(LINKS.file(name), None)
        files.pop(_cert_file(name), None)
    return len(files) != before


def forget_site(state: StateLike, site: str) -> list[str]:
    """The site ``site`` unlinked itself from us: remove its peer record and our link
    records to it (and their certificates). Returns what was removed, for the log line."""
    removed = []
    if PEERS.delete(state, site):
        removed.append(f"peer record {site}")
    names = {r.name for r in LINKS.list(state) if r.peer_site == site}
    if names:
        _update(state, LINKS_DIR, lambda files: _drop_links(files, names))
        removed += [f"link record {n}" for n in sorted(names)]
    return removed


def delete_link(state: StateLike, name: str) -> LinkRecord:
    """Forget a link: remove its record and its client certificate."""
    rec = LINKS.load(state, name)
    if rec is None:
        raise RecordNotFound(f"no link named {name!r}; `meshlink link list` shows the links")
    _update(state, LINKS_DIR, lambda files: _drop_links(files, {name}))
    log.info("link %s to site %s deleted", name, rec.peer_site)
    return rec
