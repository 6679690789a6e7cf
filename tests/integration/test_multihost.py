"""Two keygridd daemons sharing one software token in PostgreSQL: visibility, no lost updates, outages, moving a token.

Each test gets a fresh database (migrated) and two daemons, A and B, serving
slot 0 from the same namespace; A initialises the token from its config.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from keygridd.cli import main as cli_main
from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKR, CKU
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RW

if TYPE_CHECKING:
    from tests.integration.pg import PostgresServer


SO_PIN = b"so-Harbor-5521"
USER_PIN = b"user-Lantern-8830"
P256 = bytes.fromhex("06082a8648ce3d030107")
FAST_KDF = "argon2id: {memory_cost: 4096, iterations: 1, lanes: 1}"
VISIBLE_WITHIN = 1.0  # seconds between A's reply and B seeing the change


def config(dsn: str, *, init: bool, namespace: str = "shared") -> str:
    token = f'token: {{label: shared, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}' if init else ""
    return f"""
server: {{socket: "{{socket}}", shutdown_grace_seconds: 5}}
slots:
  - id: 0
    provider: software
    {token}
    options: {{backend: postgresql, dsn: "{dsn}", namespace: {namespace}, {FAST_KDF}}}
"""


@dataclass
class Host:
    daemon: Any
    client: Client
    session: int


@pytest.fixture
def hosts(daemon_factory: Any, pg_dsn: str) -> Iterator[tuple[Host, Host]]:
    a = daemon_factory(config(pg_dsn, init=True), name="host-a")
    b = daemon_factory(config(pg_dsn, init=False), name="host-b")
    pair: list[Host] = []
    try:
        for daemon in (a, b):
            client = Client(daemon.socket)
            session = client.C_OpenSession(0, RW)
            client.C_Login(session, CKU.USER, USER_PIN)
            pair.append(Host(daemon, client, session))
        yield pair[0], pair[1]
    finally:
        for host in pair:
            host.client.close()
        for daemon in (a, b):
            daemon.stop()


def find(host: Host, template: dict[int, Any]) -> list[int]:
    c, s = host.client, host.session
    c.C_FindObjectsInit(s, template)
    try:
        return list(c.C_FindObjects(s, 100))
    finally:
        c.C_FindObjectsFinal(s)


def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str] | None = None) -> float:
    """Seconds until ``check()`` held (polling); fails after ``timeout``, saying ``what()`` was seen."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start >= timeout:
            raise AssertionError(f"not within {timeout} s" + (f": {what()}" if what is not None else ""))
        time.sleep(0.01)
    return time.monotonic() - start


def make_signer(host: Host, label: bytes) -> tuple[int, int]:
    public, private = host.client.C_GenerateKeyPair(
        host.session, Mechanism(CKM.EC_KEY_PAIR_GEN),
        {CKA.EC_PARAMS: P256, CKA.TOKEN: True, CKA.LABEL: label},
        {CKA.TOKEN: True, CKA.LABEL: label, CKA.SENSITIVE: True, CKA.SIGN: True},
    )  # fmt: skip
    return public, private


def sign(host: Host, key: int, message: bytes) -> bytes:
    host.client.C_SignInit(host.session, Mechanism(CKM.ECDSA_SHA256), key)
    signature: bytes = host.client.C_Sign(host.session, message)
    return signature


def verify(host: Host, key: int, message: bytes, signature: bytes) -> None:
    host.client.C_VerifyInit(host.session, Mechanism(CKM.ECDSA_SHA256), key)
    host.client.C_Verify(host.session, message, signature)


def test_a_key_made_on_a_signs_on_b_and_its_destruction_reaches_b(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    public, private = make_signer(a, b"made-on-a")
    replied = time.monotonic()
    wait_until(lambda: len(find(b, {CKA.LABEL: b"made-on-a"})) == 2, timeout=5)
    delay = time.monotonic() - replied
    assert delay < VISIBLE_WITHIN, f"B saw A's key {delay:.3f} s after A's reply"

    (on_b,) = find(b, {CKA.LABEL: b"made-on-a", CKA.CLASS: CKO.PRIVATE_KEY})
    signature = sign(b, on_b, b"signed on B")
    verify(a, public, b"signed on B", signature)

    a.client.C_DestroyObject(a.session, private)
    a.client.C_DestroyObject(a.session, public)
    replied = time.monotonic()
    wait_until(lambda: find(b, {CKA.LABEL: b"made-on-a"}) == [], timeout=5)
    assert time.monotonic() - replied < VISIBLE_WITHIN
    with pytest.raises(PKCS11Error) as caught:
        sign(b, on_b, b"gone")
    assert caught.value.rv in (CKR.OBJECT_HANDLE_INVALID, CKR.KEY_HANDLE_INVALID)


def record_version(postgres: PostgresServer, dsn: str) -> int:
    rows = postgres.execute(
        dsn, "SELECT version FROM keygrid_records WHERE namespace = 'shared' AND key <> 'meta'::bytea"
    )
    assert len(rows) == 1
    return int(rows[0][0])  # type: ignore[call-overload]


def test_concurrent_label_writes_never_lose_an_update(
    hosts: tuple[Host, Host], postgres: PostgresServer, pg_dsn: str
) -> None:
    a, b = hosts
    template = {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: bytes(range(32)), CKA.TOKEN: True,
                CKA.ID: b"contended", CKA.LABEL: b"start"}  # fmt: skip
    a.client.C_CreateObject(a.session, template)
    wait_until(lambda: len(find(b, {CKA.ID: b"contended"})) == 1, timeout=5)
    (ha,) = find(a, {CKA.ID: b"contended"})
    (hb,) = find(b, {CKA.ID: b"contended"})

    def label(host: Host, handle: int) -> bytes:
        value: bytes = host.client.C_GetAttributeValue(host.session, handle, [CKA.LABEL])[0]
        return value

    rounds, both_succeeded, one_failed, slowest = 40, 0, 0, 0.0
    for i in range(rounds):
        before = record_version(postgres, pg_dsn)
        barrier = threading.Barrier(2)
        outcome: dict[str, int] = {}
        wanted = {"A": b"A-%d" % i, "B": b"B-%d" % i}

        def write(
            name: str, host: Host, handle: int, barrier: threading.Barrier = barrier, outcome: dict[str, int] = outcome,
            wanted: dict[str, bytes] = wanted,
        ) -> None:  # fmt: skip
            barrier.wait()
            try:
                host.client.C_SetAttributeValue(host.session, handle, {CKA.LABEL: wanted[name]})
                outcome[name] = CKR.OK
            except PKCS11Error as exc:
                outcome[name] = exc.rv

        threads = [threading.Thread(target=write, args=args) for args in (("A", a, ha), ("B", b, hb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [name for name, rv in outcome.items() if rv == CKR.OK]
        failed = {name: rv for name, rv in outcome.items() if rv != CKR.OK}
        assert len(outcome) == 2
        assert set(failed.values()) <= {CKR.FUNCTION_FAILED}, f"round {i}: {outcome}"
        assert winners, f"round {i}: both writes failed"
        # No lost update: the record moved by exactly one version per successful write.
        assert record_version(postgres, pg_dsn) == before + len(winners), f"round {i}: {outcome}"
        if len(winners) == 1:
            one_failed += 1
            final = wanted[winners[0]]
        else:
            both_succeeded += 1
            # Sequential: the second writer had seen the first write. Which one came second is not known
            # here, so wait for both daemons to agree, then that value must be one of the two writes.
            wait_until(lambda: label(a, ha) == label(b, hb), timeout=5.0)
            final = label(a, ha)
            assert final in wanted.values(), f"round {i}: {final!r}"
        # Both daemons converge on the last successful write (within a second on an idle machine; the
        # bound is looser here because 40 rounds on a busy 2-core CI machine see scheduling stalls).
        converged = wait_until(
            lambda final=final: label(a, ha) == final and label(b, hb) == final,
            timeout=5.0,
            what=lambda final=final, i=i, outcome=outcome: (
                f"round {i}: {outcome}, want {final!r}, A {label(a, ha)!r}, B {label(b, hb)!r}"
            ),
        )
        slowest = max(slowest, converged)
    assert both_succeeded + one_failed == rounds
    assert slowest < 5.0


def test_postgresql_restart_under_load(hosts: tuple[Host, Host], postgres: PostgresServer, pg_dsn: str) -> None:
    a, b = hosts
    handles: dict[str, int] = {}
    for name, host in (("A", a), ("B", b)):
        handles[name] = host.client.C_CreateObject(
            host.session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.LABEL: b"load-" + name.encode()}
        )
    stop = threading.Event()
    results: dict[str, list[tuple[float, float, int]]] = {"A": [], "B": []}  # (start, duration, rv)

    def load(name: str, host: Host) -> None:
        # A second connection of its own: the load never shares a session with the test's checks.
        with Client(host.daemon.socket) as c:
            s = c.C_OpenSession(0, RW)
            c.C_Login(s, CKU.USER, USER_PIN)
            (handle,) = _find(c, s, {CKA.LABEL: b"load-" + name.encode()})
            i = 0
            while not stop.is_set():
                start = time.monotonic()
                try:
                    c.C_SetAttributeValue(s, handle, {CKA.APPLICATION: b"%d" % i})
                    rv = CKR.OK
                except PKCS11Error as exc:
                    rv = exc.rv
                results[name].append((start, time.monotonic() - start, rv))
                i += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(n, h)) for n, h in (("A", a), ("B", b))]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        postgres.stop()
        down = time.monotonic()
        try:
            time.sleep(2.0)
        finally:
            restarting = time.monotonic()  # the server may answer before pg_ctl start returns
            postgres.start()
        up = time.monotonic()
        # Both recover by themselves: every daemon writes successfully again soon after.
        for name in ("A", "B"):
            wait_until(lambda name=name: any(s > up and rv == CKR.OK for s, _, rv in results[name]), timeout=20)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    for name in ("A", "B"):
        during = [rv for s, d, rv in results[name] if s > down and s + d < restarting]
        assert during and set(during) == {CKR.DEVICE_ERROR}, f"{name}: {sorted(set(during))}"
        assert max(d for _, d, _ in results[name]) < 10, f"{name}: a call hung"
        assert all(rv in (CKR.OK, CKR.DEVICE_ERROR, CKR.FUNCTION_FAILED) for _, _, rv in results[name])
        assert any(rv == CKR.OK for s, _, rv in results[name] if s < down)
    assert a.daemon.process.poll() is None and b.daemon.process.poll() is None
    # The daemons still see each other's changes after the outage.
    make_signer(a, b"after-outage")
    replied = time.monotonic()
    wait_until(lambda: len(find(b, {CKA.LABEL: b"after-outage"})) == 2, timeout=10)
    assert time.monotonic() - replied < VISIBLE_WITHIN


def _find(c: Client, s: int, template: dict[int, Any]) -> list[int]:
    c.C_FindObjectsInit(s, template)
    try:
        return list(c.C_FindObjects(s, 100))
    finally:
        c.C_FindObjectsFinal(s)


def test_token_moved_from_lmdb_to_postgresql(
    daemon_factory: Any, pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lmdb_text = f"""
server: {{socket: "{{socket}}", shutdown_grace_seconds: 5}}
slots:
  - id: 0
    provider: software
    token: {{label: moving, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
    options: {{backend: lmdb, path: "{tmp_path / "lmdb"}", {FAST_KDF}}}
"""
    source = daemon_factory(lmdb_text, name="lmdb-source")
    with Client(source.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        make_signer(Host(source, c, s), b"moved-key")
    source.stop()

    export = tmp_path / "token.export"
    assert cli_main(["token", "export", "--config", source.config_path, "--slot", "0", str(export)]) == 0
    target_config = tmp_path / "target.yaml"
    target_config.write_text(config(pg_dsn, init=False, namespace="moved").replace("{socket}", str(tmp_path / "t")))
    assert cli_main(["token", "import", "--config", str(target_config), "--slot", "0", str(export)]) == 0, (
        capsys.readouterr().err
    )

    target = daemon_factory(config(pg_dsn, init=False, namespace="moved"), name="pg-target")
    with Client(target.socket) as c:
        assert c.C_GetTokenInfo(0)["label"] == "moving"
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        host = Host(target, c, s)
        (private,) = find(host, {CKA.LABEL: b"moved-key", CKA.CLASS: CKO.PRIVATE_KEY})
        (public,) = find(host, {CKA.LABEL: b"moved-key", CKA.CLASS: CKO.PUBLIC_KEY})
        verify(host, public, b"moved", sign(host, private, b"moved"))
    target.stop()
