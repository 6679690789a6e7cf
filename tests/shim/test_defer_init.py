"""The shim's opt-in deferred init (``defer_init = 1`` in pkcs11.conf).

With it, C_EncryptInit, C_DecryptInit, C_DigestInit, C_SignInit, C_VerifyInit,
C_FindObjectsInit and C_FindObjectsFinal return CKR_OK after their local
checks and their request goes out with the session's next call, in one write:
one round trip per signature and per find. An init's error comes out of the
next call of its family. Checked against a real keygridd (same results as
without deferral, where errors come out, sessions that go away) and against a
small fake daemon that records which requests each of its reads got (the
batching itself, ordering, replies out of order, threads).
"""

from __future__ import annotations

import ctypes
import hashlib
import signal
from collections.abc import Callable, Iterator
from ctypes import byref
from pathlib import Path
from typing import Any

import pytest
from daemon_process import USER_PIN, Daemon
from door import CK_ULONG, ShimDoor, in_threads
from fakedaemon import Fake, configure

from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKR, CKU, SessionFlag
from keygridd.pkcs11.errors import DeviceRemoved, SessionHandleInvalid
from keygridd.pkcs11.params import GcmParams, Mechanism
from keygridd.providers.pkcs11.ckstructs import CK_MECHANISM

pytestmark = pytest.mark.shim

RW = SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
AES_VALUE = bytes(range(32))
GCM = Mechanism(CKM.AES_GCM, GcmParams(iv=bytes(range(12)), aad=b"header"))


@pytest.fixture
def open_door(
    daemon: Daemon, shim_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int | None], ShimDoor]]:
    """Opens the shim against the test daemon with defer_init set (None: no such key)."""
    doors: list[ShimDoor] = []

    def _open(defer: int | None) -> ShimDoor:
        for d in doors:
            d.close()  # one application per process
        doors.clear()
        configure(tmp_path, monkeypatch, "# test\n" + (f"defer_init = {defer}\n" if defer is not None else ""))
        doors.append(ShimDoor(str(shim_lib)))
        return doors[0]

    yield _open
    for d in doors:
        d.close()


def logged_in(d: ShimDoor) -> int:
    session = d.C_OpenSession(0, RW)
    d.C_Login(session, CKU.USER, USER_PIN.encode())
    return session


def ec_key(d: ShimDoor, session: int, *, sign: bool = True) -> tuple[int, int]:
    return d.C_GenerateKeyPair(
        session,
        CKM.EC_KEY_PAIR_GEN,
        [(CKA.EC_PARAMS, P256), (CKA.VERIFY, True), (CKA.TOKEN, False)],
        [(CKA.SIGN, sign), (CKA.SENSITIVE, True), (CKA.PRIVATE, True), (CKA.TOKEN, False)],
    )


def init_raw(d: ShimDoor, name: str, session: int, mechanism: int, key: int) -> int:
    mech = CK_MECHANISM(mechanism, None, 0)
    return d.raw(name, CK_ULONG(session), byref(mech), CK_ULONG(key))


def sign_raw(d: ShimDoor, session: int, data: bytes) -> int:
    buf, length = ctypes.create_string_buffer(128), CK_ULONG(128)
    return d.raw("C_Sign", CK_ULONG(session), data, CK_ULONG(len(data)), buf, byref(length))


def find(d: ShimDoor, session: int, template: Any) -> list[int]:
    d.C_FindObjectsInit(session, template)
    found = d.C_FindObjects(session, 10)
    d.C_FindObjectsFinal(session)
    return found


def workload(d: ShimDoor) -> dict[str, Any]:
    """Sign and verify, an AES-GCM round trip, a digest and two finds by label: what they give."""
    session = logged_in(d)
    public, private = ec_key(d, session)
    digest = hashlib.sha256(b"message").digest()
    d.C_SignInit(session, CKM.ECDSA, private)
    signature = d.C_Sign(session, digest)
    d.C_VerifyInit(session, CKM.ECDSA, public)
    d.C_Verify(session, digest, signature)  # raises unless the signature verifies
    d.C_VerifyInit(session, CKM.ECDSA, public)
    bad = d.raw("C_Verify", CK_ULONG(session), digest, CK_ULONG(32), bytes(64), CK_ULONG(64))

    aes = d.C_CreateObject(
        session,
        [
            (CKA.CLASS, CKO.SECRET_KEY),
            (CKA.KEY_TYPE, CKK.AES),
            (CKA.VALUE, AES_VALUE),
            (CKA.ENCRYPT, True),
            (CKA.DECRYPT, True),
            (CKA.TOKEN, False),
        ],
    )
    d.C_EncryptInit(session, GCM, aes)
    ciphertext = d.C_Encrypt(session, b"plaintext of the round trip")
    d.C_DecryptInit(session, GCM, aes)
    plaintext = d.C_Decrypt(session, ciphertext)
    d.C_DigestInit(session, CKM.SHA256)
    sha = d.C_Digest(session, b"abc")

    for i in range(2):
        d.C_CreateObject(
            session, [(CKA.CLASS, CKO.DATA), (CKA.TOKEN, False), (CKA.LABEL, b"defer find"), (CKA.VALUE, bytes([i]))]
        )
    first = find(d, session, [(CKA.LABEL, b"defer find")])
    second = find(d, session, [(CKA.LABEL, b"defer find")])
    values = sorted(d.C_GetAttributeValue(session, h, [CKA.VALUE])[0] for h in first)
    d.C_CloseSession(session)
    return {
        "signature_len": len(signature),
        "bad_signature": bad,
        "ciphertext": ciphertext,
        "plaintext": plaintext,
        "sha256": sha,
        "finds_agree": first == second,
        "found": values,
    }


# --- against keygridd ---------------------------------------------------------------------------------------


def test_results_are_the_same_with_and_without_deferral(open_door: Callable[[int | None], ShimDoor]) -> None:
    exact = workload(open_door(0))
    deferred = workload(open_door(1))
    assert deferred == exact
    assert exact["signature_len"] == 64 and exact["bad_signature"] == CKR.SIGNATURE_INVALID
    assert exact["plaintext"] == b"plaintext of the round trip" and exact["sha256"] == hashlib.sha256(b"abc").digest()
    assert exact["finds_agree"] and exact["found"] == [b"\x00", b"\x01"]


def test_init_error_comes_out_of_the_next_call(open_door: Callable[[int | None], ShimDoor]) -> None:
    d = open_door(0)
    session = logged_in(d)
    _, no_sign = ec_key(d, session, sign=False)
    expected = init_raw(d, "C_SignInit", session, CKM.ECDSA, no_sign)
    assert expected == CKR.KEY_FUNCTION_NOT_PERMITTED

    d = open_door(1)
    session = logged_in(d)
    _, no_sign = ec_key(d, session, sign=False)
    assert init_raw(d, "C_SignInit", session, CKM.ECDSA, no_sign) == CKR.OK
    assert sign_raw(d, session, bytes(32)) == expected
    assert sign_raw(d, session, bytes(32)) == CKR.OPERATION_NOT_INITIALIZED  # reported once
    # A find that cannot start (a search is active): C_FindObjects says so.
    d.C_FindObjectsInit(session, [(CKA.CLASS, CKO.DATA)])
    d.C_FindObjectsInit(session, [(CKA.CLASS, CKO.DATA)])
    count = CK_ULONG(0)
    handles = (CK_ULONG * 4)()
    assert d.raw("C_FindObjects", CK_ULONG(session), handles, CK_ULONG(4), byref(count)) == CKR.OPERATION_ACTIVE


def test_deferred_error_waits_for_its_family(open_door: Callable[[int | None], ShimDoor]) -> None:
    d = open_door(1)
    session = logged_in(d)
    _, no_sign = ec_key(d, session, sign=False)
    assert init_raw(d, "C_SignInit", session, CKM.ECDSA, no_sign) == CKR.OK
    assert d.C_GetSessionInfo(session)["state"] == 3  # its own result: CKS_RW_USER_FUNCTIONS
    d.C_DigestInit(session, CKM.SHA256)  # another family's operation is not disturbed
    assert d.C_Digest(session, b"abc") == hashlib.sha256(b"abc").digest()
    assert sign_raw(d, session, bytes(32)) == CKR.KEY_FUNCTION_NOT_PERMITTED
    # A new init of the family forgets a failed one.
    assert init_raw(d, "C_SignInit", session, CKM.ECDSA, no_sign) == CKR.OK
    _, key = ec_key(d, session)  # C_GenerateKeyPair sends the failing init, which is remembered...
    assert init_raw(d, "C_SignInit", session, CKM.ECDSA, key) == CKR.OK  # ...until this init
    assert sign_raw(d, session, bytes(32)) == CKR.OK


def test_init_refused_while_an_operation_is_active(open_door: Callable[[int | None], ShimDoor]) -> None:
    """A deferred C_SignInit that the daemon refuses (CKR_OPERATION_ACTIVE): the next C_Sign, which
    the daemon ran on the older operation, returns the init's code, not a signature by another key."""
    codes = []
    for defer in (0, 1):
        d = open_door(defer)
        session = logged_in(d)
        _, key = ec_key(d, session)
        d.C_SignInit(session, CKM.ECDSA, key)
        length = CK_ULONG(0)  # a length query leaves the operation active
        assert d.raw("C_Sign", CK_ULONG(session), bytes(32), CK_ULONG(32), None, byref(length)) == CKR.OK
        init = init_raw(d, "C_SignInit", session, CKM.ECDSA, key)
        codes.append(init if not defer else sign_raw(d, session, bytes(32)))
        assert init == (CKR.OPERATION_ACTIVE if not defer else CKR.OK)
    assert codes == [CKR.OPERATION_ACTIVE, CKR.OPERATION_ACTIVE]


def test_local_checks_still_answer_from_the_init(open_door: Callable[[int | None], ShimDoor]) -> None:
    d = open_door(1)
    session = logged_in(d)
    assert d.raw("C_SignInit", CK_ULONG(session), None, CK_ULONG(1)) == CKR.ARGUMENTS_BAD
    bad_param = CK_MECHANISM(CKM.ECDSA, None, 5)
    assert d.raw("C_SignInit", CK_ULONG(session), byref(bad_param), CK_ULONG(1)) == CKR.MECHANISM_PARAM_INVALID
    assert init_raw(d, "C_SignInit", 0x7777_0000_0001, CKM.ECDSA, 1) == CKR.SESSION_HANDLE_INVALID
    assert d.raw("C_FindObjectsInit", CK_ULONG(session), None, CK_ULONG(2)) == CKR.ARGUMENTS_BAD
    assert d.raw("C_FindObjectsFinal", CK_ULONG(0x7777_0000_0001)) == CKR.SESSION_HANDLE_INVALID


def test_close_session_with_a_queued_init(open_door: Callable[[int | None], ShimDoor]) -> None:
    d = open_door(1)
    session = logged_in(d)
    _, key = ec_key(d, session)
    d.C_SignInit(session, CKM.ECDSA, key)
    d.C_FindObjectsInit(session, [(CKA.CLASS, CKO.DATA)])
    other = d.C_OpenSession(0, RW)  # keeps the login when `session` closes
    d.C_CloseSession(session)
    with pytest.raises(SessionHandleInvalid):
        d.C_GetSessionInfo(session)
    assert sign_raw(d, session, bytes(32)) == CKR.SESSION_HANDLE_INVALID
    _, key = ec_key(d, other)  # the old key was a session object of the closed session
    d.C_SignInit(other, CKM.ECDSA, key)
    assert len(d.C_Sign(other, bytes(32))) == 64


def test_daemon_killed_with_a_queued_init(daemon: Daemon, open_door: Callable[[int | None], ShimDoor]) -> None:
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the module must not raise SIGPIPE
    try:
        d = open_door(1)
        session = logged_in(d)
        other = d.C_OpenSession(0, RW)
        _, key = ec_key(d, session)
        d.C_SignInit(session, CKM.ECDSA, key)
        d.C_SignInit(other, CKM.ECDSA, key)
        daemon.kill()
        assert sign_raw(d, session, bytes(32)) == CKR.DEVICE_REMOVED
        assert sign_raw(d, session, bytes(32)) == CKR.SESSION_HANDLE_INVALID
        assert sign_raw(d, other, bytes(32)) == CKR.DEVICE_REMOVED  # its queue went with the generation
        with pytest.raises(SessionHandleInvalid):
            d.C_GetSessionInfo(other)
        daemon.start()
        fresh = logged_in(d)
        _, key = ec_key(d, fresh)
        d.C_SignInit(fresh, CKM.ECDSA, key)
        assert len(d.C_Sign(fresh, bytes(32))) == 64
        d.C_SignInit(fresh, CKM.ECDSA, key)
        daemon.kill()  # a call without a session ends the generation while a frame is queued
        with pytest.raises(DeviceRemoved):
            d.C_GetTokenInfo(0)
        assert sign_raw(d, fresh, bytes(32)) == CKR.DEVICE_REMOVED  # told once, like any session
        with pytest.raises(SessionHandleInvalid):
            d.C_GetSessionInfo(fresh)
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_default_is_exact_semantics(open_door: Callable[[int | None], ShimDoor]) -> None:
    for defer in (None, 0):
        d = open_door(defer)
        session = logged_in(d)
        _, no_sign = ec_key(d, session, sign=False)
        assert init_raw(d, "C_SignInit", session, CKM.ECDSA, no_sign) == CKR.KEY_FUNCTION_NOT_PERMITTED
        assert sign_raw(d, session, bytes(32)) == CKR.OPERATION_NOT_INITIALIZED


def test_threads_with_deferral(open_door: Callable[[int | None], ShimDoor]) -> None:
    d = open_door(1)
    session = logged_in(d)
    public, private = ec_key(d, session)

    def work() -> None:
        mine = d.C_OpenSession(0, RW)
        for i in range(25):
            digest = bytes([i]) * 32
            d.C_SignInit(mine, CKM.ECDSA, private)
            signature = d.C_Sign(mine, digest)
            d.C_VerifyInit(mine, CKM.ECDSA, public)
            d.C_Verify(mine, digest, signature)
            assert find(d, mine, [(CKA.CLASS, CKO.PRIVATE_KEY)]) == [private]
        d.C_SignInit(mine, CKM.ECDSA, private)
        d.C_CloseSession(mine)

    assert not in_threads(work, 6)


def test_debug_log_with_deferral(
    open_door: Callable[[int | None], ShimDoor], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYGRID_PKCS11_DEBUG", "1")
    d = open_door(1)
    session = logged_in(d)
    _, no_sign = ec_key(d, session, sign=False)
    d.C_SignInit(session, CKM.ECDSA, no_sign)
    secret = b"SECRET-DATA-TO-SIGN-0123456789ab"
    assert sign_raw(d, session, secret) == CKR.KEY_FUNCTION_NOT_PERMITTED
    d.C_FindObjectsFinal(session)  # no search is active: the daemon's answer is only logged
    d.C_GetSessionInfo(session)
    err = capfd.readouterr().err
    assert "C_SignInit: deferred" in err
    assert f"C_Sign: reports a deferred init's CK_RV 0x{CKR.KEY_FUNCTION_NOT_PERMITTED:x}" in err
    assert f"C_FindObjectsFinal (deferred) -> CK_RV 0x{CKR.OPERATION_NOT_INITIALIZED:x}" in err
    for text in (USER_PIN, secret.decode(), secret.hex()):
        assert text not in err


# --- against a fake daemon: what goes over the socket -------------------------------------------------------


def sign_and_find_twice(d: ShimDoor, session: int) -> None:
    d.C_SignInit(session, CKM.ECDSA, 7)
    assert d.C_Sign(session, bytes(32)) == bytes(64)
    for _ in range(2):
        assert find(d, session, [(CKA.LABEL, b"web")]) == [5]
    d.C_SeedRandom(session, b"x")


def test_batching_is_one_round_trip(fake: Fake) -> None:
    d, daemon = fake.open(defer=1)
    session = d.C_OpenSession(0, RW)
    assert daemon.take() == [["C_OpenSession"]]
    d.C_SignInit(session, CKM.ECDSA, 7)
    assert daemon.take() == []  # nothing sent yet
    assert d.C_Sign(session, bytes(32)) == bytes(64)
    assert daemon.take() == [["C_SignInit", "C_Sign"]]  # two frames in one read, one write back
    for _ in range(2):
        assert find(d, session, [(CKA.LABEL, b"web")]) == [5]
    d.C_SeedRandom(session, b"x")
    assert daemon.take() == [
        ["C_FindObjectsInit", "C_FindObjects"],
        ["C_FindObjectsFinal", "C_FindObjectsInit", "C_FindObjects"],
        ["C_FindObjectsFinal", "C_SeedRandom"],
    ]
    assert len(set(daemon.ids)) == len(daemon.ids)


def test_without_deferral_every_call_is_a_round_trip(fake: Fake) -> None:
    d, daemon = fake.open(defer=0)
    session = d.C_OpenSession(0, RW)
    sign_and_find_twice(d, session)
    reads = daemon.take()
    assert all(len(r) == 1 for r in reads) and len(reads) == 1 + 2 + 3 + 3 + 1


def test_replies_out_of_order_are_matched_by_id(fake: Fake) -> None:
    d, daemon = fake.open(defer=1, reverse=True, codes={"C_FindObjectsFinal": CKR.OPERATION_NOT_INITIALIZED})
    session = d.C_OpenSession(0, RW)
    sign_and_find_twice(d, session)
    assert [len(r) for r in daemon.take()] == [1, 2, 2, 3, 2]


def test_calls_ordered_per_application_go_after_the_queue(fake: Fake) -> None:
    """The daemon orders C_Login/C_Logout per application, not after the session's requests: the
    queue goes first, alone. C_CloseSession drops it."""
    d, daemon = fake.open(defer=1, codes={"C_SignInit": CKR.KEY_FUNCTION_NOT_PERMITTED})
    session = d.C_OpenSession(0, RW)
    daemon.take()
    d.C_SignInit(session, CKM.ECDSA, 7)
    d.C_Logout(session)
    assert daemon.take() == [["C_SignInit"], ["C_Logout"]]
    assert sign_raw(d, session, bytes(32)) == CKR.KEY_FUNCTION_NOT_PERMITTED  # remembered meanwhile
    assert daemon.take() == [["C_Sign"]]
    d.C_SignInit(session, CKM.ECDSA, 7)
    d.C_CloseSession(session)
    assert daemon.take() == [["C_CloseSession"]]
    assert sign_raw(d, session, bytes(32)) == CKR.SESSION_HANDLE_INVALID


def test_a_full_queue_goes_out_with_the_next_init(fake: Fake) -> None:
    d, daemon = fake.open(defer=1, codes={"C_DigestInit": CKR.MECHANISM_INVALID})
    session = d.C_OpenSession(0, RW)
    daemon.take()
    for name in ("C_SignInit", "C_VerifyInit", "C_EncryptInit", "C_DecryptInit"):
        assert init_raw(d, name, session, CKM.ECDSA, 7) == CKR.OK
    assert daemon.take() == []
    mech = CK_MECHANISM(CKM.SHA256, None, 0)
    assert d.raw("C_DigestInit", CK_ULONG(session), byref(mech)) == CKR.MECHANISM_INVALID  # its own code
    assert daemon.take() == [["C_SignInit", "C_VerifyInit", "C_EncryptInit", "C_DecryptInit", "C_DigestInit"]]


def test_two_threads_on_one_session_lose_and_repeat_nothing(fake: Fake) -> None:
    d, daemon = fake.open(defer=1)
    session = d.C_OpenSession(0, RW)
    daemon.take()
    rounds = 200
    mech = CK_MECHANISM(CKM.SHA256, None, 0)

    def work() -> None:
        for _ in range(rounds):
            assert d.raw("C_DigestInit", CK_ULONG(session), byref(mech)) == CKR.OK
            assert d.raw("C_DigestUpdate", CK_ULONG(session), b"x", CK_ULONG(1)) == CKR.OK

    assert not in_threads(work, 2)
    sent = [m for r in daemon.take() for m in r]
    assert sent.count("C_DigestInit") == sent.count("C_DigestUpdate") == 2 * rounds
    assert len(set(daemon.ids)) == len(daemon.ids)


def test_unknown_reply_id_in_a_batch_is_device_error(fake: Fake) -> None:
    d, daemon = fake.open(defer=1)
    session = d.C_OpenSession(0, RW)
    original = daemon._answer

    def wrong_id(request: list[Any]) -> bytes:
        if request[2] == "C_SignInit":
            request = [request[0], request[1] + 1000, request[2], request[3]]
        return original(request)

    daemon._answer = wrong_id  # type: ignore[method-assign]
    d.C_SignInit(session, CKM.ECDSA, 7)
    assert sign_raw(d, session, bytes(32)) == CKR.DEVICE_ERROR
    assert sign_raw(d, session, bytes(32)) == CKR.SESSION_HANDLE_INVALID  # the generation ended
