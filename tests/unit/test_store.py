"""The state store interface (meshlink/store.py) with its directory implementation: what
every store must do (optimistic writes, a conflict on a stale base, retries in ``update``),
and the directory's own rules (modes, names, the lock across processes)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from meshlink import links
from meshlink.store import (
    Doc,
    FileStore,
    StoreConflict,
    StoreError,
    as_store,
    check_file_name,
    local_dir,
    update,
)


def test_a_directory_document_round_trips_with_its_modes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state")
    assert store.read("pki") == Doc()
    written = store.write("pki", {"ca.key": b"K", "ca.crt": b"C"}, Doc())
    assert written.version
    assert store.read("pki") == written
    d = local_dir(store, "pki")
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "ca.crt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    store.write("pki", {"ca.crt": b"C2"}, written)
    assert store.read("pki").files == {"ca.crt": b"C2"}  # ca.key removed
    assert as_store(tmp_path / "state").read("pki").files == {"ca.crt": b"C2"}


def test_a_write_from_a_stale_read_is_a_conflict(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    first = store.read("tokens")
    store.write("tokens", {"a.json": b"1"}, first)
    with pytest.raises(StoreConflict):
        store.write("tokens", {"b.json": b"1"}, first)
    assert store.read("tokens").files == {"a.json": b"1"}


def test_update_retries_on_a_conflict_and_skips_no_change(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    runs = []

    def change(files: dict[str, bytes]) -> bool:
        runs.append(dict(files))
        if len(runs) == 1:  # someone else writes between our read and our write
            store.write("peers", {"other.json": b"x"}, store.read("peers"))
        files["mine.json"] = b"y"
        return True

    assert update(store, "peers", change) == {"other.json": b"x", "mine.json": b"y"}
    assert runs == [{}, {"other.json": b"x"}]
    assert update(store, "peers", lambda f: False) == {"other.json": b"x", "mine.json": b"y"}


def test_update_gives_up_on_a_document_that_never_settles(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    n = iter(range(100))

    def change(files: dict[str, bytes]) -> bool:
        store.write("links", {"x": str(next(n)).encode()}, store.read("links"))
        files["y"] = b"1"
        return True

    with pytest.raises(StoreError, match="kept changing"):
        update(store, "links", change)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "é", "a b"])
def test_file_names_never_leave_their_document(name: str) -> None:
    with pytest.raises(StoreError):
        check_file_name(name)


def test_processes_writing_one_directory_lose_nothing(tmp_path: Path) -> None:
    """A CLI command and the running site write one state directory: the lock file keeps
    each read-modify-write whole."""
    ctx = multiprocessing.get_context("fork")
    store = FileStore(tmp_path)
    procs = [ctx.Process(target=_bump_many, args=(str(tmp_path), 20)) for _ in range(3)]
    for p in procs:
        p.start()
    _bump_many(str(tmp_path), 20)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert store.read("counter").files["n"] == b"80"


def _bump_many(root: str, n: int) -> None:
    store = FileStore(Path(root))
    for _ in range(n):

        def bump(files: dict[str, bytes]) -> bool:
            files["n"] = str(int(files.get("n", b"0")) + 1).encode()
            return True

        update(store, "counter", bump)


def test_a_damaged_record_names_where_it_is(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write("tokens", {"0123456789abcdef.json": b"{nope"}, Doc())
    with pytest.raises(Exception, match=r"tokens/0123456789abcdef.json: damaged record"):
        links.TOKENS.list(store)
