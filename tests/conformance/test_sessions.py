"""Slots, tokens, sessions and login (PKCS#11 v2.40 Base 5.4-5.6)."""

from __future__ import annotations

from typing import Any

from keygridd.client import Client
from keygridd.pkcs11 import CKM, CKR, CKS, CKU, TokenFlag
from keygridd.pkcs11._constants import CKF_DONT_BLOCK
from tests.conformance.conftest import RO, RW, ckr


def test_get_info(p11: Any) -> None:
    info = p11.C_GetInfo()
    assert info["cryptoki_version"] == [2, 40]
    assert info["manufacturer_id"] == "KeyGrid"


def test_slot_list_hides_slots_of_other_peers(p11: Any) -> None:
    assert p11.C_GetSlotList(False) == [0, 1]
    assert p11.C_GetSlotList(True) == [0, 1]
    with ckr(CKR.SLOT_ID_INVALID):
        p11.C_GetSlotInfo(7)
    with ckr(CKR.SLOT_ID_INVALID):
        p11.C_GetTokenInfo(99)


def test_slot_and_token_info(p11: Any) -> None:
    slot = p11.C_GetSlotInfo(0)
    assert slot["slot_description"] == "conformance slot"
    assert slot["flags"] & 1  # CKF_TOKEN_PRESENT
    token = p11.C_GetTokenInfo(0)
    assert token["label"] == "conformance"
    flags = TokenFlag(token["flags"])
    assert TokenFlag.TOKEN_INITIALIZED in flags and TokenFlag.USER_PIN_INITIALIZED in flags
    assert TokenFlag.LOGIN_REQUIRED in flags and TokenFlag.RNG in flags
    assert len(token["utc_time"]) == 16
    blank = p11.C_GetTokenInfo(1)
    assert not blank["flags"] & TokenFlag.TOKEN_INITIALIZED


def test_mechanism_list_and_info(p11: Any) -> None:
    mechs = p11.C_GetMechanismList(0)
    for m in (CKM.ECDSA, CKM.RSA_PKCS_PSS, CKM.AES_GCM, CKM.EDDSA, CKM.SHA256_HMAC, CKM.SHA3_256):
        assert m in mechs
    info = p11.C_GetMechanismInfo(0, CKM.RSA_PKCS_KEY_PAIR_GEN)
    assert (info["min_key_size"], info["max_key_size"]) == (1024, 4096)
    with ckr(CKR.MECHANISM_INVALID):
        p11.C_GetMechanismInfo(0, 0x7FFFFFF0)


def test_wait_for_slot_event(p11: Any) -> None:
    with ckr(CKR.NO_EVENT):
        p11.C_WaitForSlotEvent(CKF_DONT_BLOCK)


def test_open_session_rules(p11: Any) -> None:
    with ckr(CKR.SESSION_PARALLEL_NOT_SUPPORTED):
        p11.C_OpenSession(0, 0)
    with ckr(CKR.TOKEN_NOT_RECOGNIZED):
        p11.C_OpenSession(1, RW)
    with ckr(CKR.SLOT_ID_INVALID):
        p11.C_OpenSession(7, RW)
    ro = p11.C_OpenSession(0, RO)
    rw = p11.C_OpenSession(0, RW)
    assert p11.C_GetSessionInfo(ro)["state"] == CKS.RO_PUBLIC_SESSION
    assert p11.C_GetSessionInfo(rw)["state"] == CKS.RW_PUBLIC_SESSION
    p11.C_CloseSession(ro)
    with ckr(CKR.SESSION_HANDLE_INVALID):
        p11.C_GetSessionInfo(ro)
    with ckr(CKR.SESSION_HANDLE_INVALID):
        p11.C_CloseSession(ro)


def test_login_states(p11: Any, daemon: Any) -> None:
    ro = p11.C_OpenSession(0, RO)
    rw = p11.C_OpenSession(0, RW)
    with ckr(CKR.USER_NOT_LOGGED_IN):
        p11.C_Logout(rw)
    with ckr(CKR.PIN_INCORRECT):
        p11.C_Login(rw, CKU.USER, b"wrong-pin")
    with ckr(CKR.USER_TYPE_INVALID):
        p11.C_Login(rw, 7, daemon.user_pin)
    p11.C_Login(rw, CKU.USER, daemon.user_pin)
    # Login is per application and token: every session sees it.
    assert p11.C_GetSessionInfo(ro)["state"] == CKS.RO_USER_FUNCTIONS
    assert p11.C_GetSessionInfo(rw)["state"] == CKS.RW_USER_FUNCTIONS
    with ckr(CKR.USER_ALREADY_LOGGED_IN):
        p11.C_Login(ro, CKU.USER, daemon.user_pin)
    with ckr(CKR.USER_ANOTHER_ALREADY_LOGGED_IN):
        p11.C_Login(ro, CKU.SO, daemon.so_pin)
    p11.C_Logout(ro)
    assert p11.C_GetSessionInfo(rw)["state"] == CKS.RW_PUBLIC_SESSION
    with ckr(CKR.SESSION_READ_ONLY_EXISTS):
        p11.C_Login(rw, CKU.SO, daemon.so_pin)
    p11.C_CloseSession(ro)
    p11.C_Login(rw, CKU.SO, daemon.so_pin)
    assert p11.C_GetSessionInfo(rw)["state"] == CKS.RW_SO_FUNCTIONS
    with ckr(CKR.SESSION_READ_WRITE_SO_EXISTS):
        p11.C_OpenSession(0, RO)
    p11.C_Logout(rw)


def test_login_is_per_application(p11: Any, other: Client, daemon: Any) -> None:
    mine = p11.C_OpenSession(0, RW)
    p11.C_Login(mine, CKU.USER, daemon.user_pin)
    theirs = other.C_OpenSession(0, RW)
    assert other.C_GetSessionInfo(theirs)["state"] == CKS.RW_PUBLIC_SESSION
    # Session handles are per application.
    with ckr(CKR.SESSION_HANDLE_INVALID):
        other.C_GetSessionInfo(theirs + 1000)


def test_closing_last_session_logs_out(p11: Any, daemon: Any) -> None:
    s = p11.C_OpenSession(0, RW)
    p11.C_Login(s, CKU.USER, daemon.user_pin)
    p11.C_CloseAllSessions(0)
    s2 = p11.C_OpenSession(0, RW)
    assert p11.C_GetSessionInfo(s2)["state"] == CKS.RW_PUBLIC_SESSION


def test_context_specific_login_needs_an_operation(p11: Any, session: int, daemon: Any) -> None:
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Login(session, CKU.CONTEXT_SPECIFIC, daemon.user_pin)


def test_random(p11: Any, public_session: int) -> None:
    a = p11.C_GenerateRandom(public_session, 32)
    b = p11.C_GenerateRandom(public_session, 32)
    assert len(a) == 32 and a != b
    p11.C_SeedRandom(public_session, b"seed")
    assert p11.C_GenerateRandom(public_session, 0) == b""


def test_legacy_and_unsupported_functions(p11: Any, public_session: int) -> None:
    with ckr(CKR.FUNCTION_NOT_PARALLEL):
        p11.C_GetFunctionStatus(public_session)
    with ckr(CKR.FUNCTION_NOT_PARALLEL):
        p11.C_CancelFunction(public_session)
    with ckr(CKR.FUNCTION_NOT_SUPPORTED):
        p11.C_GetOperationState(public_session)
    with ckr(CKR.FUNCTION_NOT_SUPPORTED):
        p11.C_DigestEncryptUpdate(public_session, b"x")
