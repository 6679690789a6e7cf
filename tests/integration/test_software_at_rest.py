"""Encryption at rest: no backend's raw bytes hold a token key or a PIN.

For each backend a daemon stores a known AES key (imported, so its value is
known), a private EC key it generates, and uses known PINs (SetPIN included);
then every byte the backend holds (the LMDB files, the record files, the
PostgreSQL rows) is searched for the key, the EC private scalar and the PINs,
raw and hex-encoded.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import psycopg
import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKU
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RW

SO_PIN = b"rest-SO-pin-9231"
USER_PIN = b"rest-user-pin-5528"
NEW_PIN = b"rest-new-pin-7719"
AES_KEY = bytes.fromhex("5c1b7e0f9d2a4c6e8b3f1a7d9e5c2b4a6f8d0e2c4a6b8d0f1e3c5a7b9d1f3e5a")
P256 = bytes.fromhex("06082a8648ce3d030107")


def forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def config(backend: str, location: str) -> str:
    where = f"dsn: '{location}'" if backend == "postgresql" else f"path: '{location}'"
    return f"""
server: {{socket: "{{socket}}"}}
slots:
  - id: 0
    provider: software
    token: {{label: rest, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
    options: {{backend: {backend}, {where}, kdf: scrypt, scrypt: {{log2_n: 12}}}}
"""


def files_of(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def rows_of(dsn: str) -> bytes:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT namespace, key, value FROM keygrid_records").fetchall()
    return b"".join(ns.encode() + bytes(key) + bytes(value) for ns, key, value in rows)


@pytest.mark.parametrize("backend", ["lmdb", "filesystem", "postgresql"])
def test_no_key_or_pin_in_the_backend(daemon_factory: Any, tmp_path: Path, backend: str, request: Any) -> None:
    location = request.getfixturevalue("pg_dsn") if backend == "postgresql" else str(tmp_path / "store")
    running = daemon_factory(config(backend, location), name=f"rest-{backend}")
    with Client(running.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        c.C_CreateObject(
            s, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.TOKEN: True, CKA.VALUE: AES_KEY,
                CKA.SENSITIVE: False, CKA.EXTRACTABLE: True, CKA.LABEL: b"known"},
        )  # fmt: skip
        _, private = c.C_GenerateKeyPair(
            s, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256, CKA.TOKEN: True},
            {CKA.TOKEN: True, CKA.SENSITIVE: False, CKA.EXTRACTABLE: True, CKA.PRIVATE: False},
        )  # fmt: skip
        (scalar,) = c.C_GetAttributeValue(s, private, [CKA.VALUE])  # readable: made non-sensitive for this test
        assert isinstance(scalar, bytes) and len(scalar) >= 30
        c.C_SetPIN(s, USER_PIN, NEW_PIN)
    running.stop()
    stored = rows_of(location) if backend == "postgresql" else files_of(Path(location))
    assert b"rest" in stored or len(stored) > 1000  # the search sees the backend's bytes
    for secret in (AES_KEY, scalar, SO_PIN, USER_PIN, NEW_PIN):
        for form in forms(secret):
            assert form not in stored, f"{backend}: a secret is stored in the clear ({form[:12]!r}...)"
