"""Scale sanity: 100,000 records in one namespace. Rates are printed, not asserted; a get must stay fast."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import pytest
from storage_helpers import BACKENDS, open_backend

from keygridd.storage.base import ABSENT, RawStore, Record

pytestmark = pytest.mark.slow

RECORDS = 100_000
DURABLE_PUTS = 300
NS = "token/scale"
VALUE = bytes(200)  # about a sealed EC key object


def key_of(i: int) -> bytes:
    return b"obj-%08d" % i


@pytest.mark.parametrize("backend", BACKENDS)
def test_100k_records_in_one_namespace(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "store"
    bulk = open_backend(backend, path, durable=False)  # the fill skips fsync; durable puts are timed below
    began = time.perf_counter()
    for i in range(RECORDS):
        bulk.put(NS, key_of(i), VALUE, ABSENT)
    fill = time.perf_counter() - began

    store: RawStore = bulk
    if backend != "memory":
        bulk.close()
        store = open_backend(backend, path)
    try:
        began = time.perf_counter()
        for i in range(DURABLE_PUTS):
            store.put(NS, b"durable-%d" % i, VALUE, ABSENT)
        durable_rate = DURABLE_PUTS / (time.perf_counter() - began)

        began = time.perf_counter()
        count = sum(1 for _ in store.scan(NS))
        scan = time.perf_counter() - began
        assert count == RECORDS + DURABLE_PUTS

        rng = random.Random(1)
        timings = []
        for _ in range(2000):
            i = rng.randrange(RECORDS)
            t = time.perf_counter()
            record = store.get(NS, key_of(i))
            timings.append(time.perf_counter() - t)
            assert record == Record(1, VALUE)
        p99 = statistics.quantiles(timings, n=100)[98]
        print(
            f"\n{backend}: {RECORDS} puts without fsync at {RECORDS / fill:,.0f}/s; durable puts {durable_rate:,.0f}/s; "
            f"scan of {count} records {scan:.2f} s; get median {statistics.median(timings) * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us"
        )
        assert p99 < 0.005, "a get among 100,000 records should take well under 5 ms"
    finally:
        store.close()
