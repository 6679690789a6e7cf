"""The filesystem store's own rules: layout, permissions, safe names, temporary files, errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keygridd.storage.base import ABSENT, Record, StoreError, StoreUnavailable
from keygridd.storage.filesystem import LOCK_NAME, TEMP_PREFIX, FilesystemStore, directory_name


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_and_permissions(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    store = FilesystemStore(root)
    store.put("token/1", b"\x01\xab", b"payload", ABSENT)
    store.close()
    directory = root / "token%2F1"
    assert sorted(os.listdir(directory)) == [LOCK_NAME, "01ab"]
    assert (directory / "01ab").read_bytes() == (1).to_bytes(8, "big") + b"payload"
    assert mode_of(root) == 0o700
    assert mode_of(directory) == 0o700
    assert mode_of(directory / "01ab") == 0o600
    assert mode_of(directory / LOCK_NAME) == 0o600


@pytest.mark.parametrize(
    "namespace, name",
    [("token/x", "token%2Fx"), (".", "%2E"), ("..", "%2E."), (".a", "%2Ea"), ("a b", "a%20b"), ("ü", "%C3%BC")],
)
def test_directory_names_are_safe_and_reversible(namespace: str, name: str) -> None:
    assert directory_name(namespace) == name
    assert "/" not in name and not name.startswith(".")


def test_leftover_temporary_files_are_ignored_and_removed_on_open(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    store.put("ns", b"k", b"v", ABSENT)
    store.close()
    directory = tmp_path / "ns"
    leftover = directory / f"{TEMP_PREFIX}deadbeef"
    leftover.write_bytes(b"\0" * 3)  # a torn write from a crash
    (tmp_path / "stray-file").write_bytes(b"x")  # foreign files are ignored
    (directory / "not-hex").write_bytes(b"x")
    (directory / "abc").write_bytes(b"x")  # odd length: not a record name
    reopened = FilesystemStore(tmp_path)
    assert not leftover.exists()
    assert list(reopened.scan("ns")) == [(b"k", Record(1, b"v"))]
    assert reopened.namespaces() == ["ns"]
    reopened.close()


def test_a_torn_record_is_reported_not_hidden(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    store.put("ns", b"k", b"v", ABSENT)
    (tmp_path / "ns" / b"k".hex()).write_bytes(b"\0\0")
    with pytest.raises(StoreError, match="corrupt"):
        store.get("ns", b"k")
    store.close()


def test_an_unusable_path_is_unavailable_with_the_path_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnavailable, match=str(blocker)):
        FilesystemStore(blocker / "store")


def test_a_vanished_directory_makes_writes_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    store = FilesystemStore(root)
    root.rmdir()
    blocker = root
    blocker.write_bytes(b"")  # the root is now a file
    with pytest.raises(StoreUnavailable, match="write failed"):
        store.put("ns", b"k", b"v", ABSENT)
    store.close()


def test_two_stores_on_one_directory_share_records(tmp_path: Path) -> None:
    first, second = FilesystemStore(tmp_path), FilesystemStore(tmp_path)
    first.put("ns", b"k", b"one", ABSENT)
    assert second.get("ns", b"k") == Record(1, b"one")
    assert second.put("ns", b"k", b"two", 1) == 2
    assert first.get("ns", b"k") == Record(2, b"two")
    first.close()
    second.close()
