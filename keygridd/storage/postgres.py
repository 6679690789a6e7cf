"""The PostgreSQL raw store: one table shared by several daemons, with change notification.

Layout (``migrations.py``): ``keygrid_records(namespace, key, version,
value)``, primary key ``(namespace, key)``; the schema is created by
``keygrid db migrate``, never by the daemon, and checked at open.

Rules:

- Compare-and-swap is one autocommit statement each: ``INSERT .. ON CONFLICT
  DO NOTHING`` for a new record (and ``restore``), ``UPDATE .. WHERE version =
  expected`` and ``DELETE .. WHERE version = expected`` otherwise; no row
  touched means ``VersionConflict``. Durable when the commit returns.
- Calls come from worker threads: a small pool of connections (``pool_size``)
  behind one lock. A connection that fails is thrown away and the call raises
  ``StoreUnavailable`` (the daemon answers CKR_DEVICE_ERROR); the next call
  connects again, so the store recovers by itself when the server is back.
  An idle connection the server has closed (restart) is noticed before use.
- ``subscribe``: one daemon thread with its own connection ``LISTEN``s on
  ``keygrid_changes`` (sent by a trigger on every change) and calls the
  listeners with ``(namespace, key)``. Changes this store made itself are
  reported too, on purpose: a reader that applies a re-read which raced one of
  its own writes is put right by the re-read that follows its own write, so
  every daemon converges on the last write. When the listening connection
  drops it reconnects with backoff, then compares every record's version with
  what it saw before and reports the differences: changes made while it was
  not listening are not lost (a few may be reported twice, which is harmless).
- The DSN is never logged or put in a message with its password
  (``registry.redact_dsn``).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import conninfo

from keygridd.storage import migrations
from keygridd.storage.base import ABSENT, Listener, RawStore, Record, StoreUnavailable, VersionConflict
from keygridd.storage.memory import check_name, check_version
from keygridd.storage.registry import redact_dsn

log = logging.getLogger("keygridd.storage.postgres")

SCAN_CHUNK = 1000
CONNECT_TIMEOUT = 5  # seconds, unless the DSN says otherwise
STATEMENT_TIMEOUT_MS = 30_000  # one statement; records are small, so anything longer is a stuck server
POOL_WAIT = 30.0  # seconds a call waits for a free connection
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
_POLL = 0.5  # seconds between checks of the stop flag in the listener thread

_Snapshot = dict[tuple[str, bytes], int]


def _reason(exc: BaseException) -> str:
    """A one-line description of a driver error, without anything that looks like a password."""
    text = str(exc).strip().splitlines()
    return redact_dsn(f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))


class PostgresStore(RawStore):
    """Versioned records in the ``keygrid_records`` table of the database named by ``dsn``."""

    def __init__(self, dsn: str, *, pool_size: int = 4) -> None:
        try:
            params = conninfo.conninfo_to_dict(dsn)
        except psycopg.Error:
            raise StoreUnavailable("postgresql store: the dsn is not a valid connection string") from None
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        # A server that accepts but stops answering must not hold a worker thread for ever: statements
        # give up after STATEMENT_TIMEOUT_MS, dead TCP peers are noticed by keepalives.
        params.setdefault("options", f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        params.setdefault("keepalives", 1)
        params.setdefault("keepalives_idle", 30)
        params.setdefault("keepalives_interval", 10)
        params.setdefault("keepalives_count", 3)
        params.setdefault("application_name", "keygridd")
        self._conninfo = conninfo.make_conninfo("", **params)
        self.name = redact_dsn(dsn)
        self._pool_size = max(1, pool_size)
        self._lock = threading.Condition(threading.Lock())
        self._idle: list[psycopg.Connection[Any]] = []
        self._open = 0  # connections handed out or idle
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False
        conn = self._take()
        try:
            found = migrations.schema_version(conn)
        except psycopg.Error as exc:
            self._discard(conn)
            raise StoreUnavailable(f"postgresql store {self.name}: cannot read the schema: {_reason(exc)}") from None
        self._give(conn)
        problem = None
        if found is None or found < migrations.SCHEMA_VERSION:
            state = "missing" if found is None else f"at version {found}, not {migrations.SCHEMA_VERSION}"
            problem = f"the schema is {state}: run keygrid db migrate"
        elif found > migrations.SCHEMA_VERSION:
            problem = f"the schema is at version {found}, newer than this keygrid ({migrations.SCHEMA_VERSION}): upgrade keygrid"
        if problem is not None:
            self.close()
            raise StoreUnavailable(f"postgresql store {self.name}: {problem}")

    def __repr__(self) -> str:
        return f"PostgresStore({self.name!r})"

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"postgresql store {self.name}: cannot connect: {_reason(exc)}") from None
        return conn

    def _take(self) -> psycopg.Connection[Any]:
        """A healthy connection from the pool, or a new one (at most ``pool_size`` at once)."""
        deadline = time.monotonic() + POOL_WAIT
        with self._lock:
            while True:
                if self.closed:
                    raise StoreUnavailable(f"postgresql store {self.name} is closed")
                while self._idle:
                    conn = self._idle.pop()
                    if _healthy(conn):
                        return conn
                    self._forget(conn)
                if self._open < self._pool_size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"postgresql store {self.name}: no free connection")
                self._lock.wait(left)
        try:
            conn = self._connect()
        except BaseException:
            with self._lock:
                self._open -= 1
                self._lock.notify()
            raise
        return conn

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if self.closed:
                self._forget(conn)
            else:
                self._idle.append(conn)
            self._lock.notify()

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._forget(conn)
            self._lock.notify()

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        """Close ``conn`` and drop it from the count (the lock is held)."""
        self._open -= 1
        try:
            conn.close()
        except Exception:
            pass

    def _run(self, action: str, query: str, params: tuple[Any, ...] = ()) -> tuple[int, list[tuple[Any, ...]]]:
        """Run one autocommit statement: (rows affected, rows returned). Driver failures become StoreUnavailable."""
        conn = self._take()
        try:
            cur = conn.execute(query, params)
            rows = cur.fetchall() if cur.description is not None else []
            count = cur.rowcount
        except psycopg.Error as exc:
            self._discard(conn)
            if self.closed:
                raise StoreUnavailable(f"postgresql store {self.name} is closed") from None
            log.warning("postgresql store %s: %s failed: %s", self.name, action, _reason(exc))
            raise StoreUnavailable(f"postgresql store {self.name}: {action} failed: {_reason(exc)}") from None
        except BaseException:
            self._discard(conn)
            raise
        self._give(conn)
        return count, rows

    def _version(self, namespace: str, key: bytes) -> int:
        _, rows = self._run(
            "read", "SELECT version FROM keygrid_records WHERE namespace = %s AND key = %s", (namespace, key)
        )
        return int(rows[0][0]) if rows else ABSENT

    # -- records -------------------------------------------------------------------------------

    def get(self, namespace: str, key: bytes) -> Record | None:
        check_name(namespace, key)
        _, rows = self._run(
            "read", "SELECT version, value FROM keygrid_records WHERE namespace = %s AND key = %s", (namespace, key)
        )
        return Record(int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def put(self, namespace: str, key: bytes, value: bytes, expected: int) -> int:
        check_name(namespace, key)
        check_version(expected)
        value = bytes(value)
        if expected == ABSENT:
            count, _ = self._run(
                "write",
                "INSERT INTO keygrid_records (namespace, key, version, value) VALUES (%s, %s, 1, %s) "
                "ON CONFLICT DO NOTHING",
                (namespace, key, value),
            )
        else:
            count, _ = self._run(
                "write",
                "UPDATE keygrid_records SET version = version + 1, value = %s "
                "WHERE namespace = %s AND key = %s AND version = %s",
                (value, namespace, key, expected),
            )
        if count != 1:
            found = self._version(namespace, key)
            raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
        return expected + 1

    def delete(self, namespace: str, key: bytes, expected: int) -> None:
        check_name(namespace, key)
        check_version(expected)
        count = 0
        if expected != ABSENT:
            count, _ = self._run(
                "delete",
                "DELETE FROM keygrid_records WHERE namespace = %s AND key = %s AND version = %s",
                (namespace, key, expected),
            )
        if count != 1:
            found = self._version(namespace, key)
            raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")

    def restore(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        check_name(namespace, key)
        check_version(version, "restored")
        if version < 1:
            raise ValueError(f"restored version must be >= 1, got {version}")
        count, _ = self._run(
            "write",
            "INSERT INTO keygrid_records (namespace, key, version, value) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (namespace, key, version, bytes(value)),
        )
        if count != 1:
            raise VersionConflict(f"{namespace}: record exists at version {self._version(namespace, key)}")

    def scan(self, namespace: str) -> Iterator[tuple[bytes, Record]]:
        check_name(namespace)
        first = self._chunk(namespace, None)  # now, so an unreachable server fails the call itself
        return self._scan(namespace, first)

    def _chunk(self, namespace: str, after: bytes | None) -> list[tuple[bytes, Record]]:
        if after is None:
            _, rows = self._run(
                "scan",
                "SELECT key, version, value FROM keygrid_records WHERE namespace = %s ORDER BY key LIMIT %s",
                (namespace, SCAN_CHUNK),
            )
        else:
            _, rows = self._run(
                "scan",
                "SELECT key, version, value FROM keygrid_records WHERE namespace = %s AND key > %s "
                "ORDER BY key LIMIT %s",
                (namespace, after, SCAN_CHUNK),
            )
        return [(bytes(k), Record(int(v), bytes(val))) for k, v, val in rows]

    def _scan(self, namespace: str, chunk: list[tuple[bytes, Record]]) -> Iterator[tuple[bytes, Record]]:
        while True:
            yield from chunk
            if len(chunk) < SCAN_CHUNK:
                return
            chunk = self._chunk(namespace, chunk[-1][0])

    def namespaces(self) -> list[str]:
        _, rows = self._run("scan", "SELECT DISTINCT namespace FROM keygrid_records ORDER BY namespace")
        return [str(row[0]) for row in rows]

    # -- change notification -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            if self.closed:
                raise StoreUnavailable(f"postgresql store {self.name} is closed")
            self._listeners.append(listener)
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._listen, name="keygrid-pg-listen", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        """The listener thread: LISTEN, deliver, and after a lost connection catch up and listen again."""
        seen: _Snapshot | None = None
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True)
                conn.execute(f"LISTEN {migrations.CHANNEL}")
                now = _snapshot(conn)  # after LISTEN: nothing falls between the two
                if seen is not None:
                    log.info("postgresql store %s: listening again", self.name)
                    for namespace, key in _differences(seen, now):
                        self._deliver(namespace, key)
                seen = now
                backoff = BACKOFF_FIRST
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=_POLL):
                        self._note(note, seen)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                log.warning(
                    "postgresql store %s: change notification lost (%s): retrying in %.1f s",
                    self.name,
                    _reason(exc),
                    backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass

    def _note(self, note: psycopg.Notify, seen: _Snapshot) -> None:
        namespace, sep, key_hex = note.payload.partition("\t")
        try:
            key = bytes.fromhex(key_hex)
        except ValueError:
            key = b""
        if not sep or not key:
            log.warning("postgresql store %s: malformed change notification ignored", self.name)
            return
        seen[(namespace, key)] = -1  # changed: compared as "unknown version" at the next catch-up
        self._deliver(namespace, key)

    def _deliver(self, namespace: str, key: bytes) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(namespace, key)
            except Exception:
                log.exception("postgresql store %s: a change listener failed", self.name)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            idle, self._idle = self._idle, []
            for conn in idle:
                self._forget(conn)
            thread = self._thread
            self._lock.notify_all()
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CONNECT_TIMEOUT + 2 * _POLL)


def _healthy(conn: psycopg.Connection[Any]) -> bool:
    """False if ``conn`` is closed, or the server has sent something on it while idle (a closing notice, EOF)."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def _snapshot(conn: psycopg.Connection[Any]) -> _Snapshot:
    rows = conn.execute("SELECT namespace, key, version FROM keygrid_records").fetchall()
    return {(str(ns), bytes(key)): int(version) for ns, key, version in rows}


def _differences(before: _Snapshot, after: _Snapshot) -> list[tuple[str, bytes]]:
    """The records added, removed or changed between two snapshots, in order."""
    changed = {name for name, version in after.items() if before.get(name) != version}
    changed.update(name for name in before if name not in after)
    return sorted(changed)
