"""The PostgreSQL raw store against a real server: semantics, CAS across processes, notification, schema, outages."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import keygridd.storage.postgres as postgres_backend
from keygridd.cli import main as cli_main
from keygridd.storage import migrations
from keygridd.storage.base import ABSENT, Record, StoreUnavailable, VersionConflict
from keygridd.storage.memory import MAX_KEY, MAX_NAMESPACE
from keygridd.storage.postgres import PostgresStore
from keygridd.storage.registry import close_stores, open_store

if TYPE_CHECKING:
    from tests.integration.pg import PostgresServer


NS = "token/7d1c0e52-6a8e-4c1b-9f00-2b7f3c1d9e44"


@pytest.fixture
def store(pg_dsn: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_dsn)
    yield opened
    opened.close()


@pytest.fixture(autouse=True)
def _close_shared_stores() -> Iterator[None]:
    yield
    close_stores()


class Collector:
    """A listener that records (namespace, key) notifications and lets a test wait for them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, namespace: str, key: bytes) -> None:
        with self._cond:
            self.seen.append((namespace, key))
            self._cond.notify_all()

    def wait_for(self, item: tuple[str, bytes], timeout: float = 5.0) -> float:
        """Seconds it took until ``item`` was seen (fails after ``timeout``)."""
        start = time.monotonic()
        with self._cond:
            ok = self._cond.wait_for(lambda: item in self.seen, timeout)
        assert ok, f"no notification for {item} within {timeout} s (seen: {self.seen})"
        return time.monotonic() - start


def eventually(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


# --- RawStore semantics ---------------------------------------------------------------------------------------------


def test_records_versions_and_compare_and_swap(store: PostgresStore) -> None:
    assert store.get(NS, b"k") is None
    assert store.put(NS, b"k", b"v1", ABSENT) == 1
    assert store.get(NS, b"k") == Record(1, b"v1")
    for expected in (ABSENT, 2, 7):
        with pytest.raises(VersionConflict, match="version 1"):
            store.put(NS, b"k", b"lost", expected)
    assert store.get(NS, b"k") == Record(1, b"v1")
    version = 1
    for i in range(2, 12):
        version = store.put(NS, b"k", b"v%d" % i, version)
        assert version == i
    assert store.get(NS, b"k") == Record(11, b"v11")
    # Empty and binary values (every byte) round-trip exactly.
    assert store.put(NS, b"empty", b"", ABSENT) == 1
    assert store.get(NS, b"empty") == Record(1, b"")
    blob = bytes(range(256)) * 64
    assert store.put(NS, b"\x00\xff", blob, ABSENT) == 1
    assert store.get(NS, b"\x00\xff") == Record(1, blob)
    # Deletes are CAS too; a missing record cannot be deleted.
    for expected in (ABSENT, 10, 12):
        with pytest.raises(VersionConflict):
            store.delete(NS, b"k", expected)
    store.delete(NS, b"k", 11)
    assert store.get(NS, b"k") is None
    with pytest.raises(VersionConflict):
        store.delete(NS, b"k", 11)
    with pytest.raises(VersionConflict):
        store.delete(NS, b"never", ABSENT)
    # A deleted record starts again at version 1.
    assert store.put(NS, b"k", b"again", ABSENT) == 1


def test_scan_is_in_byte_order_and_pages(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_backend, "SCAN_CHUNK", 3)
    keys = [b"\xff", b"\x00", b"a", b"a\x00", b"B", b"\x7f\x80", b"obj/1", b"obj/10", b"obj/2", b"\x80"]
    for i, key in enumerate(keys):
        store.put(NS, key, b"%d" % i, ABSENT)
    store.put("other", b"a", b"elsewhere", ABSENT)
    scanned = list(store.scan(NS))
    assert [k for k, _ in scanned] == sorted(keys)
    assert dict(scanned)[b"a\x00"] == Record(1, b"3")
    assert list(store.scan("nobody")) == []


def test_namespaces_isolation_and_limits(store: PostgresStore) -> None:
    names = ["token/b", "token/a", "Zeta", "é-token", "token/a0"]
    for ns in names:
        store.put(ns, b"k", ns.encode(), ABSENT)
    assert store.namespaces() == sorted(names, key=lambda n: n.encode())
    assert store.get("token/a", b"k") == Record(1, b"token/a")
    store.delete("Zeta", b"k", 1)
    assert "Zeta" not in store.namespaces()
    with pytest.raises(ValueError):
        store.get("", b"k")
    with pytest.raises(ValueError):
        store.get("x" * (MAX_NAMESPACE + 1), b"k")
    with pytest.raises(ValueError):
        store.put("bad\0ns", b"k", b"v", ABSENT)
    with pytest.raises(ValueError):
        store.put(NS, b"k" * (MAX_KEY + 1), b"v", ABSENT)
    with pytest.raises(ValueError):
        store.put(NS, b"", b"v", ABSENT)
    store.put(NS, b"k" * MAX_KEY, b"v", ABSENT)
    store.put("n" * MAX_NAMESPACE, b"k", b"v", ABSENT)


def test_restore_keeps_versions_and_refuses_existing_records(store: PostgresStore) -> None:
    store.restore(NS, b"meta", 42, b"m")
    assert store.get(NS, b"meta") == Record(42, b"m")
    with pytest.raises(VersionConflict, match="42"):
        store.restore(NS, b"meta", 1, b"other")
    assert store.put(NS, b"meta", b"m2", 42) == 43
    with pytest.raises(ValueError):
        store.restore(NS, b"zero", 0, b"v")


# --- concurrency ------------------------------------------------------------------------------------------------------

INCREMENTER = r"""
import sys
from keygridd.storage.base import VersionConflict
from keygridd.storage.postgres import PostgresStore

dsn, rounds = sys.argv[1], int(sys.argv[2])
store = PostgresStore(dsn)
retries = 0
for _ in range(rounds):
    while True:
        record = store.get("counter", b"n")
        try:
            store.put("counter", b"n", b"%d" % (int(record.value) + 1), record.version)
            break
        except VersionConflict:
            retries += 1
store.close()
print(retries)
"""


def test_two_processes_increment_one_record_without_losing_an_update(store: PostgresStore, pg_dsn: str) -> None:
    rounds = 300
    store.put("counter", b"n", b"0", ABSENT)
    children = [
        subprocess.Popen([sys.executable, "-c", INCREMENTER, pg_dsn, str(rounds)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    record = store.get("counter", b"n")
    assert record == Record(2 * rounds + 1, b"%d" % (2 * rounds))
    retries = sum(int(out) for out in outputs)
    assert retries >= 0  # the count varies; conflicts were retried, none was lost (checked above)


def test_threads_share_the_pool(store: PostgresStore) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            version = ABSENT
            for i in range(50):
                version = store.put(NS, b"t%d" % n, b"%d" % i, version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [r.version for _, r in store.scan(NS)] == [50] * 8


# --- change notification -------------------------------------------------------------------------------------------


def test_subscriber_sees_every_write(store: PostgresStore, pg_dsn: str) -> None:
    seen = Collector()
    store.subscribe(seen)
    other = PostgresStore(pg_dsn)
    try:
        time.sleep(0.2)  # the listener thread connects
        store.put(NS, b"own", b"mine", ABSENT)
        other.put(NS, b"obj/\x01", b"v", ABSENT)
        delay = seen.wait_for((NS, b"obj/\x01"))
        assert delay < 1.0
        # Its own writes too: a reader whose re-read raced its own write is put right by the next one.
        seen.wait_for((NS, b"own"))
        seen.seen.clear()
        other.put(NS, b"obj/\x01", b"v2", 1)
        seen.wait_for((NS, b"obj/\x01"))
        seen.seen.clear()
        other.delete(NS, b"obj/\x01", 2)
        seen.wait_for((NS, b"obj/\x01"))
        # Writes by anyone else (here: plain SQL, as an import tool would) are notified too.
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO keygrid_records (namespace, key, version, value) VALUES (%s, %s, 1, %s)",
                ("elsewhere", b"meta", b"x"),
            )
        seen.wait_for(("elsewhere", b"meta"))
    finally:
        other.close()


def test_registry_opens_postgresql_lazily_and_shares_the_store(pg_dsn: str) -> None:
    first = open_store("postgresql", {"dsn": pg_dsn})
    assert isinstance(first, PostgresStore)
    assert open_store("postgresql", {"dsn": pg_dsn}) is first
    first.put(NS, b"k", b"v", ABSENT)
    close_stores()
    assert first.closed
    with pytest.raises(StoreUnavailable, match="closed"):
        first.get(NS, b"k")
    assert open_store("postgresql", {"dsn": pg_dsn}).get(NS, b"k") == Record(1, b"v")


# --- schema ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli_main(list(argv))
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


def test_a_store_opened_before_migration_names_the_fix(postgres: PostgresServer) -> None:
    dsn = postgres.database()
    with pytest.raises(StoreUnavailable, match="schema is missing: run keygrid db migrate"):
        PostgresStore(dsn)
    with pytest.raises(StoreUnavailable, match="run keygrid db migrate"):
        open_store("postgresql", {"dsn": dsn})
    postgres.execute(dsn, "CREATE TABLE keygrid_schema (version integer NOT NULL)")
    postgres.execute(dsn, "INSERT INTO keygrid_schema VALUES (0)")
    with pytest.raises(StoreUnavailable, match=r"version 0, not 1: run keygrid db migrate"):
        PostgresStore(dsn)


def test_db_migrate_is_idempotent(postgres: PostgresServer, cli: Any, tmp_path: Path) -> None:
    dsn = postgres.database()
    rc, out, err = cli("db", "migrate", "--dsn", dsn)
    assert rc == 0, err
    assert f"migrated from version 0 to {migrations.SCHEMA_VERSION}" in out
    PostgresStore(dsn).close()
    rc, out, err = cli("--json", "db", "migrate", "--dsn", dsn)
    assert rc == 0, err
    assert json.loads(out)["from"] == json.loads(out)["to"] == migrations.SCHEMA_VERSION
    # Data survives a second migration.
    with PostgresStoreClosing(dsn) as store:
        store.put(NS, b"k", b"v", ABSENT)
    rc, out, err = cli("db", "migrate", "--dsn", dsn)
    assert rc == 0 and "up to date" in out
    with PostgresStoreClosing(dsn) as store:
        assert store.get(NS, b"k") == Record(1, b"v")
    # A database newer than this code is refused, by the store and by migrate.
    postgres.execute(dsn, "UPDATE keygrid_schema SET version = 99")
    with pytest.raises(StoreUnavailable, match="upgrade keygrid"):
        PostgresStore(dsn)
    rc, out, err = cli("db", "migrate", "--dsn", dsn)
    assert rc == 1 and "newer than this keygrid" in err


def test_db_migrate_from_the_slot_config(postgres: PostgresServer, cli: Any, tmp_path: Path) -> None:
    dsn = postgres.database()
    config = tmp_path / "keygrid.yaml"
    config.write_text(
        f"""
server: {{socket: "{tmp_path / "kg.sock"}"}}
slots:
  - id: 3
    provider: software
    options: {{backend: postgresql, dsn: "{dsn}", namespace: shared}}
  - id: 4
    provider: memory
"""
    )
    rc, out, err = cli("db", "migrate", "--config", str(config), "--slot", "3")
    assert rc == 0 and "migrated from version 0" in out, err
    PostgresStore(dsn).close()
    rc, _, err = cli("db", "migrate", "--config", str(config), "--slot", "4")
    assert rc == 2 and "not 'software'" in err
    rc, _, err = cli("db", "migrate", "--config", str(config), "--slot", "9")
    assert rc == 2 and "no slot 9" in err
    rc, _, err = cli("db", "migrate")
    assert rc == 2 and "--dsn" in err
    rc, _, err = cli("db", "migrate", "--dsn", dsn, "--config", str(config), "--slot", "3")
    assert rc == 2 and "not both" in err


def test_two_hosts_migrating_at_once(postgres: PostgresServer) -> None:
    dsn = postgres.database()
    children = [
        subprocess.Popen([sys.executable, "-m", "keygridd.cli", "db", "migrate", "--dsn", dsn], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    results = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], results
    assert sum("migrated from version 0" in out for out, _ in results) == 1
    PostgresStore(dsn).close()


def test_the_password_never_appears_in_errors_or_logs(cli: Any, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Sup3r-s3cret-pw"
    dsns = [
        f"host=/nonexistent/kg port=5432 user=kg password={secret} dbname=kg connect_timeout=2",
        f"postgresql://kg:{secret}@/kg?host=/nonexistent/kg&connect_timeout=2",
    ]
    caplog.set_level(logging.DEBUG)
    for dsn in dsns:
        with pytest.raises(StoreUnavailable) as caught:
            open_store("postgresql", {"dsn": dsn})
        assert secret not in str(caught.value)
        assert "nonexistent" in str(caught.value)
        rc, out, err = cli("db", "migrate", "--dsn", dsn)
        assert rc == 1
        assert secret not in out + err
    assert secret not in caplog.text


class PostgresStoreClosing:
    def __init__(self, dsn: str) -> None:
        self.store = PostgresStore(dsn)

    def __enter__(self) -> PostgresStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


# --- outages ------------------------------------------------------------------------------------------------------------


def test_server_restart_under_a_running_store(postgres: PostgresServer, pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    writer = PostgresStore(pg_dsn)
    seen = Collector()
    try:
        store.subscribe(seen)
        version = store.put(NS, b"k", b"before", ABSENT)
        list(store.scan(NS))

        # A restart cuts every connection: the next call reconnects by itself.
        postgres.restart()
        assert store.get(NS, b"k") == Record(1, b"before")

        # While the server is down every call fails fast with StoreUnavailable.
        postgres.stop()
        try:
            started = time.monotonic()
            calls: list[Callable[[], object]] = [
                lambda: store.get(NS, b"k"),
                lambda: store.put(NS, b"k", b"during", version),
                lambda: store.delete(NS, b"k", version),
                lambda: list(store.scan(NS)),
                lambda: store.namespaces(),
                lambda: store.restore(NS, b"r", 3, b"v"),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable, match="postgresql store"):
                    call()
            assert time.monotonic() - started < 10
        finally:
            postgres.start()

        # Back: the same objects work again, without reopening, and nothing was half-written.
        assert store.get(NS, b"k") == Record(1, b"before")
        assert store.put(NS, b"k", b"after", version) == 2
        assert store.namespaces() == [NS]

        # Change notification is back too, and a change made before the listener reconnected is not lost.
        writer.put(NS, b"while-away", b"v", ABSENT)
        seen.wait_for((NS, b"while-away"), timeout=15)
        seen.seen.clear()
        writer.put(NS, b"later", b"v", ABSENT)
        assert seen.wait_for((NS, b"later"), timeout=5) < 1.0
    finally:
        store.close()
        writer.close()


def test_a_killed_backend_fails_one_call_at_most(postgres: PostgresServer, store: PostgresStore, pg_dsn: str) -> None:
    store.put(NS, b"k", b"v", ABSENT)
    rows = postgres.execute(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'keygridd' AND pid <> pg_backend_pid()",
    )
    assert rows
    eventually(lambda: _get_or_none(store) is not None)
    assert store.get(NS, b"k") == Record(1, b"v")


def _get_or_none(store: PostgresStore) -> Record | None:
    try:
        return store.get(NS, b"k")
    except StoreUnavailable:
        return None


def test_connections_bound_the_time_of_a_statement(store: PostgresStore) -> None:
    conn = store._connect()
    try:
        (timeout,) = conn.execute("SHOW statement_timeout").fetchone() or ("",)
        assert timeout == f"{postgres_backend.STATEMENT_TIMEOUT_MS // 1000}s"
        assert conn.info.get_parameters().get("application_name") == "keygridd"
    finally:
        conn.close()
