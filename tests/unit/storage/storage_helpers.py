"""Helpers shared by the storage tests: opening each backend, raw on-disk bytes, CAS counters.

``raw_bytes_of(store)`` is what the sealing layer's "no plaintext at rest" test
reads; run as a script, this module is the second process of the
multi-process tests (``python storage_helpers.py increment BACKEND PATH N THREADS``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # run as a child process: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from keygridd.storage.base import ABSENT, RawStore, VersionConflict
from keygridd.storage.filesystem import FilesystemStore
from keygridd.storage.lmdb import LmdbStore
from keygridd.storage.memory import MemoryStore

BACKENDS = ("memory", "lmdb", "filesystem")
DURABLE_BACKENDS = ("lmdb", "filesystem")
COUNTER_NS = "token/counter"
COUNTER_KEY = b"counter"


def open_backend(backend: str, path: Path | str, *, durable: bool = True) -> RawStore:
    """A new store object of ``backend`` at ``path`` (the memory backend ignores the path)."""
    if backend == "memory":
        return MemoryStore()
    if backend == "lmdb":
        return LmdbStore(path, durable=durable)
    if backend == "filesystem":
        return FilesystemStore(path, durable=durable)
    raise ValueError(backend)


class Opener:
    """Opens (and reopens) one backend at one path; closes whatever it opened."""

    def __init__(self, backend: str, path: Path) -> None:
        self.backend = backend
        self.path = path
        self.opened: list[RawStore] = []
        self.store = self.open()

    def open(self) -> RawStore:
        store = open_backend(self.backend, self.path)
        self.opened.append(store)
        return store

    def reopen(self) -> RawStore:
        """Close every store opened so far and open the path again."""
        self.close_all()
        self.store = self.open()
        return self.store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()
        self.opened.clear()


def raw_bytes_of(store: RawStore) -> bytes:
    """Every byte of every file under an lmdb or filesystem store's directory, concatenated."""
    root = getattr(store, "path", None)
    if root is None:
        raise TypeError(f"{store!r} has no files")
    chunks = []
    for directory, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            chunks.append(Path(directory, name).read_bytes())
    return b"".join(chunks)


def increment(store: RawStore, times: int, namespace: str = COUNTER_NS, key: bytes = COUNTER_KEY) -> int:
    """Add one to a decimal counter record ``times`` times with CAS retries; returns the conflicts seen."""
    conflicts = 0
    for _ in range(times):
        while True:
            record = store.get(namespace, key)
            current, version = (int(record.value), record.version) if record else (0, ABSENT)
            time.sleep(0)  # let other threads in between the read and the write
            try:
                store.put(namespace, key, str(current + 1).encode(), version)
                break
            except VersionConflict:
                conflicts += 1
    return conflicts


def increment_in_threads(store: RawStore, threads: int, times: int) -> int:
    """``threads`` threads each run ``increment(store, times)``; returns the total conflicts."""
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work() -> None:
        try:
            barrier.wait()
            results.append(increment(store, times))
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(results)


def main(argv: list[str]) -> None:
    command, backend, path, times, threads = argv
    assert command == "increment"
    store = open_backend(backend, path)
    try:
        print("ready", flush=True)
        sys.stdin.readline()  # start together with the other process
        print(increment_in_threads(store, int(threads), int(times)), flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main(sys.argv[1:])
