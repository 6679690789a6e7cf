"""Plaintext keys and PINs never reach the daemon's log or its error messages."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKU
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.params import GcmParams, Mechanism
from tests.conformance.conftest import RW
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens, worker_pids

SO_PIN = b"so-SECRET-4711"
USER_PIN = b"user-SECRET-0815"
KEY = bytes.fromhex("8f3a2b1c0d9e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a")


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could leak into text: raw, hex, base64, Python repr."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        repr(secret).encode(),
    ]


def test_no_secrets_in_logs_or_messages(daemon_factory: Any, tmp_path: Path) -> None:
    config = f"""
server: {{socket: "{{socket}}"}}
logging: {{level: debug}}
slots:
  - id: 0
    provider: memory
    options: {{persist: "{tmp_path / "store"}"}}
    token: {{label: secrets, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
"""
    check_secret_flow(daemon_factory(config, name="secrets"))


@pytest.mark.softhsm
def test_no_secrets_from_a_pkcs11_slot_or_its_worker(daemon_factory: Any, tmp_path: Path) -> None:
    """The same through the pkcs11 provider: the daemon, its worker process (whose stderr is the
    daemon's) and the messages stay clean, across a worker restart that logs the module in again."""
    conf = softhsm_tokens(tmp_path, ["secrets"], SO_PIN, USER_PIN)["SOFTHSM2_CONF"]
    config = f"""
server: {{socket: "{{socket}}"}}
logging: {{level: debug}}
slots:
  - id: 0
    provider: pkcs11
    options: {{module: {SOFTHSM_MODULE}, token_label: secrets, environment: {{SOFTHSM2_CONF: "{conf}"}}}}
"""
    running = daemon_factory(config, name="secrets-pkcs11")

    def restart_worker(client: Client, session: int) -> None:
        for pid in worker_pids(running.process.pid):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:  # the next call runs in a new worker, logged in again with the PIN it holds
            try:
                client.C_GenerateRandom(session, 4)
                return
            except PKCS11Error:
                assert time.monotonic() < deadline
                time.sleep(0.1)

    check_secret_flow(running, restart_worker)


def check_secret_flow(running: Any, midway: Callable[[Client, int], None] | None = None) -> None:
    messages: list[str] = []
    with Client(running.socket) as c:
        s = c.C_OpenSession(0, RW)
        for pin in (b"wrong-" + USER_PIN, USER_PIN):
            rv, _ = c.call_raw("C_Login", s, CKU.USER, pin)
        key = c.C_CreateObject(
            s, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: KEY, CKA.TOKEN: True, CKA.LABEL: b"k"}
        )
        if midway is not None:
            midway(c, s)
        c.C_EncryptInit(s, Mechanism(CKM.AES_GCM, GcmParams(iv=b"\x00" * 12)), key)
        ciphertext = c.C_Encrypt(s, b"hello")
        # Failures that handle the key or PINs, each with its message collected.
        failing = [
            ("C_DecryptInit", s, Mechanism(CKM.AES_GCM, GcmParams(iv=b"\x01" * 12)), key),
            ("C_Decrypt", s, ciphertext, None),
            ("C_SetPIN", s, b"bad-" + USER_PIN, USER_PIN),
            ("C_CreateObject", s, [(CKA.CLASS, CKO.SECRET_KEY), (CKA.KEY_TYPE, CKK.AES), (CKA.VALUE, KEY[:7])]),
            ("C_CreateObject", s, [(CKA.CLASS, CKO.SECRET_KEY), (CKA.KEY_TYPE, CKK.RSA), (CKA.VALUE, KEY)]),
            ("C_SetAttributeValue", s, key, [(CKA.VALUE, KEY)]),
            ("C_EncryptInit", s, Mechanism(CKM.AES_GCM, KEY), key),
            ("C_GetAttributeValue", s, key, [CKA.VALUE]),
            ("C_Login", s, CKU.SO, SO_PIN),
        ]
        for name, *args in failing:
            msgid, frame = c._proto.request(name, args)
            rv, (result, message) = c._roundtrip(name, msgid, frame)
            # KeyGrid's own token refuses each of these; a module (SoftHSM2) may accept some.
            assert rv != 0 or name == "C_DecryptInit" or midway is not None, name
            messages.append(f"{name}: {message} {result!r}")
        c.C_Logout(s)
        c.C_Login(s, CKU.SO, SO_PIN)
        c.C_InitPIN(s, USER_PIN)
    running.stop()
    log = Path(running.log_path).read_bytes()
    assert b"DEBUG" in log or b"INFO" in log  # the log was written
    text = "\n".join(messages).encode()
    for secret in (KEY, SO_PIN, USER_PIN):
        for form in forms(secret):
            assert form not in log, f"a secret reached the log: {form!r}"
            assert form not in text, f"a secret reached an error message: {form!r}"
