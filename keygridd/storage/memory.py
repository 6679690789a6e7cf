"""The memory raw store: dicts behind one lock, for tests and throw-away tokens.

Same semantics as the durable backends (versions, compare-and-swap, key
order, namespace isolation, the same name limits) and nothing survives the
process. ``check_name`` holds the name rules every backend of this package
applies, so a record that fits one backend fits all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from keygridd.storage.base import ABSENT, RawStore, Record, StoreUnavailable, VersionConflict

MAX_NAMESPACE = 80  # UTF-8 bytes; the filesystem backend's directory name must stay under 255 characters
MAX_KEY = 127  # bytes; the filesystem backend names a record file by the key's hex (254 characters)


def check_name(namespace: str, key: bytes | None = None) -> bytes:
    """The namespace as UTF-8, after checking it (and ``key``) against the limits shared by all backends.

    Raises ``ValueError``: an empty or oversized name, or a NUL in the namespace, is a caller's bug.
    """
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be str, not {type(namespace).__name__}")
    encoded = namespace.encode("utf-8")
    if not encoded or len(encoded) > MAX_NAMESPACE or b"\0" in encoded:
        raise ValueError(f"namespace must be 1..{MAX_NAMESPACE} UTF-8 bytes without NUL, got {namespace!r}")
    if key is not None:
        if not isinstance(key, bytes):
            raise TypeError(f"key must be bytes, not {type(key).__name__}")
        if not 1 <= len(key) <= MAX_KEY:
            raise ValueError(f"key must be 1..{MAX_KEY} bytes, got {len(key)}")
    return encoded


def check_version(version: int, what: str = "expected") -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{what} version must be an int >= 0, got {version!r}")


class MemoryStore(RawStore):
    """Records in ``{namespace: {key: Record}}``; every method takes one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[bytes, Record]] = {}
        self.closed = False

    def get(self, namespace: str, key: bytes) -> Record | None:
        check_name(namespace, key)
        with self._lock:
            self._check_open()
            return self._data.get(namespace, {}).get(key)

    def put(self, namespace: str, key: bytes, value: bytes, expected: int) -> int:
        check_name(namespace, key)
        check_version(expected)
        value = bytes(value)
        with self._lock:
            self._check_open()
            records = self._data.setdefault(namespace, {})
            current = records.get(key)
            found = current.version if current is not None else ABSENT
            if found != expected:
                raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
            records[key] = Record(expected + 1, value)
            return expected + 1

    def delete(self, namespace: str, key: bytes, expected: int) -> None:
        check_name(namespace, key)
        check_version(expected)
        with self._lock:
            self._check_open()
            records = self._data.get(namespace, {})
            current = records.get(key)
            found = current.version if current is not None else ABSENT
            if current is None or found != expected:
                raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
            del records[key]
            if not records:
                del self._data[namespace]

    def restore(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        check_name(namespace, key)
        check_version(version, "restored")
        if version < 1:
            raise ValueError(f"restored version must be >= 1, got {version}")
        value = bytes(value)
        with self._lock:
            self._check_open()
            records = self._data.setdefault(namespace, {})
            current = records.get(key)
            if current is not None:
                raise VersionConflict(f"{namespace}: record exists at version {current.version}")
            records[key] = Record(version, value)

    def scan(self, namespace: str) -> Iterator[tuple[bytes, Record]]:
        check_name(namespace)
        with self._lock:
            self._check_open()
            snapshot = sorted(self._data.get(namespace, {}).items())
        return iter(snapshot)

    def namespaces(self) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(ns for ns, records in self._data.items() if records)

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise StoreUnavailable("memory store is closed")
