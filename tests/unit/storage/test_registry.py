"""open_store: backends by name, shared stores, option errors, the lazy PostgreSQL hook."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from keygridd.storage.base import StoreUnavailable
from keygridd.storage.filesystem import FilesystemStore
from keygridd.storage.lmdb import LmdbStore
from keygridd.storage.memory import MemoryStore
from keygridd.storage.registry import close_stores, open_store, redact_dsn


@pytest.mark.parametrize("backend, cls", [("lmdb", LmdbStore), ("filesystem", FilesystemStore)])
def test_stores_are_shared_per_backend_and_path(
    tmp_path: Path, backend: str, cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(backend, {"path": str(tmp_path / "s")})
    assert isinstance(store, cls)
    monkeypatch.chdir(tmp_path)
    assert open_store(backend, {"path": "s/"}) is store
    assert open_store(backend, {"path": tmp_path / "other"}) is not store
    store.close()  # a closed store is not handed out again
    reopened = open_store(backend, {"path": str(tmp_path / "s")})
    assert reopened is not store and not getattr(reopened, "closed", True)


def test_memory_stores_are_shared_by_name() -> None:
    default = open_store("memory", {})
    assert isinstance(default, MemoryStore)
    assert open_store("memory", {}) is default
    assert open_store("memory", {"name": "other"}) is not default


def test_close_stores_closes_every_shared_store(tmp_path: Path) -> None:
    stores = [
        open_store("lmdb", {"path": str(tmp_path / "l")}),
        open_store("filesystem", {"path": str(tmp_path / "f")}),
    ]
    close_stores()
    assert all(getattr(s, "closed", False) for s in stores)
    assert open_store("lmdb", {"path": str(tmp_path / "l")}) is not stores[0]


@pytest.mark.parametrize(
    "backend, options, message",
    [
        ("sqlite", {}, "unknown storage backend 'sqlite'"),
        ("lmdb", {}, "missing option 'path'"),
        ("filesystem", {"path": "/x", "mode": 1}, "unknown option 'mode'"),
        ("lmdb", {"path": ""}, "option 'path' must be a non-empty path"),
        ("lmdb", {"path": "/tmp/x", "map_size": -1}, "'map_size' must be a positive integer"),
        ("filesystem", {"path": 3}, "option 'path'"),
        ("postgresql", {}, "missing option 'dsn'"),
        ("postgresql", {"dsn": ""}, "'dsn' must be a non-empty string"),
    ],
)
def test_bad_options_are_unavailable_with_a_message(backend: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(StoreUnavailable, match=message):
        open_store(backend, options)


@pytest.mark.parametrize("backend", ["lmdb", "filesystem"])
def test_an_unwritable_path_names_the_path(tmp_path: Path, backend: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnavailable, match=str(blocker / "store")):
        open_store(backend, {"path": str(blocker / "store")})


def test_postgres_is_imported_only_when_asked() -> None:
    code = (
        "import sys, keygridd.storage.registry as r; "
        "assert 'keygridd.storage.postgres' not in sys.modules; "
        "r.open_store('memory', {}); assert 'keygridd.storage.postgres' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_postgres_hook_opens_and_shares_by_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    class FakePostgresStore(MemoryStore):
        def __init__(self, dsn: str) -> None:
            super().__init__()
            opened.append(dsn)

    module = types.ModuleType("keygridd.storage.postgres")
    module.PostgresStore = FakePostgresStore  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keygridd.storage.postgres", module)
    dsn = "postgresql://keygrid:s3cret@db.example/keygrid"
    store = open_store("postgresql", {"dsn": dsn})
    assert isinstance(store, FakePostgresStore)
    assert open_store("postgresql", {"dsn": dsn}) is store
    assert opened == [dsn]


def test_postgres_failures_are_unavailable_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(dsn: str) -> None:
        raise StoreUnavailable("connection refused")

    module = types.ModuleType("keygridd.storage.postgres")
    module.PostgresStore = refuse  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keygridd.storage.postgres", module)
    with pytest.raises(StoreUnavailable) as info:
        open_store("postgresql", {"dsn": "host=db user=k password=s3cret"})
    assert "connection refused" in str(info.value) and "host=db" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_missing_postgres_module_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keygridd.storage.postgres", None)  # import fails
    with pytest.raises(StoreUnavailable, match="postgresql backend is not available"):
        open_store("postgresql", {"dsn": "host=db"})


@pytest.mark.parametrize(
    "dsn, redacted",
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h password=pw user=u", "host=h password=*** user=u"),
        ("host=h password='p w' user=u", "host=h password=*** user=u"),
    ],
)
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted
