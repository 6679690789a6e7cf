"""The LMDB raw store: the embedded default (ACID, one file, synced on every commit).

Layout: one environment per directory (``data.mdb`` + ``lock.mdb``, files
0600, the directory 0700) and one named database, ``records``, mapping
``namespace (UTF-8) + b"\\0" + key`` to ``version (8 bytes, big-endian) +
payload``. Because a NUL ends the namespace, the keys of one namespace are a
contiguous, byte-ordered range: ``scan`` is a cursor walk over that range.

Rules:

- LMDB forbids opening one environment twice in a process, so environments
  live in a module-level registry keyed by the directory's real path and are
  shared (reference-counted) by every ``LmdbStore`` on that path. A child
  process after ``fork`` never reuses its parent's environment.
- ``put``/``delete``/``restore`` read the version and write inside one write
  transaction (LMDB serialises writers across threads and processes), then
  commit with ``sync``/``metasync``: durable when they return.
- Reads open a short read transaction per call; ``scan`` reads in chunks of
  ``SCAN_CHUNK`` records, each chunk from one snapshot, so a slow consumer
  never pins old pages.
- LMDB errors become ``StoreUnavailable`` naming the path (``MapFullError``:
  raise ``map_size``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from keygridd.storage.base import ABSENT, RawStore, Record, StoreError, StoreUnavailable, VersionConflict
from keygridd.storage.memory import check_name, check_version

DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file grows only as records are written
DB_NAME = b"records"
SCAN_CHUNK = 1000
_VERSION_BYTES = 8


@dataclass
class _Environment:
    env: Any  # lmdb.Environment
    db: Any  # lmdb._Database
    pid: int
    durable: bool
    users: int = 0


_environments: dict[str, _Environment] = {}
_environments_lock = threading.Lock()


def _acquire(path: str, map_size: int, durable: bool) -> _Environment:
    with _environments_lock:
        entry = _environments.get(path)
        if entry is not None and entry.pid != os.getpid():
            del _environments[path]  # inherited through fork: LMDB forbids using it in the child
            entry = None
        if entry is None:
            os.makedirs(path, mode=0o700, exist_ok=True)
            env = lmdb.open(
                path,
                map_size=map_size,
                subdir=True,
                max_dbs=2,
                sync=durable,
                metasync=durable,
                mode=0o600,
                lock=True,
            )
            try:
                env.reader_check()  # free reader slots left by killed processes
                db = env.open_db(DB_NAME)
            except BaseException:
                env.close()
                raise
            entry = _Environment(env, db, os.getpid(), durable)
            _environments[path] = entry
        elif entry.durable != durable:
            raise ValueError(f"{path} is already open with durable={entry.durable}")
        entry.users += 1
        return entry


def _release(path: str, entry: _Environment) -> None:
    with _environments_lock:
        entry.users -= 1
        if entry.users == 0 and _environments.get(path) is entry:
            del _environments[path]
            entry.env.close()


def _encode(version: int, value: bytes) -> bytes:
    return version.to_bytes(_VERSION_BYTES, "big") + value


def _decode(raw: bytes, where: str) -> Record:
    if len(raw) < _VERSION_BYTES:
        raise StoreError(f"{where}: corrupt record ({len(raw)} bytes)")
    return Record(int.from_bytes(raw[:_VERSION_BYTES], "big"), bytes(raw[_VERSION_BYTES:]))


class LmdbStore(RawStore):
    """Versioned records in one LMDB environment at ``path`` (a directory).

    ``durable=False`` skips the sync on commit: for bulk loads and benchmarks
    only, never for a token (a crash may lose the last commits).
    """

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE, durable: bool = True) -> None:
        self.path = os.path.realpath(os.fspath(path))
        try:
            self._entry = _acquire(self.path, map_size, durable)
        except (lmdb.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open LMDB store at {self.path}: {exc}") from exc
        self._env = self._entry.env
        self._db = self._entry.db
        self._close_lock = threading.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"LmdbStore({self.path!r})"

    # -- records -------------------------------------------------------------------------------

    def get(self, namespace: str, key: bytes) -> Record | None:
        full = check_name(namespace, key) + b"\0" + key
        self._check_open()
        try:
            with self._env.begin(db=self._db, buffers=False) as txn:
                raw = txn.get(full)
        except lmdb.Error as exc:
            raise self._unavailable("read", exc) from exc
        return None if raw is None else _decode(raw, f"{self.path} {namespace}")

    def put(self, namespace: str, key: bytes, value: bytes, expected: int) -> int:
        full = check_name(namespace, key) + b"\0" + key
        self._check_open()
        check_version(expected)
        value = bytes(value)
        try:
            with self._env.begin(db=self._db, write=True) as txn:
                found = self._version_in(txn, full, namespace)
                if found != expected:
                    raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
                txn.put(full, _encode(expected + 1, value))
        except lmdb.Error as exc:
            raise self._unavailable("write", exc) from exc
        return expected + 1

    def delete(self, namespace: str, key: bytes, expected: int) -> None:
        full = check_name(namespace, key) + b"\0" + key
        self._check_open()
        check_version(expected)
        try:
            with self._env.begin(db=self._db, write=True) as txn:
                found = self._version_in(txn, full, namespace)
                if found == ABSENT or found != expected:
                    raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
                txn.delete(full)
        except lmdb.Error as exc:
            raise self._unavailable("delete", exc) from exc

    def restore(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        full = check_name(namespace, key) + b"\0" + key
        self._check_open()
        check_version(version, "restored")
        if version < 1:
            raise ValueError(f"restored version must be >= 1, got {version}")
        value = bytes(value)
        try:
            with self._env.begin(db=self._db, write=True) as txn:
                found = self._version_in(txn, full, namespace)
                if found != ABSENT:
                    raise VersionConflict(f"{namespace}: record exists at version {found}")
                txn.put(full, _encode(version, value))
        except lmdb.Error as exc:
            raise self._unavailable("write", exc) from exc

    def scan(self, namespace: str) -> Iterator[tuple[bytes, Record]]:
        prefix = check_name(namespace) + b"\0"
        self._check_open()
        return self._scan(namespace, prefix)

    def _scan(self, namespace: str, prefix: bytes) -> Iterator[tuple[bytes, Record]]:
        start = prefix
        inclusive = True
        while True:
            chunk: list[tuple[bytes, Record]] = []
            try:
                with self._env.begin(db=self._db, buffers=False) as txn:
                    cursor = txn.cursor()
                    positioned = cursor.set_range(start)
                    if positioned and not inclusive and cursor.key() == start:
                        positioned = cursor.next()
                    while positioned and len(chunk) < SCAN_CHUNK:
                        full = cursor.key()
                        if not full.startswith(prefix):
                            break
                        chunk.append((full[len(prefix) :], _decode(cursor.value(), f"{self.path} {namespace}")))
                        positioned = cursor.next()
            except lmdb.Error as exc:
                raise self._unavailable("scan", exc) from exc
            yield from chunk
            if len(chunk) < SCAN_CHUNK:
                return
            start, inclusive = prefix + chunk[-1][0], False

    def namespaces(self) -> list[str]:
        self._check_open()
        found: list[str] = []
        try:
            with self._env.begin(db=self._db, buffers=False) as txn:
                cursor = txn.cursor()
                positioned = cursor.first()
                while positioned:
                    name = cursor.key().split(b"\0", 1)[0]
                    found.append(name.decode("utf-8"))
                    positioned = cursor.set_range(name + b"\x01")  # the first key past this namespace
        except lmdb.Error as exc:
            raise self._unavailable("scan", exc) from exc
        return found

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        _release(self.path, self._entry)

    def _check_open(self) -> None:
        if self.closed:
            raise StoreUnavailable(f"LMDB store at {self.path} is closed")

    def _version_in(self, txn: Any, full: bytes, namespace: str) -> int:
        raw = txn.get(full)
        return ABSENT if raw is None else _decode(raw, f"{self.path} {namespace}").version

    def _unavailable(self, action: str, exc: Exception) -> StoreUnavailable:
        if self.closed:
            return StoreUnavailable(f"LMDB store at {self.path} is closed")
        return StoreUnavailable(f"LMDB store at {self.path}: {action} failed: {type(exc).__name__}: {exc}")
