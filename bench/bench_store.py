"""Software token benchmark: how its cost grows with the number of objects, per backend.

For each backend (lmdb, filesystem, postgresql: a throw-away server in a
temporary directory, as the tests start it, or ``--dsn``) one run prints:
C_Login time with the default Argon2id cost; token objects created per second
through keygridd (durable writes); C_FindObjects by label per second with
1,000 and with 100,000 objects in the token, and the ratio (the index keeps
it flat); ECDSA P-256 signatures per second with a token key beside a session
key (decrypted keys are cached while logged in). The 99,000 extra objects are
written straight into the store (sealed as keygridd would, without fsync)
while the daemon is stopped, so the run takes minutes, not hours.

Then ``bench_pkcs11.py --provider software`` runs ECDSA P-256 through the
PKCS#11 module on the software token beside SoftHSM2.

Run: python bench/bench_store.py [--objects 100000] [--seconds 2] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SO_PIN, USER_PIN = "bench-so-pin-1", "bench-user-pin-1"
P256 = bytes.fromhex("06082a8648ce3d030107")
SMALL = 1_000


def config(socket: str, backend: str, location: str) -> str:
    where = f"dsn: '{location}'" if backend == "postgresql" else f"path: '{location}'"
    return f"""
server: {{socket: '{socket}'}}
slots:
  - id: 0
    provider: software
    token: {{label: bench, so_pin: '{SO_PIN}', user_pin: '{USER_PIN}'}}
    options: {{backend: {backend}, {where}, namespace: bench}}
"""


@contextlib.contextmanager
def daemon(directory: Path, backend: str, location: str) -> Iterator[str]:
    from keygridd.client import Client

    socket = str(directory / "kg.sock")
    path = directory / "keygrid.yaml"
    path.write_text(config(socket, backend, location))
    from bench_rpc import keygridd_command  # as installed, or the compiled wheel's (KEYGRIDD_COMPILED)

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRID_")}
    with open(directory / "keygridd.log", "ab") as log:
        process = subprocess.Popen([*keygridd_command(env), "--config", str(path)], stdout=log, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                Client(socket, timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"keygridd did not start: see {directory / 'keygridd.log'}") from None
                time.sleep(0.05)
        yield socket
    finally:
        process.terminate()
        process.wait(30)


def rate(fn: Any, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        count += 1
    return count / elapsed


def session(client: Any) -> int:
    from keygridd.pkcs11 import CKU
    from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION

    s: int = client.C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION)
    client.C_Login(s, CKU.USER, USER_PIN.encode())
    return s


def finds_per_second(socket: str, count: int, seconds: float) -> float:
    from keygridd.client import Client
    from keygridd.pkcs11 import CKA

    with Client(socket) as c:
        s = session(c)
        labels = [f"object-{i}".encode() for i in range(0, count, max(1, count // 97))]
        state = {"i": 0}

        def find() -> None:
            label = labels[state["i"] % len(labels)]
            state["i"] += 1
            c.C_FindObjectsInit(s, {CKA.LABEL: label})
            assert len(c.C_FindObjects(s, 10)) == 1
            c.C_FindObjectsFinal(s)

        return rate(find, seconds)


def fill(backend: str, location: str, start: int, stop: int) -> None:
    """Write objects start..stop-1 straight into the store, sealed, without fsync."""
    from keygridd.pkcs11 import CKA, CKO, CKU
    from keygridd.providers.software import SoftwareOptions, SoftwareStore
    from keygridd.storage.filesystem import FilesystemStore
    from keygridd.storage.lmdb import LmdbStore

    raw: Any
    if backend == "lmdb":
        raw = LmdbStore(location, durable=False)
    elif backend == "filesystem":
        raw = FilesystemStore(location, durable=False)
    else:
        from keygridd.storage.postgres import PostgresStore

        raw = PostgresStore(location)
    options = SoftwareOptions(backend=backend, path=None if backend == "postgresql" else location, dsn=location)  # type: ignore[arg-type]
    store = SoftwareStore(raw, "bench", options)
    store.check_pin(CKU.USER, USER_PIN.encode())
    for i in range(start, stop):
        label = f"object-{i}".encode()
        store.put_object(
            secrets.token_bytes(16),
            {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: False, CKA.LABEL: label, CKA.VALUE: label},
        )
    store.close()
    raw.close()


def measure(backend: str, location: str, directory: Path, total: int, seconds: float) -> dict[str, float]:
    from keygridd.client import Client
    from keygridd.pkcs11 import CKA, CKM, CKO, CKU
    from keygridd.pkcs11.params import Mechanism

    out: dict[str, float] = {}
    with daemon(directory, backend, location) as socket:
        logins = []
        for _ in range(3):
            with Client(socket) as c:
                s = c.C_OpenSession(0, 6)
                start = time.perf_counter()
                c.C_Login(s, CKU.USER, USER_PIN.encode())
                logins.append(time.perf_counter() - start)
        out["login_s"] = min(logins)
        with Client(socket) as c:
            s = session(c)
            start = time.perf_counter()
            for i in range(SMALL):
                label = f"object-{i}".encode()
                c.C_CreateObject(s, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.LABEL: label, CKA.VALUE: label})
            out["create_per_s"] = SMALL / (time.perf_counter() - start)
            ecdsa = Mechanism(CKM.ECDSA)
            keys = {}
            for where, token in (("token", True), ("session", False)):
                _, keys[where] = c.C_GenerateKeyPair(
                    s, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256, CKA.TOKEN: token}, {CKA.TOKEN: token}
                )
            for where, key in keys.items():

                def sign(key: int = key) -> None:
                    c.C_SignInit(s, ecdsa, key)
                    c.C_Sign(s, b"\x01" * 32)

                out[f"sign_{where}_per_s"] = rate(sign, seconds)
        out["find_small_per_s"] = finds_per_second(socket, SMALL, seconds)
    fill(backend, location, SMALL, total)
    with daemon(directory, backend, location) as socket:
        out["find_large_per_s"] = finds_per_second(socket, total, seconds)
    return out


@contextlib.contextmanager
def postgresql(dsn: str | None) -> Iterator[str]:
    """``dsn``, or a migrated database on a temporary server (the tests' helper; fsync off)."""
    import psycopg

    from keygridd.storage import migrations

    if dsn:
        yield dsn
        return
    sys.path.insert(0, str(REPO))
    from tests.integration.pg import start_server

    server = start_server()
    try:
        database = server.database("bench")
        with psycopg.connect(database, autocommit=True) as conn:
            migrations.migrate(conn)
        yield database
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000, help="objects in the large token (default 100000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per figure (default 2)")
    parser.add_argument("--dsn", help="measure the postgresql backend on this (empty) database, not a temporary server")
    parser.add_argument("--no-pkcs11", action="store_true", help="skip the PKCS#11 comparison with SoftHSM2")
    args = parser.parse_args(argv)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="keygrid-bench-store-") as tmp, postgresql(args.dsn) as dsn:
        for backend in ("lmdb", "filesystem", "postgresql"):
            directory = Path(tmp) / backend
            directory.mkdir()
            location = dsn if backend == "postgresql" else str(directory / "store")
            rows.append((backend, measure(backend, location, directory, args.objects, args.seconds)))
    print(f"Software token benchmark: {args.seconds:g} s per figure, {os.cpu_count()} CPUs, {args.objects:,} objects")
    print()
    header = (
        "backend     C_Login s  created/s  find/s@1k  find/s@{n}  ratio  sign token/s  sign session/s  ratio"
    ).format(n=f"{args.objects // 1000}k")
    print(header)
    print("-" * len(header))
    for backend, r in rows:
        print(
            f"{backend:<10}  {r['login_s']:>9.2f}  {r['create_per_s']:>9,.0f}  {r['find_small_per_s']:>9,.0f}"
            f"  {r['find_large_per_s']:>10,.0f}  {r['find_large_per_s'] / r['find_small_per_s']:>5.2f}"
            f"  {r['sign_token_per_s']:>12,.0f}  {r['sign_session_per_s']:>14,.0f}"
            f"  {r['sign_token_per_s'] / r['sign_session_per_s']:>5.2f}"
        )
    print()
    print("targets: find at 100k >= 0.8 x find at 1k; C_Login < 0.5 s; token-key sign ~ session-key sign")
    if not args.no_pkcs11:
        print()
        sys.stdout.flush()
        command = [sys.executable, str(REPO / "bench" / "bench_pkcs11.py"), "--provider", "software"]
        command += ["--ops", "ecdsa-p256-sign", "--seconds", str(args.seconds)]
        return subprocess.call(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
