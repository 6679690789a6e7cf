"""One suite over every raw store: records, CAS, order, namespaces, restore, durability, concurrency."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from storage_helpers import COUNTER_KEY, COUNTER_NS, Opener, increment_in_threads, raw_bytes_of

import keygridd.storage.lmdb as lmdb_backend
from keygridd.storage.base import ABSENT, Record, StoreUnavailable, VersionConflict
from keygridd.storage.memory import MAX_KEY, MAX_NAMESPACE

NS = "token/0b1e6f9a-2f0c-4a53-9d43-6f1f2c3e4d5a"
HELPER = Path(__file__).with_name("storage_helpers.py")


def test_get_of_a_missing_record_is_none(opener: Opener) -> None:
    assert opener.store.get(NS, b"nothing") is None


def test_put_then_get(opener: Opener) -> None:
    store = opener.store
    assert store.put(NS, b"k", b"value", ABSENT) == 1
    assert store.get(NS, b"k") == Record(1, b"value")


def test_versions_increase_by_one(opener: Opener) -> None:
    store = opener.store
    version = ABSENT
    for i in range(10):
        new = store.put(NS, b"k", b"v%d" % i, version)
        assert new == version + 1
        version = new
    assert store.get(NS, b"k") == Record(10, b"v9")


@pytest.mark.parametrize("stale", [ABSENT, 1, 2, 4])
def test_put_with_a_stale_version_conflicts_and_changes_nothing(opener: Opener, stale: int) -> None:
    store = opener.store
    for version in range(3):
        store.put(NS, b"k", b"v%d" % version, version)
    with pytest.raises(VersionConflict):
        store.put(NS, b"k", b"lost", stale)
    assert store.get(NS, b"k") == Record(3, b"v2")


def test_put_of_a_new_record_needs_absent(opener: Opener) -> None:
    with pytest.raises(VersionConflict):
        opener.store.put(NS, b"k", b"v", 1)
    assert opener.store.get(NS, b"k") is None


def test_delete(opener: Opener) -> None:
    store = opener.store
    store.put(NS, b"k", b"v", ABSENT)
    store.put(NS, b"k", b"w", 1)
    with pytest.raises(VersionConflict):
        store.delete(NS, b"k", 1)
    with pytest.raises(VersionConflict):
        store.delete(NS, b"k", ABSENT)
    assert store.get(NS, b"k") == Record(2, b"w")
    store.delete(NS, b"k", 2)
    assert store.get(NS, b"k") is None
    with pytest.raises(VersionConflict):
        store.delete(NS, b"k", 2)
    with pytest.raises(VersionConflict):
        store.delete(NS, b"k", ABSENT)
    assert store.put(NS, b"k", b"again", ABSENT) == 1  # a re-created record starts over


def test_values_are_opaque_bytes(opener: Opener) -> None:
    store = opener.store
    values = {b"empty": b"", b"nul": b"\0" * 9, b"big": random.randbytes(1 << 20), b"ff": b"\xff" * 3}
    for key, value in values.items():
        store.put(NS, key, value, ABSENT)
    for key, value in values.items():
        assert store.get(NS, key) == Record(1, value)


def test_scan_is_in_key_order(opener: Opener) -> None:
    store = opener.store
    rng = random.Random(7)
    keys = {b"\x00", b"\xff", b"\x00\x00", b"a", b"ab", b"b", b"\x7f\x80"} | {
        rng.randbytes(rng.randint(1, 20)) for _ in range(200)
    }
    for key in rng.sample(sorted(keys), len(keys)):
        store.put(NS, key, b"v:" + key, ABSENT)
    scanned = list(store.scan(NS))
    assert [key for key, _ in scanned] == sorted(keys)
    assert all(record == Record(1, b"v:" + key) for key, record in scanned)


def test_scan_of_an_empty_namespace(opener: Opener) -> None:
    assert list(opener.store.scan(NS)) == []


def test_scan_across_lmdb_chunks(opener: Opener) -> None:
    store = opener.store
    count = lmdb_backend.SCAN_CHUNK * 2 + 1
    for i in range(count):
        store.put(NS, i.to_bytes(4, "big"), b"x", ABSENT)
    assert [key for key, _ in store.scan(NS)] == [i.to_bytes(4, "big") for i in range(count)]


def test_writes_during_a_scan_do_not_break_it(opener: Opener) -> None:
    store = opener.store
    for i in range(50):
        store.put(NS, bytes([i + 1]), b"x", ABSENT)
    seen = []
    for key, record in store.scan(NS):
        seen.append(key)
        store.delete(NS, key, record.version)
        store.put(NS, key + b"+", b"y", ABSENT)
    assert seen[:50:7] == [bytes([i + 1]) for i in range(0, 50, 7)]
    assert seen == sorted(seen)


NAMESPACES = ["a", "a/b", "ab", "a\x01", "token/x", ".", "..", ".hidden", "%2F", "ключ", "a b"]


def test_namespaces_are_isolated(opener: Opener) -> None:
    store = opener.store
    for ns in NAMESPACES:
        store.put(ns, b"k", ns.encode(), ABSENT)
        store.put(ns, ns.encode()[:MAX_KEY], b"own", ABSENT)
    for ns in NAMESPACES:
        assert store.get(ns, b"k") == Record(1, ns.encode())
        assert dict(store.scan(ns)) == {b"k": Record(1, ns.encode()), ns.encode(): Record(1, b"own")}
    store.put("a", b"k", b"changed", 1)
    assert store.get("a/b", b"k") == Record(1, b"a/b")
    assert store.get("ab", b"k") == Record(1, b"ab")


def test_namespaces_lists_those_holding_records(opener: Opener) -> None:
    store = opener.store
    assert store.namespaces() == []
    for ns in NAMESPACES:
        store.put(ns, b"k", b"v", ABSENT)
    assert store.namespaces() == sorted(NAMESPACES)
    store.delete("a/b", b"k", 1)
    assert "a/b" not in store.namespaces()
    assert store.namespaces() == sorted(set(NAMESPACES) - {"a/b"})


def test_restore_writes_an_absent_record_with_its_version(opener: Opener) -> None:
    store = opener.store
    store.restore(NS, b"k", 42, b"imported")
    assert store.get(NS, b"k") == Record(42, b"imported")
    with pytest.raises(VersionConflict):
        store.put(NS, b"k", b"x", 41)
    assert store.put(NS, b"k", b"next", 42) == 43
    with pytest.raises(VersionConflict):
        store.restore(NS, b"k", 7, b"over")
    assert store.get(NS, b"k") == Record(43, b"next")
    with pytest.raises(ValueError):
        store.restore(NS, b"other", 0, b"v")
    assert store.get(NS, b"other") is None


@pytest.mark.parametrize(
    "namespace, key",
    [("", b"k"), ("a\0b", b"k"), ("x" * (MAX_NAMESPACE + 1), b"k"), (NS, b""), (NS, b"k" * (MAX_KEY + 1))],
    ids=["empty-ns", "nul-ns", "long-ns", "empty-key", "long-key"],
)
def test_bad_names_are_refused_by_every_backend(opener: Opener, namespace: str, key: bytes) -> None:
    with pytest.raises(ValueError):
        opener.store.put(namespace, key, b"v", ABSENT)
    with pytest.raises(ValueError):
        opener.store.get(namespace, key)


def test_longest_names_fit_every_backend(opener: Opener) -> None:
    for ns in ("n" * MAX_NAMESPACE, "/" * MAX_NAMESPACE, "é" * (MAX_NAMESPACE // 2)):
        opener.store.put(ns, b"\xff" * MAX_KEY, b"v", ABSENT)
        assert opener.store.get(ns, b"\xff" * MAX_KEY) == Record(1, b"v")
        assert ns in opener.store.namespaces()


def test_bad_versions_are_refused(opener: Opener) -> None:
    with pytest.raises(ValueError):
        opener.store.put(NS, b"k", b"v", -1)
    with pytest.raises(ValueError):
        opener.store.delete(NS, b"k", -1)


def test_a_closed_store_is_unavailable(opener: Opener) -> None:
    opener.store.put(NS, b"k", b"v", ABSENT)
    opener.store.close()
    opener.store.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        opener.store.get(NS, b"k")
    with pytest.raises(StoreUnavailable):
        opener.store.put(NS, b"k", b"w", 1)


def test_reopening_sees_everything_written(durable_opener: Opener) -> None:
    store = durable_opener.store
    expected: dict[str, dict[bytes, Record]] = {}
    for n, ns in enumerate(NAMESPACES):
        for i in range(20):
            key = b"key-%d" % i
            version = ABSENT
            for j in range(i % 4 + 1):
                version = store.put(ns, key, b"%s/%d/%d" % (ns.encode(), i, j), version)
            expected.setdefault(ns, {})[key] = Record(version, b"%s/%d/%d" % (ns.encode(), i, i % 4))
        store.delete(ns, b"key-3", expected[ns].pop(b"key-3").version)
        store.restore(ns, b"restored", 100 + n, b"r")
        expected[ns][b"restored"] = Record(100 + n, b"r")
    reopened = durable_opener.reopen()
    assert reopened is not store
    assert reopened.namespaces() == sorted(NAMESPACES)
    for ns, records in expected.items():
        assert dict(reopened.scan(ns)) == records
        assert reopened.get(ns, b"key-3") is None


def test_no_lost_update_from_8_threads(opener: Opener) -> None:
    conflicts = increment_in_threads(opener.store, threads=8, times=25)
    record = opener.store.get(COUNTER_NS, COUNTER_KEY)
    assert record is not None
    assert (int(record.value), record.version) == (200, 200)
    print(f"{opener.backend}: 200 increments from 8 threads, {conflicts} CAS conflicts retried")


def test_no_lost_update_from_2_processes(durable_opener: Opener) -> None:
    """Two processes with 4 threads each increment one counter through the same directory."""
    store = durable_opener.store
    args = [sys.executable, str(HELPER), "increment", durable_opener.backend, str(durable_opener.path), "30", "4"]
    children = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.close()
        outputs = []
        for child in children:
            assert child.stdout is not None
            outputs.append(child.stdout.read())
            child.wait(timeout=120)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
    assert [child.returncode for child in children] == [0, 0]
    record = store.get(COUNTER_NS, COUNTER_KEY)
    assert record is not None
    assert (int(record.value), record.version) == (240, 240)
    print(f"{durable_opener.backend}: 240 increments from 2 processes, conflicts {[o.strip() for o in outputs]}")


def test_on_disk_bytes_show_a_plain_payload(durable_opener: Opener) -> None:
    """The baseline the sealing layer's "no plaintext at rest" test inverts: this helper sees what is stored."""
    payload = b"PLAINTEXT-MARKER-" + random.randbytes(16).hex().encode()
    assert payload not in raw_bytes_of(durable_opener.store)
    durable_opener.store.put(NS, b"secret", payload, ABSENT)
    assert payload in raw_bytes_of(durable_opener.store)
    assert payload in raw_bytes_of(durable_opener.reopen())
