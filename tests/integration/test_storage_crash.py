"""Crash safety of the on-disk raw stores: SIGKILL a writer at random moments, then reopen.

A child process writes records in a loop and prints each key only after its
``put`` returned; the parent kills it with SIGKILL at a random moment, reopens
the store (no repair step) and checks: every printed record is there with its
value, nothing torn or invented is there, the counter record moved by exactly
the updates that completed, and scan and namespaces work. 50 kills per backend.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keygridd.storage.base import ABSENT, RawStore, Record
from keygridd.storage.filesystem import TEMP_PREFIX, FilesystemStore
from keygridd.storage.lmdb import LmdbStore

pytestmark = pytest.mark.slow

KILLS = 50
NS = "token/crash"
COUNTER = b"counter"
STRIDE = 1_000_000  # keys of cycle c are c * STRIDE + i

CHILD = r"""
import hashlib, sys
from keygridd.storage.base import ABSENT
from keygridd.storage.{module} import {cls}

def value_of(i):
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 50)

store = {cls}(sys.argv[1])
start = int(sys.argv[2])
print("ready", flush=True)
i = start
while True:
    store.put({ns!r}, b"n%d" % i, value_of(i), ABSENT)
    print("n", i, flush=True)
    record = store.get({ns!r}, {counter!r})
    store.put({ns!r}, {counter!r}, b"%d" % i, record.version if record else ABSENT)
    print("c", i, flush=True)
    i += 1
"""


def value_of(i: int) -> bytes:
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 50)


def open_store(backend: str, path: Path) -> RawStore:
    return LmdbStore(path) if backend == "lmdb" else FilesystemStore(path)


def run_and_kill(backend: str, path: Path, start: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """One child run killed at a random moment: the (n, c) indices it printed."""
    module, cls = ("lmdb", "LmdbStore") if backend == "lmdb" else ("filesystem", "FilesystemStore")
    code = CHILD.format(module=module, cls=cls, ns=NS, counter=COUNTER)
    child = subprocess.Popen([sys.executable, "-c", code, str(path), str(start)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        output = child.stdout.read()
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    written: dict[str, list[int]] = {"n": [], "c": []}
    for line in output.splitlines():
        kind, _, index = line.partition(" ")
        if index:  # the kill may cut the last line short: it then proves nothing
            written[kind].append(int(index))
    return written["n"], written["c"]


@pytest.mark.parametrize("backend", ["lmdb", "filesystem"])
def test_sigkill_never_loses_a_returned_put(tmp_path: Path, backend: str) -> None:
    path = tmp_path / backend
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    counter = Record(0, b"")
    total_printed = 0
    began = time.monotonic()
    for cycle in range(1, KILLS + 1):
        start = cycle * STRIDE
        printed_n, printed_c = run_and_kill(backend, path, start, rng)
        total_printed += len(printed_n)

        store = open_store(backend, path)  # a fresh open each time: no repair step exists
        try:
            records = dict(store.scan(NS))
            assert store.namespaces() == ([NS] if records else [])
            present = sorted(
                int(key[1:]) for key in records if key != COUNTER and start <= int(key[1:]) < start + STRIDE
            )
            in_flight = start + len(printed_n)
            assert set(printed_n) <= set(present) <= {*printed_n, in_flight}, f"cycle {cycle}"
            for key, record in records.items():  # nothing torn, nothing invented, from any cycle
                if key != COUNTER:
                    assert record == Record(1, value_of(int(key[1:]))), key
                    assert store.get(NS, key) == record

            now = records.get(COUNTER, Record(ABSENT, b""))
            allowed = {counter.value if not printed_c else b"%d" % printed_c[-1]}
            if printed_n:
                allowed.add(b"%d" % printed_n[-1])
            if counter.version or printed_c or now.version:
                assert now.value in allowed, f"cycle {cycle}: counter {now.value!r} not in {allowed}"
            assert now.version - counter.version in (len(printed_c), len(printed_c) + 1)
            counter = now
        finally:
            store.close()
        if backend == "filesystem":
            assert not [p for p in path.rglob(TEMP_PREFIX + "*")], "temporary files survived a reopen"
    elapsed = time.monotonic() - began
    print(f"{backend}: {KILLS} kills in {elapsed:.1f} s, {total_printed} acknowledged puts all found")
