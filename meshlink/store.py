"""Where a site keeps its state: one interface, two places.

A site's state is a few *documents*, each a set of small named files:

    pki      ca.key ca.crt gateway.key gateway.crt gateway-chain.crt   (the site identity)
    tokens   <id>.json                                                  (issuer: token hashes)
    peers    <site>.json                                                (issuer: linked sites)
    links    <name>.json <name>.crt                                     (redeemer: its links)

``FileStore`` keeps each document as a directory of the state directory (local mode, and
Kubernetes mode with ``kubernetes.state: files``): the layout meshlink always had.
``meshlink.k8s.secrets.SecretStore`` keeps each one as a Secret ``meshlink-<doc>`` in
meshlink's namespace, so every replica of a site, and `kubectl exec ... meshlink token
create` on any of them, share one state with no volume.

Writes are optimistic: ``update`` reads a document, lets a function change a copy, and
writes it back only if nobody wrote it meanwhile (``StoreConflict``; the Secret's
resourceVersion, a lock file for directories), else reads again and retries. Two replicas
redeeming the last use of one token at once: one wins, the other sees ``uses_left == 0``.

Either store also keeps a *local copy* of every document it reads under the state
directory (``local_dir``): TLS contexts load certificates and keys from files, and the
gateway rebuilds its context when those files change. For ``FileStore`` that copy is the
store itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from meshlink.errors import MeshlinkError

DOCS: Final = ("pki", "tokens", "peers", "links")
"""Every document of a site's state."""
DIR_MODE: Final = 0o700
MAX_ATTEMPTS: Final = 16
"""``update`` gives up after this many conflicts in a row (a document written that often
by others is a bug)."""


class StoreError(MeshlinkError):
    """The state cannot be read or written (the message says where and why)."""


class StoreConflict(StoreError):
    """The document changed since it was read: read it again and redo the change."""


@dataclass(frozen=True, slots=True)
class Doc:
    """One document as read: its files and an opaque version (empty: it does not exist)."""

    files: Mapping[str, bytes] = field(default_factory=dict)
    version: str = ""


def file_mode(name: str) -> int:
    """The mode of a document's file in a directory: certificates are public, everything
    else (keys, token hashes, records) is 0600."""
    return 0o644 if name.endswith(".crt") else 0o600


def check_file_name(name: str) -> str:
    """A document's file name: what a Secret's data key allows, and never a path."""
    ok = (
        0 < len(name) <= 253
        and name not in (".", "..")
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "-._") for c in name)
    )
    if not ok:
        raise StoreError(f"{name!r} is not a state file name")
    return name


# -- files ----------------------------------------------------------------------------------


def ensure_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create a directory with ``mode``, and every missing parent with it too (the state
    directory holds keys and link records: ``mkdir(parents=True)`` would give the parents
    it creates 0755). Directories that exist are left as they are."""
    missing = []
    p = path
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir(mode=mode, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create directory {path}: {e.strerror}") from None
    return path


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically; the file has ``mode`` (less umask) from creation."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {e.strerror}") from None


def read_dir(directory: Path) -> dict[str, bytes]:
    """The files of one document's directory (none if it does not exist)."""
    out: dict[str, bytes] = {}
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return out
    except OSError as e:
        raise StoreError(f"cannot read {directory}: {e.strerror}") from None
    for p in entries:
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            out[p.name] = p.read_bytes()
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError as e:
            raise StoreError(f"cannot read {p}: {e.strerror}") from None
    return out


def sync_dir(directory: Path, files: Mapping[str, bytes]) -> bool:
    """Make ``directory`` hold exactly ``files`` (each written only if it differs, with
    ``file_mode``); True if anything changed."""
    current = read_dir(directory)
    if current == files:
        return False
    ensure_dir(directory)
    for name, data in files.items():
        if current.get(name) != data:
            atomic_write(directory / check_file_name(name), data, file_mode(name))
    for name in current.keys() - files.keys():
        (directory / name).unlink(missing_ok=True)
    return True


# -- the interface --------------------------------------------------------------------------


@runtime_checkable
class Store(Protocol):
    """See the module docstring."""

    root: Path
    """The state directory: the local copy of every document, and local-only files."""
    caching: bool
    """Serve plain reads from a cache that ``refresh`` keeps (a running site)."""

    def read(self, doc: str, *, fresh: bool = False) -> Doc:
        """One document; ``fresh`` asks past any cache (a decision that must see the last
        write, such as a token's uses)."""

    def write(self, doc: str, files: Mapping[str, bytes], base: Doc) -> Doc:
        """Replace the document with ``files`` if it is still at ``base.version``, else
        raise StoreConflict. Returns the document as written."""

    def describe(self) -> str:
        """Where the state is, for messages: a directory, or Secrets in a namespace."""

    def close(self) -> None:
        """Release connections (the store stays usable: they are made again)."""

    def refresh(self) -> None:
        """Read every document again (for its cache)."""


class FreshReads:
    """A store whose every read goes past its cache: what a decision reads. A grant deciding
    on a token that `kubectl exec ... token create` made on the other replica a moment ago
    must see it, not this replica's copy of a second ago."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root
        self.caching = False

    def read(self, doc: str, *, fresh: bool = False) -> Doc:
        return self.store.read(doc, fresh=True)

    def write(self, doc: str, files: Mapping[str, bytes], base: Doc) -> Doc:
        return self.store.write(doc, files, base)

    def describe(self) -> str:
        return self.store.describe()

    def close(self) -> None:
        self.store.close()

    def refresh(self) -> None:
        self.store.refresh()


def local_dir(store: Store, doc: str) -> Path:
    """The directory holding the local copy of ``doc`` (as of its last read or write)."""
    return store.root / doc


def update(
    store: Store, doc: str, change: Callable[[dict[str, bytes]], bool]
) -> Mapping[str, bytes]:
    """Change a document safely against concurrent writers: ``change`` edits a copy of its
    files in place and returns whether it changed anything; it may run several times
    (after a conflict it gets the newer files). Returns the files as written (or as read,
    when nothing changed). Errors raised by ``change`` propagate (nothing is written)."""
    for attempt in range(MAX_ATTEMPTS):
        current = store.read(doc, fresh=True)
        files = dict(current.files)
        if not change(files):
            return current.files
        try:
            return store.write(doc, files, current).files
        except StoreConflict:
            # Writers that collided retry at random moments (up to 2 ms, doubling to 64 ms),
            # or the same ones collide again: without this, four processes bumping one
            # counter starved one of them past MAX_ATTEMPTS.
            time.sleep(random.uniform(0, min(0.064, 0.002 * 2**attempt)))  # noqa: S311 (jitter)
    raise StoreError(f"{store.describe()}: {doc} kept changing under {MAX_ATTEMPTS} attempts")


class FileStore:
    """The documents as directories of ``root`` (see the module docstring). A lock file per
    document serialises writers across processes (a CLI command and the running site)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.caching = False

    def refresh(self) -> None:
        pass

    def describe(self) -> str:
        return str(self.root)

    def close(self) -> None:
        pass

    def read(self, doc: str, *, fresh: bool = False) -> Doc:
        files = read_dir(self.root / doc)
        return Doc(files, _digest(files) if files else "")

    def write(self, doc: str, files: Mapping[str, bytes], base: Doc) -> Doc:
        with self._locked(doc):
            now = read_dir(self.root / doc)
            if (_digest(now) if now else "") != base.version:
                raise StoreConflict(f"{self.root / doc} changed meanwhile")
            sync_dir(self.root / doc, files)
        return Doc(dict(files), _digest(files) if files else "")

    @contextlib.contextmanager
    def _locked(self, doc: str) -> Iterator[None]:
        ensure_dir(self.root / doc)
        try:
            fd = os.open(self.root / doc / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot lock {self.root / doc}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _digest(files: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "big") + files[name])
    return h.hexdigest()


StateLike = Path | str | Store
"""What the record and identity functions take: a store, or a state directory (a
``FileStore`` of it)."""


def as_store(state: StateLike) -> Store:
    if isinstance(state, (str, Path)):
        return FileStore(Path(state))
    return state
