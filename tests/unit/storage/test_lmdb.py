"""The LMDB store's own rules: one shared environment per path, file modes, layout, errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import keygridd.storage.lmdb as lmdb_backend
from keygridd.storage.base import ABSENT, Record, StoreUnavailable
from keygridd.storage.lmdb import LmdbStore


def test_stores_on_one_path_share_one_environment(tmp_path: Path) -> None:
    first = LmdbStore(tmp_path / "db")
    second = LmdbStore(str(tmp_path / "db") + "/")
    assert first.path == second.path
    assert lmdb_backend._environments[first.path].users == 2
    first.put("ns", b"k", b"v", ABSENT)
    assert second.get("ns", b"k") == Record(1, b"v")
    first.close()
    assert second.put("ns", b"k", b"w", 1) == 2  # the environment outlives the first store
    second.close()
    assert first.path not in lmdb_backend._environments
    third = LmdbStore(tmp_path / "db")  # a fresh environment after the last close
    assert third.get("ns", b"k") == Record(2, b"w")
    third.close()


def test_durability_must_agree_on_a_shared_path(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path)
    with pytest.raises(ValueError):
        LmdbStore(tmp_path, durable=False)
    store.close()


def test_files_and_directory_modes(tmp_path: Path) -> None:
    root = tmp_path / "db"
    LmdbStore(root).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert sorted(p.name for p in root.iterdir()) == ["data.mdb", "lock.mdb"]
    for name in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600


def test_record_layout(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path)
    store.put("ns", b"k", b"payload", ABSENT)
    with store._env.begin(db=store._db) as txn:
        assert txn.get(b"ns\0k") == (1).to_bytes(8, "big") + b"payload"
    store.close()


def test_a_full_map_is_unavailable_and_names_the_path(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, map_size=1 << 20)
    with pytest.raises(StoreUnavailable, match=str(tmp_path)):
        for i in range(100):
            store.put("ns", b"%d" % i, bytes(64 << 10), ABSENT)
    assert store.get("ns", b"0") == Record(1, bytes(64 << 10))  # earlier commits are intact
    store.close()


def test_an_unusable_path_is_unavailable_with_the_path_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnavailable, match=str(blocker)):
        LmdbStore(blocker / "db")
