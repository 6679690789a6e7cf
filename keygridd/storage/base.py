"""The raw store interface: versioned records with compare-and-swap.

A raw store keeps opaque byte records, never plaintext key material: the
sealing layer (``sealed.py``) encrypts before it writes. Records live in
*namespaces* (one per token, e.g. ``"token/<uuid>"``) under byte keys. Every
record has a version, starting at 1 and increased by one on every write;
``put`` and ``delete`` take the version the caller last saw, so concurrent
writers (threads, or daemons sharing a PostgreSQL store) cannot lose each
other's updates: the loser gets ``VersionConflict`` and re-reads.

Backends: ``memory`` (tests), ``lmdb`` (embedded default: ACID, synced on
commit), ``filesystem`` (one file per record, written atomically),
``postgresql`` (shared by several daemons, with change notification).
A backend that cannot be reached raises ``StoreUnavailable`` (the core answers
CKR_DEVICE_ERROR) and recovers by itself when the backend is back.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ABSENT = 0  # expected version of a record that must not exist yet


@dataclass(frozen=True, slots=True)
class Record:
    version: int
    value: bytes


class StoreError(Exception):
    """Base of storage failures."""


class VersionConflict(StoreError):
    """The record's version is not the one the caller expected (someone else wrote it)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or failed; the call may succeed later."""


Listener = Callable[[str, bytes], None]  # (namespace, key) changed, possibly by another daemon


class RawStore(abc.ABC):
    """Versioned byte records in namespaces. Methods may block: call them from worker threads."""

    @abc.abstractmethod
    def get(self, namespace: str, key: bytes) -> Record | None:
        """The record, or None if there is none."""

    @abc.abstractmethod
    def put(self, namespace: str, key: bytes, value: bytes, expected: int) -> int:
        """Write ``value`` if the record's version is ``expected`` (``ABSENT`` for a new record).

        Returns the new version (``expected + 1``); raises ``VersionConflict`` otherwise.
        Durable when it returns.
        """

    @abc.abstractmethod
    def delete(self, namespace: str, key: bytes, expected: int) -> None:
        """Remove the record if its version is ``expected``; ``VersionConflict`` otherwise."""

    @abc.abstractmethod
    def scan(self, namespace: str) -> Iterator[tuple[bytes, Record]]:
        """Every record of the namespace, in key order."""

    @abc.abstractmethod
    def restore(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        """Write a record with a given ``version`` (>= 1) if it is absent (token import).

        Raises ``VersionConflict`` if the record exists. Durable when it returns.
        """

    @abc.abstractmethod
    def namespaces(self) -> list[str]:
        """Every namespace holding at least one record (for export and maintenance)."""

    def subscribe(self, listener: Listener) -> None:  # noqa: B027 - optional: only shared stores notify
        """Call ``listener`` (from any thread) when another writer changes a record."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""
