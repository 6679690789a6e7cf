"""C_InitToken, C_InitPIN, C_SetPIN on a token of its own (v2.40 Base 5.5)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKO, CKR, CKU, TokenFlag
from tests.conformance.conftest import DOORS, RW, ckr

CONFIG = """
server:
  socket: {socket}
slots:
  - id: 3
    provider: memory
    description: fresh
"""


@pytest.fixture(params=sorted(DOORS))
def fresh(request: pytest.FixtureRequest, daemon_factory: Any) -> Iterator[Any]:
    running = daemon_factory(CONFIG, name="tokens")
    conn = DOORS[request.param](running.socket)
    yield conn
    conn.close()
    running.stop()


def test_token_lifecycle(fresh: Any) -> None:
    p11 = fresh
    with ckr(CKR.PIN_LEN_RANGE):
        p11.C_InitToken(3, b"12", b"x")
    p11.C_InitToken(3, b"so-secret", b"My Token")
    info = p11.C_GetTokenInfo(3)
    assert info["label"] == "My Token"
    assert info["flags"] & TokenFlag.TOKEN_INITIALIZED
    assert not info["flags"] & TokenFlag.USER_PIN_INITIALIZED
    s = p11.C_OpenSession(3, RW)
    with ckr(CKR.USER_PIN_NOT_INITIALIZED):
        p11.C_Login(s, CKU.USER, b"whatever")
    with ckr(CKR.USER_NOT_LOGGED_IN):
        p11.C_InitPIN(s, b"user-1234")
    with ckr(CKR.SESSION_EXISTS):
        p11.C_InitToken(3, b"so-secret", b"again")
    p11.C_Login(s, CKU.SO, b"so-secret")
    p11.C_InitPIN(s, b"user-1234")
    p11.C_Logout(s)
    p11.C_Login(s, CKU.USER, b"user-1234")
    p11.C_SetPIN(s, b"user-1234", b"user-5678")
    with ckr(CKR.PIN_INCORRECT):
        p11.C_SetPIN(s, b"user-1234", b"user-0000")
    p11.C_CreateObject(s, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.LABEL: b"kept"})
    p11.C_Logout(s)
    p11.C_Login(s, CKU.USER, b"user-5678")
    p11.C_CloseSession(s)
    # Re-initialisation needs the SO PIN and wipes the objects.
    with ckr(CKR.PIN_INCORRECT):
        p11.C_InitToken(3, b"not-the-so", b"x")
    p11.C_InitToken(3, b"so-secret", b"Wiped")
    s = p11.C_OpenSession(3, RW)
    p11.C_FindObjectsInit(s, {})
    assert p11.C_FindObjects(s, 10) == []
    p11.C_FindObjectsFinal(s)


def test_pin_lockout_and_so_reset(daemon_factory: Any) -> None:
    running = daemon_factory(
        CONFIG.replace("description: fresh", "description: fresh\n    options: {max_pin_failures: 3}"), name="lock"
    )
    with Client(running.socket) as p11:
        p11.C_InitToken(3, b"so-secret", b"Lock")
        s = p11.C_OpenSession(3, RW)
        p11.C_Login(s, CKU.SO, b"so-secret")
        p11.C_InitPIN(s, b"good-pin")
        p11.C_Logout(s)
        with ckr(CKR.PIN_INCORRECT):
            p11.C_Login(s, CKU.USER, b"bad-pin")
        assert p11.C_GetTokenInfo(3)["flags"] & TokenFlag.USER_PIN_COUNT_LOW
        with ckr(CKR.PIN_INCORRECT):
            p11.C_Login(s, CKU.USER, b"bad-pin")
        assert p11.C_GetTokenInfo(3)["flags"] & TokenFlag.USER_PIN_FINAL_TRY
        with ckr(CKR.PIN_INCORRECT):
            p11.C_Login(s, CKU.USER, b"bad-pin")
        assert p11.C_GetTokenInfo(3)["flags"] & TokenFlag.USER_PIN_LOCKED
        with ckr(CKR.PIN_LOCKED):
            p11.C_Login(s, CKU.USER, b"good-pin")  # even the right PIN
        p11.C_Login(s, CKU.SO, b"so-secret")
        p11.C_InitPIN(s, b"new-pin-1")
        p11.C_Logout(s)
        p11.C_Login(s, CKU.USER, b"new-pin-1")
    running.stop()


def test_wrong_pins_are_throttled_per_peer(daemon_factory: Any) -> None:
    running = daemon_factory(CONFIG, name="throttle")
    with Client(running.socket) as p11:
        p11.C_InitToken(3, b"so-secret", b"Throttle")
        s = p11.C_OpenSession(3, RW)
        p11.C_Login(s, CKU.SO, b"so-secret")
        p11.C_InitPIN(s, b"good-pin")
        p11.C_Logout(s)
        durations = []
        for _ in range(4):
            start = time.monotonic()
            with ckr(CKR.PIN_INCORRECT):
                p11.C_Login(s, CKU.USER, b"bad-pin")
            durations.append(time.monotonic() - start)
        # The delay before each check doubles: 0, 0.1, 0.2, 0.4 s (plus the KDF itself).
        assert durations[3] >= 0.4 and durations[2] >= 0.2 and durations[1] >= 0.1
        start = time.monotonic()
        p11.C_Login(s, CKU.USER, b"good-pin")  # the right PIN still works, after the delay
        assert time.monotonic() - start >= 0.8
    running.stop()
