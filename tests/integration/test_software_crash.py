"""Crash safety of the software token: keygridd killed with SIGKILL while it creates token objects.

For each backend, a daemon is killed at a random moment 50 times while a
client creates private token objects as fast as it can. After every restart,
each object whose creation returned CKR_OK is there, decrypts and reads back,
and the store opened without repair (the daemon started and served).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKO, CKU
from tests.conformance.conftest import RW

pytestmark = pytest.mark.slow

KILLS = 50
SO_PIN, USER_PIN = "crash-so-1234", "crash-user-5678"


def config(backend: str, path: Path) -> str:
    return f"""
server: {{socket: "{{socket}}"}}
slots:
  - id: 0
    provider: software
    token: {{label: crash, so_pin: "{SO_PIN}", user_pin: "{USER_PIN}"}}
    options:
      backend: {backend}
      path: "{path}"
      kdf: scrypt
      scrypt: {{log2_n: 12}}
"""


def create_until_killed(socket: str, acknowledged: list[bytes], stop: threading.Event) -> None:
    try:
        with Client(socket, timeout=10) as c:
            s = c.C_OpenSession(0, RW)
            c.C_Login(s, CKU.USER, USER_PIN.encode())
            n = 0
            while not stop.is_set():
                label = f"obj-{len(acknowledged)}-{n}-{random.random()}".encode()
                c.C_CreateObject(
                    s, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: True, CKA.LABEL: label, CKA.VALUE: label}
                )
                acknowledged.append(label)  # only after the daemon answered CKR_OK
                n += 1
    except Exception:
        pass  # the daemon was killed under us


def verify(socket: str, expected: list[bytes]) -> None:
    with Client(socket, timeout=30) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN.encode())
        c.C_FindObjectsInit(s, {CKA.CLASS: CKO.DATA})
        handles = c.C_FindObjects(s, 1_000_000)
        c.C_FindObjectsFinal(s)
        found = {bytes(v[0]): v[1] for v in (c.C_GetAttributeValue(s, h, [CKA.LABEL, CKA.VALUE]) for h in handles)}
    missing = [label for label in expected if label not in found]
    assert not missing, f"{len(missing)} acknowledged objects lost, e.g. {missing[:3]}"
    assert all(found[label] == label for label in expected)


@pytest.mark.parametrize("backend", ["lmdb", "filesystem"])
def test_kill_during_creation_loses_nothing_acknowledged(daemon_factory: Any, tmp_path: Path, backend: str) -> None:
    text = config(backend, tmp_path / "store")
    acknowledged: list[bytes] = []
    rng = random.Random(4711)
    for round_ in range(KILLS):
        running = daemon_factory(text, name=f"crash-{backend}-{round_}")
        verify(running.socket, acknowledged)
        stop = threading.Event()
        worker = threading.Thread(target=create_until_killed, args=(running.socket, acknowledged, stop))
        worker.start()
        time.sleep(rng.uniform(0.05, 0.4))
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(10)
        stop.set()
        worker.join(15)
        assert not worker.is_alive()
    final = daemon_factory(text, name=f"crash-{backend}-final")
    verify(final.socket, acknowledged)
    assert len(acknowledged) > KILLS  # the kills really interrupted a stream of creations
    final.stop()
