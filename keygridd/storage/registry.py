"""Opening raw stores by backend name: the one place configuration becomes a ``RawStore``.

``open_store(backend, options)`` knows ``memory``, ``lmdb`` (``path``,
optional ``map_size``), ``filesystem`` (``path``) and ``postgresql``
(``dsn``; ``keygridd.storage.postgres`` is imported only when asked, so the
PostgreSQL driver is needed only by those who use it).

Rules:

- Stores are shared: one per (backend, real path) — or per DSN, or per memory
  ``name`` — so several slots configured with the same store use one object
  (LMDB forbids opening an environment twice in a process anyway). Callers
  do not close a shared store; ``close_stores()`` closes them all at shutdown.
  A store found closed in the cache is opened again.
- Anything that stops a store from opening (unknown backend, missing or
  unknown option, unwritable path, unreachable server) raises
  ``StoreUnavailable`` with a message naming the backend and the path; a DSN
  is named with its password masked.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from keygridd.storage.base import RawStore, StoreError, StoreUnavailable
from keygridd.storage.filesystem import FilesystemStore
from keygridd.storage.lmdb import LmdbStore
from keygridd.storage.memory import MemoryStore

BACKENDS = ("memory", "lmdb", "filesystem", "postgresql")
_OPTIONS: dict[str, tuple[set[str], set[str]]] = {  # backend: (required, optional)
    "memory": (set(), {"name"}),
    "lmdb": ({"path"}, {"map_size"}),
    "filesystem": ({"path"}, set()),
    "postgresql": ({"dsn"}, set()),
}

_stores: dict[tuple[str, str], RawStore] = {}
_stores_lock = threading.Lock()


def open_store(backend: str, options: Mapping[str, Any]) -> RawStore:
    """The shared store for ``backend`` configured by ``options``, opened on first use."""
    required, optional = _OPTIONS.get(backend, (None, None))
    if required is None or optional is None:
        raise StoreUnavailable(f"unknown storage backend {backend!r} (known: {', '.join(BACKENDS)})")
    missing = sorted(required - options.keys())
    if missing:
        raise StoreUnavailable(f"{backend} store: missing option {missing[0]!r}")
    unknown = sorted(str(k) for k in options.keys() - required - optional)
    if unknown:
        raise StoreUnavailable(f"{backend} store: unknown option {unknown[0]!r}")

    identity, opener = _opener(backend, options)
    with _stores_lock:
        store = _stores.get((backend, identity))
        if store is not None and not getattr(store, "closed", False):
            return store
        try:
            store = opener()
        except StoreUnavailable:
            raise
        except (StoreError, OSError, ValueError, TypeError, ImportError) as exc:
            raise StoreUnavailable(f"cannot open {backend} store {identity}: {type(exc).__name__}: {exc}") from exc
        _stores[(backend, identity)] = store
        return store


def close_stores() -> None:
    """Close every shared store (daemon shutdown, tests); the next ``open_store`` opens anew."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its password masked (URI ``user:secret@`` and ``password=secret`` forms)."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


def _opener(backend: str, options: Mapping[str, Any]) -> tuple[str, Callable[[], RawStore]]:
    """(identity in the cache, a function opening the store)."""
    if backend == "memory":
        name = options.get("name", "")
        if not isinstance(name, str):
            raise StoreUnavailable("memory store: option 'name' must be a string")
        return name, MemoryStore
    if backend == "postgresql":
        dsn = options["dsn"]
        if not isinstance(dsn, str) or not dsn:
            raise StoreUnavailable("postgresql store: option 'dsn' must be a non-empty string")
        return redact_dsn(dsn), lambda: _open_postgres(dsn)

    path = _path_option(backend, options)
    if backend == "lmdb":
        map_size = options.get("map_size")
        if map_size is None:
            return path, lambda: LmdbStore(path)
        if not isinstance(map_size, int) or isinstance(map_size, bool) or map_size <= 0:
            raise StoreUnavailable(f"lmdb store {path}: option 'map_size' must be a positive integer (bytes)")
        return path, lambda: LmdbStore(path, map_size=map_size)
    return path, lambda: FilesystemStore(path)


def _path_option(backend: str, options: Mapping[str, Any]) -> str:
    path = options["path"]
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise StoreUnavailable(f"{backend} store: option 'path' must be a non-empty path")
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _open_postgres(dsn: str) -> RawStore:
    try:
        module = importlib.import_module("keygridd.storage.postgres")
    except ImportError as exc:
        raise StoreUnavailable(f"postgresql backend is not available: {exc}") from exc
    try:
        store: RawStore = module.PostgresStore(dsn)
    except StoreUnavailable as exc:
        raise StoreUnavailable(f"cannot open postgresql store {redact_dsn(dsn)}: {exc}") from exc
    return store
