"""A real PostgreSQL for tests: a throw-away cluster in a temporary directory, on a Unix socket only.

The root conftest loads this as a plugin (``pytest_plugins = ["tests.integration.pg"]``),
so the session-scoped ``postgres`` fixture is one server for the whole run.
``postgres.database()`` makes a fresh database per test and returns its DSN.

The binaries come from Debian's ``postgresql`` package (``make deps``), found
under ``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as
root: as root, the cluster belongs to the ``postgres`` user and ``initdb`` /
``pg_ctl`` run through ``runuser``. Trust authentication, no TCP listener,
``fsync=off`` (nothing here survives a machine crash anyway). If the server
cannot be started the tests fail: CI installs PostgreSQL.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

PG_USER = "postgres"


def find_bindir() -> str:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding pg_ctl (or pg_ctl's directory on PATH)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl): run 'make deps'", pytrace=False)


@dataclass
class PostgresServer:
    bindir: str
    root: str
    as_user: list[str] = field(default_factory=list)  # prefix that runs a command as the cluster's owner
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def sockdir(self) -> str:
        return os.path.join(self.root, "sock")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "postgres.log")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.sockdir} port=5432 user={PG_USER} dbname={dbname}"

    def _run(self, *argv: str, timeout: float = 90) -> None:
        # Output to a file, not a pipe: the server pg_ctl starts inherits it and would hold a pipe open.
        command = [*self.as_user, os.path.join(self.bindir, argv[0]), *argv[1:]]
        out = os.path.join(self.root, "commands.log")
        with open(out, "ab") as sink:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        if done.returncode != 0:
            tail = Path(out).read_text(errors="replace")[-2000:]
            log = Path(self.logfile).read_text(errors="replace")[-4000:] if os.path.exists(self.logfile) else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {tail}\n{log}")

    def init(self) -> None:
        self._run("initdb", "-D", self.datadir, "-A", "trust", "-U", PG_USER, "--no-sync", "-E", "UTF8")

    @property
    def _options(self) -> str:
        return f"-c listen_addresses='' -c unix_socket_directories={self.sockdir} -c fsync=off -c max_connections=200"

    def start(self) -> None:
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "-o", self._options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, the server is back when it returns."""
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-m", "fast", "-w", "-t", "60", "-o",
                  self._options, "restart")  # fmt: skip

    def running(self) -> bool:
        command = [*self.as_user, os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "status"]
        return subprocess.run(command, capture_output=True, check=False).returncode == 0

    def database(self, prefix: str = "kg") -> str:
        """A new, empty database; returns its DSN."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # a name we made
        return self.dsn(name)

    def execute(self, dsn: str, query: str) -> list[tuple[object, ...]]:
        """Run one statement on the database ``dsn`` (test set-up and inspection)."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []


def start_server() -> PostgresServer:
    bindir = find_bindir()
    root = tempfile.mkdtemp(prefix="kg-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(PG_USER)
        except KeyError:
            pytest.fail(f"PostgreSQL refuses to run as root and there is no {PG_USER!r} user", pytrace=False)
        os.chmod(root, 0o755)
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", PG_USER, "--"]
    server = PostgresServer(bindir, root, as_user)
    os.makedirs(server.sockdir)
    os.makedirs(server.datadir, mode=0o700)
    if as_user:
        for path in (server.sockdir, server.datadir):
            os.chown(path, pwd.getpwnam(PG_USER).pw_uid, pwd.getpwnam(PG_USER).pw_gid)
    try:
        server.init()
        server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"cannot start PostgreSQL from {bindir}: {exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session (a fresh database per test: ``postgres.database()``)."""
    server = start_server()
    try:
        yield server
    finally:
        if server.running():
            try:
                server.stop()
            except RuntimeError:
                subprocess.run([*server.as_user, os.path.join(server.bindir, "pg_ctl"), "-D", server.datadir,
                                "-m", "immediate", "stop"], capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """A fresh database with the current schema (``keygrid db migrate`` applied)."""
    from keygridd.storage import migrations

    dsn = postgres.database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
    return dsn
