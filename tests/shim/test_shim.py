"""libkeygrid-pkcs11.so loaded with ctypes against a real keygridd.

Covers the PKCS#11 conventions the shim owns (v2.40 Base 5.1-5.7):
C_Initialize/C_Finalize rules, the function tables, the two-call idioms,
blank-padded info, output-length queries, C_GetAttributeValue's per-attribute
rules, and what must never break the host: an absent daemon, fork, a daemon
killed mid-session, malformed replies, concurrent threads and debug logging.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ctypes import CFUNCTYPE, POINTER, byref, c_ubyte, c_void_p, sizeof
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_process import LABEL, SO_PIN, USER_PIN, Daemon
from door import CK_ULONG, UNAVAILABLE, ShimDoor, in_threads, text

from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKR, CKU, SessionFlag
from keygridd.pkcs11.errors import DeviceRemoved, PinIncorrect, SessionHandleInvalid
from keygridd.providers.pkcs11.ckstructs import CK_ATTRIBUTE, CK_C_INITIALIZE_ARGS, CK_INFO, CK_MECHANISM, CK_TOKEN_INFO

pytestmark = pytest.mark.shim

RW = SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
CKF_LIBRARY_CANT_CREATE_OS_THREADS = 1
CKF_OS_LOCKING_OK = 2


@pytest.fixture
def door(daemon: Daemon, shim_lib: Path) -> Iterator[ShimDoor]:
    d = ShimDoor(str(shim_lib))
    yield d
    d.close()


def ec_key(d: ShimDoor, session: int) -> tuple[int, int]:
    return d.C_GenerateKeyPair(
        session,
        CKM.EC_KEY_PAIR_GEN,
        [(CKA.EC_PARAMS, P256), (CKA.VERIFY, True), (CKA.TOKEN, False)],
        [(CKA.SIGN, True), (CKA.SENSITIVE, True), (CKA.PRIVATE, True), (CKA.TOKEN, False)],
    )


def logged_in(d: ShimDoor) -> int:
    session = d.C_OpenSession(0, RW)
    d.C_Login(session, CKU.USER, USER_PIN.encode())
    return session


def sign_raw(d: ShimDoor, session: int, data: bytes, buf: Any, size: int | None) -> tuple[int, int]:
    length = CK_ULONG(size or 0)
    rv = d.raw("C_Sign", CK_ULONG(session), data, CK_ULONG(len(data)), buf, byref(length))
    return rv, length.value


# --- initialisation and tables -----------------------------------------------------------------------


def test_initialize_and_finalize_rules(daemon: Daemon, shim_lib: Path) -> None:
    lib = ctypes.CDLL(str(shim_lib))
    for name in ("C_Initialize", "C_Finalize", "C_GetSlotList"):
        getattr(lib, name).restype = CK_ULONG
    count = CK_ULONG(0)
    assert lib.C_GetSlotList(0, None, byref(count)) == CKR.CRYPTOKI_NOT_INITIALIZED
    assert lib.C_Finalize(None) == CKR.CRYPTOKI_NOT_INITIALIZED

    reserved = CK_C_INITIALIZE_ARGS(None, None, None, None, 0, 1)
    assert lib.C_Initialize(byref(reserved)) == CKR.ARGUMENTS_BAD
    some = CK_C_INITIALIZE_ARGS(1, None, None, None, 0, None)
    assert lib.C_Initialize(byref(some)) == CKR.ARGUMENTS_BAD

    for flags in (CKF_OS_LOCKING_OK, CKF_LIBRARY_CANT_CREATE_OS_THREADS, 0):
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, flags, None)
        assert lib.C_Initialize(byref(args)) == CKR.OK
        assert lib.C_Initialize(None) == CKR.CRYPTOKI_ALREADY_INITIALIZED
        assert lib.C_GetSlotList(0, None, byref(count)) == CKR.OK and count.value == 1
        assert lib.C_Finalize(c_void_p(1)) == CKR.ARGUMENTS_BAD
        assert lib.C_Finalize(None) == CKR.OK
    assert lib.C_Finalize(None) == CKR.CRYPTOKI_NOT_INITIALIZED


def test_application_mutex_callbacks_are_used(daemon: Daemon, shim_lib: Path) -> None:
    """Callbacks without CKF_OS_LOCKING_OK: the module locks with the application's mutex."""
    lib = ctypes.CDLL(str(shim_lib))
    lib.C_Initialize.restype = lib.C_Finalize.restype = lib.C_GetSlotList.restype = CK_ULONG
    calls = {"create": 0, "destroy": 0, "lock": 0, "unlock": 0}
    locks: dict[int, threading.Lock] = {}
    create_t = CFUNCTYPE(CK_ULONG, POINTER(c_void_p))
    mutex_t = CFUNCTYPE(CK_ULONG, c_void_p)

    def _create(out: Any) -> int:
        calls["create"] += 1
        key = len(locks) + 1
        locks[key] = threading.Lock()
        out[0] = key
        return 0

    def _destroy(m: int) -> int:
        calls["destroy"] += 1
        return 0

    def _lock(m: int) -> int:
        calls["lock"] += 1
        locks[m].acquire()
        return 0

    def _unlock(m: int) -> int:
        calls["unlock"] += 1
        locks[m].release()
        return 0

    create, destroy, lock, unlock = create_t(_create), mutex_t(_destroy), mutex_t(_lock), mutex_t(_unlock)
    args = CK_C_INITIALIZE_ARGS(
        ctypes.cast(create, c_void_p),
        ctypes.cast(destroy, c_void_p),
        ctypes.cast(lock, c_void_p),
        ctypes.cast(unlock, c_void_p),
        0,
        None,
    )
    assert lib.C_Initialize(byref(args)) == CKR.OK
    count = CK_ULONG(0)
    assert lib.C_GetSlotList(0, None, byref(count)) == CKR.OK and count.value == 1
    assert lib.C_Finalize(None) == CKR.OK
    assert calls["create"] == 1 and calls["destroy"] == 1
    assert calls["lock"] > 0 and calls["lock"] == calls["unlock"]


def test_function_tables_have_no_null_entries(shim_lib: Path) -> None:
    lib = ctypes.CDLL(str(shim_lib))
    for name in ("C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface", "C_LoginUser"):
        getattr(lib, name).restype = CK_ULONG

    class Table(ctypes.Structure):
        _fields_ = [("major", c_ubyte), ("minor", c_ubyte), ("f", c_void_p * 92)]

    class Interface(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("table", POINTER(Table)), ("flags", CK_ULONG)]

    table = POINTER(Table)()
    assert lib.C_GetFunctionList(byref(table)) == CKR.OK
    assert (table.contents.major, table.contents.minor) == (2, 40)
    assert all(table.contents.f[:68])
    assert table.contents.f[0] == ctypes.cast(lib.C_Initialize, c_void_p).value

    count = CK_ULONG(0)
    assert lib.C_GetInterfaceList(None, byref(count)) == CKR.OK and count.value == 2
    short = CK_ULONG(1)
    assert lib.C_GetInterfaceList((Interface * 1)(), byref(short)) == CKR.BUFFER_TOO_SMALL and short.value == 2
    interfaces = (Interface * 2)()
    assert lib.C_GetInterfaceList(interfaces, byref(count)) == CKR.OK
    assert [i.name for i in interfaces] == [b"PKCS 11", b"PKCS 11"]

    found = POINTER(Interface)()
    assert lib.C_GetInterface(None, None, byref(found), 0) == CKR.OK
    v3 = found.contents.table.contents
    assert (v3.major, v3.minor) == (3, 0) and all(v3.f[:92])
    assert v3.f[68] == ctypes.cast(lib.C_GetInterfaceList, c_void_p).value
    version = (c_ubyte * 2)(2, 40)
    assert lib.C_GetInterface(b"PKCS 11", version, byref(found), 0) == CKR.OK
    assert found.contents.table.contents.minor == 40
    assert lib.C_GetInterface(b"Vendor", None, byref(found), 0) == CKR.ARGUMENTS_BAD
    assert lib.C_LoginUser(1, CKU.USER, None, 0, None, 0) == CKR.CRYPTOKI_NOT_INITIALIZED


def test_v3_only_functions_are_not_supported(door: ShimDoor) -> None:
    assert door.raw("C_LoginUser", CK_ULONG(1), CK_ULONG(CKU.USER), None, CK_ULONG(0), None, CK_ULONG(0)) == (
        CKR.FUNCTION_NOT_SUPPORTED
    )
    assert door.raw("C_MessageVerifyFinal", CK_ULONG(1)) == CKR.FUNCTION_NOT_SUPPORTED


# --- slots, tokens, sessions ------------------------------------------------------------------------------


def test_slot_list_two_call_idiom(door: ShimDoor) -> None:
    count = CK_ULONG(0)
    assert door.raw("C_GetSlotList", c_ubyte(1), None, byref(count)) == CKR.OK and count.value == 1
    slots = (CK_ULONG * 1)()
    zero = CK_ULONG(0)
    assert door.raw("C_GetSlotList", c_ubyte(1), slots, byref(zero)) == CKR.BUFFER_TOO_SMALL and zero.value == 1
    assert door.raw("C_GetSlotList", c_ubyte(1), slots, byref(count)) == CKR.OK and list(slots) == [0]
    assert door.raw("C_GetSlotList", c_ubyte(1), slots, None) == CKR.ARGUMENTS_BAD
    assert door.C_GetMechanismList(0)  # the same idiom for mechanisms


def test_token_info_is_blank_padded(door: ShimDoor) -> None:
    info = CK_TOKEN_INFO()
    assert door.raw("C_GetTokenInfo", CK_ULONG(0), byref(info)) == CKR.OK
    label = LABEL.encode()
    assert bytes(info.label) == label + b" " * (32 - len(label))
    assert text(info.manufacturer_id) == "KeyGrid"
    assert bytes(info.manufacturer_id).endswith(b" ")
    assert len(bytes(info.utc_time).strip()) == 16
    assert info.total_public_memory == UNAVAILABLE
    assert door.raw("C_GetTokenInfo", CK_ULONG(7), byref(info)) == CKR.SLOT_ID_INVALID
    general = CK_INFO()
    assert door.raw("C_GetInfo", byref(general)) == CKR.OK
    assert (general.cryptoki_version.major, general.cryptoki_version.minor) == (2, 40)
    assert bytes(general.library_description).startswith(b"KeyGrid") and len(bytes(general.library_description)) == 32


def test_session_login_generate_sign_verify(door: ShimDoor) -> None:
    session = door.C_OpenSession(0, RW)
    with pytest.raises(PinIncorrect):
        door.C_Login(session, CKU.USER, b"000000")
    door.C_Login(session, CKU.USER, USER_PIN.encode())
    assert door.C_GetSessionInfo(session)["state"] == 3  # CKS_RW_USER_FUNCTIONS
    public, private = ec_key(door, session)
    door.C_SignInit(session, CKM.ECDSA, private)
    digest = bytes(range(32))
    signature = door.C_Sign(session, digest)
    assert len(signature) == 64
    door.C_VerifyInit(session, CKM.ECDSA, public)
    door.C_Verify(session, digest, signature)
    door.C_VerifyInit(session, CKM.ECDSA, public)
    assert (
        door.raw("C_Verify", CK_ULONG(session), digest, CK_ULONG(32), bytes(64), CK_ULONG(64)) == CKR.SIGNATURE_INVALID
    )
    assert door.C_GenerateRandom(session, 48) != bytes(48)
    door.C_Logout(session)
    door.C_CloseSession(session)
    with pytest.raises(SessionHandleInvalid):
        door.C_GetSessionInfo(session)


def test_length_query_and_short_buffer_keep_the_operation(door: ShimDoor) -> None:
    session = logged_in(door)
    _, private = ec_key(door, session)
    door.C_SignInit(session, CKM.ECDSA, private)
    data = bytes(32)
    rv, needed = sign_raw(door, session, data, None, 0)
    assert (rv, needed) == (CKR.OK, 64)
    small = ctypes.create_string_buffer(10)
    assert sign_raw(door, session, data, small, 10) == (CKR.BUFFER_TOO_SMALL, 64)
    buf = ctypes.create_string_buffer(64)
    assert sign_raw(door, session, data, buf, 64) == (CKR.OK, 64)
    assert sign_raw(door, session, data, buf, 64)[0] == CKR.OPERATION_NOT_INITIALIZED  # finished
    assert door.raw("C_Sign", CK_ULONG(session), data, CK_ULONG(32), buf, None) == CKR.ARGUMENTS_BAD


def test_length_query_after_short_buffer(door: ShimDoor) -> None:
    """The order pkcs11-tool --test uses: short buffer, NULL buffer, then the full buffer."""
    session = logged_in(door)
    _, private = ec_key(door, session)
    door.C_SignInit(session, CKM.ECDSA, private)
    data = bytes(32)
    assert sign_raw(door, session, data, ctypes.create_string_buffer(1), 1) == (CKR.BUFFER_TOO_SMALL, 64)
    assert sign_raw(door, session, data, None, 1) == (CKR.OK, 64)
    assert sign_raw(door, session, data, ctypes.create_string_buffer(64), 64) == (CKR.OK, 64)


def test_get_attribute_value_rules(door: ShimDoor) -> None:
    session = logged_in(door)
    public, private = ec_key(door, session)
    attrs = (CK_ATTRIBUTE * 5)()
    types = [CKA.VALUE, CKA.SIGN, CKA.KEY_TYPE, 0x8123_4567, CKA.ALLOWED_MECHANISMS]
    for i, t in enumerate(types):
        attrs[i] = CK_ATTRIBUTE(t, None, 0)
    rv = door.raw("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(private), attrs, CK_ULONG(4))
    assert rv in (CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID)
    assert attrs[0].ulValueLen == UNAVAILABLE  # sensitive
    assert attrs[1].ulValueLen == 1  # CK_BBOOL
    assert attrs[2].ulValueLen == sizeof(CK_ULONG)
    assert attrs[3].ulValueLen == UNAVAILABLE  # no such attribute

    key_type, sign = CK_ULONG(0), c_ubyte(0)
    attrs[1] = CK_ATTRIBUTE(CKA.SIGN, ctypes.addressof(sign), 1)
    attrs[2] = CK_ATTRIBUTE(CKA.KEY_TYPE, ctypes.addressof(key_type), sizeof(key_type))
    assert door.raw("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(private), attrs, CK_ULONG(3)) == (
        CKR.ATTRIBUTE_SENSITIVE
    )
    assert sign.value == 1 and key_type.value == CKK.EC

    short = ctypes.create_string_buffer(4)
    point = CK_ATTRIBUTE(CKA.EC_PARAMS, ctypes.addressof(short), 4)
    assert door.raw("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(public), byref(point), CK_ULONG(1)) == (
        CKR.BUFFER_TOO_SMALL
    )
    assert point.ulValueLen == UNAVAILABLE
    assert door.C_GetAttributeValue(session, public, [CKA.EC_PARAMS, CKA.CLASS, CKA.VALUE]) == [
        P256,
        CKO.PUBLIC_KEY,
        None,
    ]
    assert door.C_GetAttributeValue(session, private, [CKA.SENSITIVE, CKA.VALUE]) == [True, None]


def test_templates_with_every_value_kind(door: ShimDoor) -> None:
    session = logged_in(door)
    wrap = ((CKA.KEY_TYPE, CKK.AES), (CKA.EXTRACTABLE, True))
    handle = door.C_CreateObject(
        session,
        [
            (CKA.CLASS, CKO.DATA),
            (CKA.TOKEN, False),
            (CKA.LABEL, "data ✓".encode()),
            (CKA.VALUE, b"\x00\x01\x02"),
        ],
    )
    assert door.C_GetAttributeValue(session, handle, [CKA.LABEL, CKA.VALUE, CKA.TOKEN]) == [
        "data ✓".encode(),
        b"\x00\x01\x02",
        False,
    ]
    key = door.C_GenerateKey(
        session,
        CKM.AES_KEY_GEN,
        [
            (CKA.VALUE_LEN, 32),
            (CKA.TOKEN, False),
            (CKA.WRAP_TEMPLATE, wrap),
            (CKA.ALLOWED_MECHANISMS, (CKM.AES_GCM, CKM.AES_KEY_WRAP)),
        ],
    )
    values = door.C_GetAttributeValue(session, key, [CKA.WRAP_TEMPLATE, CKA.ALLOWED_MECHANISMS, CKA.VALUE_LEN])
    assert values == [wrap, (CKM.AES_GCM, CKM.AES_KEY_WRAP), 32]


# --- never break the host ---------------------------------------------------------------------------------


def test_daemon_absent_at_initialize(absent_daemon: Daemon, shim_lib: Path) -> None:
    d = ShimDoor(str(shim_lib))
    try:
        assert d.C_GetSlotList(False) == []
        assert d.C_GetInfo()["manufacturer_id"] == "KeyGrid"
        info = CK_TOKEN_INFO()
        assert d.raw("C_GetTokenInfo", CK_ULONG(0), byref(info)) == CKR.SLOT_ID_INVALID
        absent_daemon.start()
        assert d.C_GetSlotList(True) == [0]
        assert d.C_GetTokenInfo(0)["label"] == LABEL
        logged_in(d)
    finally:
        d.close()


def test_fork_child_reinitialises_parent_keeps_working(door: ShimDoor) -> None:
    session = logged_in(door)
    _, private = ec_key(door, session)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            count = CK_ULONG(0)
            assert door.raw("C_GetSlotList", c_ubyte(0), None, byref(count)) == CKR.CRYPTOKI_NOT_INITIALIZED
            door.C_SignInit  # noqa: B018 - the attribute exists; the call below must not reach the daemon
            mech = CK_MECHANISM(CKM.ECDSA, None, 0)
            assert door.raw("C_SignInit", CK_ULONG(session), byref(mech), CK_ULONG(private)) == (
                CKR.CRYPTOKI_NOT_INITIALIZED
            )
            assert door.raw("C_Finalize", None) == CKR.CRYPTOKI_NOT_INITIALIZED  # drops inherited sockets
            assert door.raw("C_Initialize", None) == CKR.OK
            child_session = logged_in(door)
            _, child_key = ec_key(door, child_session)
            door.C_SignInit(child_session, CKM.ECDSA, child_key)
            assert len(door.C_Sign(child_session, bytes(32))) == 64
            door.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    door.C_SignInit(session, CKM.ECDSA, private)
    assert len(door.C_Sign(session, bytes(32))) == 64


def test_daemon_killed_mid_session_then_restarted(daemon: Daemon, door: ShimDoor) -> None:
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a write to the dead socket must not kill us
    try:
        session = logged_in(door)
        other = door.C_OpenSession(0, RW)
        _, private = ec_key(door, session)
        door.C_SignInit(session, CKM.ECDSA, private)
        daemon.kill()
        with pytest.raises(DeviceRemoved):
            door.C_Sign(session, bytes(32))
        with pytest.raises(SessionHandleInvalid):
            door.C_Sign(session, bytes(32))
        with pytest.raises(DeviceRemoved):  # told once per session
            door.C_GetSessionInfo(other)
        with pytest.raises(SessionHandleInvalid):
            door.C_GetSessionInfo(other)
        assert door.C_GetSlotList(False) == []
        daemon.start()
        assert door.C_GetSlotList(False) == [0]
        fresh = logged_in(door)
        _, key = ec_key(door, fresh)
        door.C_SignInit(fresh, CKM.ECDSA, key)
        assert len(door.C_Sign(fresh, bytes(32))) == 64
        with pytest.raises(SessionHandleInvalid):
            door.C_GetSessionInfo(session)
    finally:
        signal.signal(signal.SIGPIPE, previous)


def _frame(message: Any) -> bytes:
    body: bytes = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


def _fake_daemon(path: Path, answer: bytes) -> threading.Thread:
    """Accepts one connection, answers hello, then answers the next request with `answer`."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def recv_frame(conn: socket.socket) -> Any:
        head = conn.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack(">I", head)
        return msgpack.unpackb(conn.recv(n, socket.MSG_WAITALL))

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            hello = recv_frame(conn)
            body = msgpack.packb([1, hello[1], 0, {"app_id": bytes(16), "limits": {"max_frame": 4096}}, None])
            conn.sendall(struct.pack(">I", len(body)) + body)
            recv_frame(conn)
            conn.sendall(answer)
            time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(struct.pack(">I", 3) + b"\xc1\xc1\xc1", id="garbage"),
        pytest.param(_frame([1, 2, 0, [1]]), id="short-array"),
        pytest.param(_frame([1, 99, 0, [0], None]), id="wrong-id"),
        pytest.param(_frame([1, 2, 0, [0], None])[:-1] + b"\xc1", id="bad-message"),
        pytest.param(struct.pack(">I", 1 << 30), id="oversized-frame"),
        pytest.param(struct.pack(">I", 0), id="empty-frame"),
        pytest.param(_frame([1, 2, 0, "x", None]), id="result-not-a-list"),
        pytest.param(_frame([1, 2, 0, [0], None]) + b"\x00", id="trailing-bytes-in-frame"),
    ],
)
def test_malformed_reply_is_device_error(
    answer: bytes, tmp_path: Path, shim_lib: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fake.sock"
    monkeypatch.setenv("KEYGRID_SOCKET", str(path))
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(tmp_path / "absent.conf"))
    thread = _fake_daemon(path, answer)
    d = ShimDoor(str(shim_lib))
    try:
        count = CK_ULONG(0)
        assert d.raw("C_GetSlotList", c_ubyte(0), None, byref(count)) == CKR.DEVICE_ERROR
    finally:
        d.close()
        thread.join(5)


def test_config_file_and_call_timeout(tmp_path: Path, shim_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that never answers: the call ends after call_timeout_ms (set in the config file)."""
    path = tmp_path / "silent.sock"
    conf = tmp_path / "pkcs11.conf"
    conf.write_text(f"# test\nsocket = {path}\nconnect_timeout_ms = 500\ncall_timeout_ms = 300\ndebug = 0\n")
    monkeypatch.delenv("KEYGRID_SOCKET", raising=False)
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(conf))
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    try:
        started = time.monotonic()
        d = ShimDoor(str(shim_lib))  # hello gets no answer: the daemon counts as absent
        try:
            assert d.C_GetSlotList(False) == []
        finally:
            d.close()
        assert time.monotonic() - started < 3
    finally:
        server.close()


def test_sessions_run_concurrently(tmp_path: Path, shim_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = Daemon(tmp_path)
    config = daemon.config.read_text(encoding="utf-8")
    daemon.config.write_text(
        config.replace(
            "provider: memory",
            "provider: memory\n  options:\n    scenarios:\n    - operations: [C_GenerateRandom]\n      latency_ms: 400",
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("KEYGRID_SOCKET", str(daemon.socket))
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(tmp_path / "absent.conf"))
    daemon.start()
    d = ShimDoor(str(shim_lib))
    try:
        sessions = [d.C_OpenSession(0, RW) for _ in range(4)]
        results: list[bytes] = []

        def work(session: int) -> None:
            results.append(d.C_GenerateRandom(session, 16))

        threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - started
        assert len(results) == 4
        assert elapsed < 1.2, f"4 calls of 400 ms took {elapsed:.2f} s: not concurrent"
    finally:
        d.close()
        daemon.stop()


def test_debug_log_never_shows_pins_or_values(
    daemon: Daemon, shim_lib: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KEYGRID_PKCS11_DEBUG", "1")
    d = ShimDoor(str(shim_lib))
    try:
        session = d.C_OpenSession(0, RW)
        with pytest.raises(PinIncorrect):
            d.C_Login(session, CKU.USER, b"99999999")
        d.C_Login(session, CKU.USER, USER_PIN.encode())
        secret = b"TOP-SECRET-VALUE-42"
        handle = d.C_CreateObject(session, [(CKA.CLASS, CKO.DATA), (CKA.TOKEN, False), (CKA.VALUE, secret)])
        assert d.C_GetAttributeValue(session, handle, [CKA.VALUE]) == [secret]
    finally:
        d.close()
    err = capfd.readouterr().err
    assert "C_Login -> CK_RV 0x0" in err and "C_CreateObject" in err
    for secret_text in (USER_PIN, "99999999", SO_PIN, "TOP-SECRET", secret.hex()):
        assert secret_text not in err


def test_many_threads_share_one_application(door: ShimDoor) -> None:
    """Threads on their own sessions, over the connection pool, all in one application (one login)."""
    session = logged_in(door)
    public, private = ec_key(door, session)

    def work() -> None:
        mine = door.C_OpenSession(0, RW)  # already logged in: the login belongs to the application
        for i in range(30):
            digest = bytes([i]) * 32
            door.C_SignInit(mine, CKM.ECDSA, private)
            signature = door.C_Sign(mine, digest)
            door.C_VerifyInit(mine, CKM.ECDSA, public)
            door.C_Verify(mine, digest, signature)
        door.C_CloseSession(mine)

    assert not in_threads(work, 8)
    assert door.C_GetTokenInfo(0)["session_count"] == 1
