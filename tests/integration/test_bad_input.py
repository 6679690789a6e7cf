"""Bad input against a real keygridd, byte by byte over raw sockets.

Every case ends with the same check: a client connected before the bad input
(the "witness") still gets correct answers (its slot list, and a fresh ECDSA
signature that verifies), so one misbehaving peer never hurts the others.
A framing or handshake error must give ``[2, 0, rv, message]`` and then the
close; any other bad request gets its CKR and the connection stays usable.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKM, CKO, CKR, CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from tests.conftest import SO_PIN, USER_PIN, RunningDaemon, Starter

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
MAX_FRAME = 4096
MAX_ATTRIBUTES = 8
SLOW_SLOT = 2
TIMEOUT = 5.0

CONFIG = f"""
server:
  socket: "{{socket}}"
  max_frame_bytes: {MAX_FRAME}
  max_attributes: {MAX_ATTRIBUTES}
  shutdown_grace_seconds: 1
slots:
  - id: 0
    provider: memory
    token: {{label: bad-input, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
  - id: 1
    provider: memory
  - id: {SLOW_SLOT}
    provider: memory
    token: {{label: slow, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
    options: {{scenarios: [{{operations: [C_Sign], latency_ms: 400}}]}}
"""


# --- raw wire helpers -------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> Any:
    (length,) = struct.unpack(">I", recv_exactly(sock, 4))
    return msgpack.unpackb(recv_exactly(sock, length), raw=False, strict_map_key=False)


def send_message(sock: socket.socket, value: Any) -> None:
    sock.sendall(frame(pack(value)))


def hello_request(msgid: int = 1, **fields: Any) -> list[Any]:
    request = {"versions": [1, 1], "features": [], "app_id": None, **fields}
    return [0, msgid, "hello", [request]]


def handshake(sock: socket.socket) -> dict[str, Any]:
    send_message(sock, hello_request())
    reply = recv_message(sock)
    assert reply[:3] == [1, 1, CKR.OK], reply
    result: dict[str, Any] = reply[3]
    return result


def call(sock: socket.socket, msgid: int, method: Any, args: Any) -> tuple[int, Any]:
    """One request on an established connection; the reply's (rv, result)."""
    send_message(sock, [0, msgid, method, args])
    reply = recv_message(sock)
    assert isinstance(reply, list) and len(reply) == 5 and reply[0] == 1, reply
    assert reply[1] == msgid, reply
    return reply[2], reply[3]


def assert_closed(sock: socket.socket) -> None:
    """The daemon closed its side: EOF (or a reset), and nothing more."""
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass


def assert_fatal_then_close(sock: socket.socket) -> str:
    message = recv_message(sock)
    assert isinstance(message, list) and len(message) == 4, message
    assert message[:3] == [2, 0, CKR.ARGUMENTS_BAD], message
    assert isinstance(message[3], str) and message[3], message
    assert_closed(sock)
    return message[3]


def assert_usable(sock: socket.socket, msgid: int = 999) -> None:
    assert call(sock, msgid, "KG_Ping", []) == (CKR.OK, None)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_daemon(daemon_factory: Starter) -> RunningDaemon:
    return daemon_factory(CONFIG, name="bad-input")


class Witness:
    """A well-behaved client connected while the bad input happens."""

    def __init__(self, running: RunningDaemon) -> None:
        self.running = running
        self.client = Client(running.socket, timeout=TIMEOUT)
        self.session = self.client.C_OpenSession(0, RW)
        self.client.C_Login(self.session, CKU.USER, USER_PIN)
        self.public, self.private = self.client.C_GenerateKeyPair(
            self.session, CKM.EC_KEY_PAIR_GEN, {CKA.EC_PARAMS: P256, CKA.VERIFY: True}, {CKA.SIGN: True}
        )

    def check(self) -> None:
        assert self.running.process.poll() is None, self.running.log()
        assert self.client.C_GetSlotList(False) == [0, 1, SLOW_SLOT]
        digest = bytes(range(32))
        self.client.C_SignInit(self.session, CKM.ECDSA, self.private)
        signature = self.client.C_Sign(self.session, digest)
        assert len(signature) == 64
        self.client.C_VerifyInit(self.session, CKM.ECDSA, self.public)
        self.client.C_Verify(self.session, digest, signature)
        # A brand-new connection is served too.
        with Client(self.running.socket, timeout=TIMEOUT) as fresh:
            assert fresh.KG_Ping() is None


@pytest.fixture
def witness(bad_daemon: RunningDaemon) -> Iterator[Witness]:
    w = Witness(bad_daemon)
    yield w
    w.client.close()


@pytest.fixture
def raw(bad_daemon: RunningDaemon) -> Iterator[socket.socket]:
    sock = connect(bad_daemon.socket)
    yield sock
    sock.close()


@pytest.fixture
def ready(raw: socket.socket) -> socket.socket:
    """A raw connection past the handshake."""
    handshake(raw)
    return raw


# --- framing ---------------------------------------------------------------------------------------

MALFORMED_BODIES = {
    "never-used-byte": b"\xc1",
    "truncated-array": b"\x94\x00\x01",
    "array32-claims-4G-items": b"\xdd\xff\xff\xff\xff",
    "two-values": b"\x90\x90",
    "unhashable-map-key": b"\x81\x90\x00",
    "truncated-str": b"\xa5ab",
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
@pytest.mark.parametrize("when", ["first", "after-hello"])
def test_malformed_messagepack_is_fatal(raw: socket.socket, witness: Witness, body: bytes, when: str) -> None:
    if when == "after-hello":
        handshake(raw)
    raw.sendall(frame(body))
    assert "MessagePack" in assert_fatal_then_close(raw)
    witness.check()


@pytest.mark.parametrize("shutdown", [True, False], ids=["half-close", "close"])
def test_truncated_frame_then_close(bad_daemon: RunningDaemon, witness: Witness, shutdown: bool) -> None:
    sock = connect(bad_daemon.socket)
    handshake(sock)
    body = pack([0, 2, "KG_Ping", []])
    sock.sendall(struct.pack(">I", len(body) + 10) + body)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
        assert "inside a frame" in assert_fatal_then_close(sock)
    sock.close()
    witness.check()


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 1 << 31, 0xFFFFFFFF])
@pytest.mark.parametrize("when", ["first", "after-hello"])
def test_oversized_length_is_fatal_from_the_header_alone(
    raw: socket.socket, witness: Witness, length: int, when: str
) -> None:
    if when == "after-hello":
        handshake(raw)
    raw.sendall(struct.pack(">I", length))  # only the header: the daemon must not wait for the body
    assert str(length) in assert_fatal_then_close(raw)
    witness.check()


@pytest.mark.parametrize("when", ["first", "after-hello"])
def test_zero_length_frame_is_fatal(raw: socket.socket, witness: Witness, when: str) -> None:
    if when == "after-hello":
        handshake(raw)
    raw.sendall(b"\x00\x00\x00\x00")
    assert_fatal_then_close(raw)
    witness.check()


def test_largest_frame_is_accepted(ready: socket.socket, witness: Witness) -> None:
    """A request of exactly max_frame_bytes is read (and refused by its CKR, not by framing)."""
    base = pack([0, 5, "C_SeedRandom", [1, b""]])
    padding = MAX_FRAME - len(base) - 1  # the bin8 header (2 bytes) becomes bin16 (3 bytes)
    body = pack([0, 5, "C_SeedRandom", [1, b"\x00" * padding]])
    assert len(body) == MAX_FRAME
    ready.sendall(frame(body))
    reply = recv_message(ready)
    assert reply[:3] == [1, 5, CKR.SESSION_HANDLE_INVALID]
    assert_usable(ready)
    witness.check()


def test_reply_over_the_frame_limit_is_an_error_not_a_close(bad_daemon: RunningDaemon, witness: Witness) -> None:
    with Client(bad_daemon.socket, timeout=TIMEOUT) as client:
        session = client.C_OpenSession(0, RW)
        rv, result = client.call_raw("C_GenerateRandom", session, MAX_FRAME)
        assert rv == CKR.DEVICE_MEMORY and result is None
        assert len(client.C_GenerateRandom(session, 64)) == 64
    witness.check()


# --- handshake ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        [0, 1, "C_GetSlotList", [False]],
        [0, 1, "KG_Ping", []],
        [0, 1, "hello", []],
        [0, 1, "hello", [{"versions": [1, 1]}, None]],
        [0, 1, "hello", ["versions"]],
        [0, 1, "hello", {"versions": [1, 1]}],
        [1, 1, "hello", [{"versions": [1, 1]}]],
        {"method": "hello"},
        "hello",
        None,
    ],
    ids=["slot-list", "ping", "no-args", "two-args", "str-arg", "map-args", "response-type", "map", "str", "nil"],
)
def test_first_request_must_be_hello(raw: socket.socket, witness: Witness, request_: Any) -> None:
    send_message(raw, request_)
    assert_fatal_then_close(raw)
    witness.check()


@pytest.mark.parametrize(
    "fields",
    [{"versions": "1"}, {"versions": [1]}, {"versions": [1, 1, 1]}, {"versions": ["1", "1"]}, {"versions": None}],
    ids=["str", "one", "three", "strings", "nil"],
)
def test_hello_with_malformed_versions_is_fatal(raw: socket.socket, witness: Witness, fields: dict[str, Any]) -> None:
    send_message(raw, hello_request(**fields))
    assert "versions" in assert_fatal_then_close(raw)
    witness.check()


@pytest.mark.parametrize("versions", [[2, 3], [0, 0]])
def test_hello_without_a_common_version_fails_and_closes(
    raw: socket.socket, witness: Witness, versions: list[int]
) -> None:
    send_message(raw, hello_request(versions=versions))
    reply = recv_message(raw)
    assert reply[:3] == [1, 1, CKR.FUNCTION_FAILED] and reply[3] is None, reply
    assert_fatal_then_close(raw)
    witness.check()


@pytest.mark.parametrize("app_id", ["abc", 12, [1, 2], {"a": 1}, True])
def test_hello_with_app_id_of_the_wrong_type_is_fatal(raw: socket.socket, witness: Witness, app_id: Any) -> None:
    send_message(raw, hello_request(app_id=app_id))
    assert "app_id" in assert_fatal_then_close(raw)
    witness.check()


def test_hello_twice_is_an_unknown_method(ready: socket.socket, witness: Witness) -> None:
    rv, _ = call(ready, 2, "hello", [{"versions": [1, 1]}])
    assert rv == CKR.FUNCTION_NOT_SUPPORTED
    assert_usable(ready)
    witness.check()


# --- requests after the handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["C_Bogus", "c_getslotlist", "", 7, None, b"C_GetSlotList", ["C_GetInfo"]])
def test_unknown_method(ready: socket.socket, witness: Witness, method: Any) -> None:
    rv, result = call(ready, 2, method, [])
    assert (rv, result) == (CKR.FUNCTION_NOT_SUPPORTED, None)
    assert_usable(ready)
    witness.check()


BAD_ARGUMENTS = {
    "missing": ("C_GetSlotInfo", []),
    "extra": ("C_GetSlotInfo", [0, 1]),
    "none-for-list": ("C_GetSlotInfo", None),
    "map-for-list": ("C_GetSlotInfo", {"slot": 0}),
    "int-for-list": ("C_GetInfo", 0),
    "str-for-ulong": ("C_GetSlotInfo", ["0"]),
    "negative-ulong": ("C_GetSlotInfo", [-1]),
    "bool-for-ulong": ("C_GetSlotInfo", [True]),
    "float-for-ulong": ("C_GetSlotInfo", [0.0]),
    "bytes-for-ulong": ("C_GetSlotInfo", [b"\x00"]),
    "int-for-bool": ("C_GetSlotList", [1]),
    "nil-for-bool": ("C_GetSlotList", [None]),
    "str-for-bytes": ("C_Login", [1, CKU.USER, USER_PIN.decode()]),
    "nil-for-bytes": ("C_Login", [1, CKU.USER, None]),
    "bytes-for-str": ("KG_GetPublicKey", [b"pkcs11:", None]),
    "str-for-bytes?": ("KG_GetPublicKey", ["pkcs11:", "pin"]),
    "str-for-outlen": ("C_Sign", [1, b"data", "64"]),
    "minus-two-outlen": ("C_Sign", [1, b"data", -2]),
    "template-not-list": ("C_CreateObject", [1, {"3": b"x"}]),
    "template-entry-short": ("C_CreateObject", [1, [[CKA.LABEL]]]),
    "template-entry-str-type": ("C_CreateObject", [1, [["CKA_LABEL", b"x"]]]),
    "types-not-list": ("C_GetAttributeValue", [1, 1, 3]),
    "types-str-item": ("C_GetAttributeValue", [1, 1, ["CKA_LABEL"]]),
    "mechanism-not-list": ("C_DigestInit", [1, CKM.SHA256]),
    "mechanism-one-item": ("C_DigestInit", [1, [CKM.SHA256]]),
    "mechanism-str": ("C_DigestInit", [1, ["CKM_SHA256", None]]),
}


@pytest.mark.parametrize("method, args", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_wrong_argument_count_or_type(ready: socket.socket, witness: Witness, method: str, args: Any) -> None:
    rv, result = call(ready, 2, method, args)
    assert (rv, result) == (CKR.ARGUMENTS_BAD, None)
    assert_usable(ready)
    witness.check()


def open_raw_session(sock: socket.socket, slot: int = 0) -> int:
    rv, session = call(sock, 100, "C_OpenSession", [slot, RW])
    assert rv == CKR.OK
    assert isinstance(session, int)
    return session


def test_template_over_max_attributes(ready: socket.socket, witness: Witness) -> None:
    session = open_raw_session(ready)
    attrs = [[CKA.CLASS, CKO.DATA], [CKA.TOKEN, False], [CKA.PRIVATE, False], [CKA.MODIFIABLE, True],
             [CKA.LABEL, b"limit"], [CKA.APPLICATION, b"kg"], [CKA.VALUE, b"v"], [CKA.OBJECT_ID, b"\x06\x00"]]  # fmt: skip
    assert len(attrs) == MAX_ATTRIBUTES
    rv, handle = call(ready, 2, "C_CreateObject", [session, attrs])
    assert rv == CKR.OK and isinstance(handle, int)  # exactly at the limit: served
    rv, result = call(ready, 3, "C_CreateObject", [session, [*attrs, [CKA.COPYABLE, True]]])
    assert (rv, result) == (CKR.ARGUMENTS_BAD, None)
    rv, result = call(ready, 4, "C_FindObjectsInit", [session, [[CKA.LABEL, b"limit"]] * (MAX_ATTRIBUTES + 1)])
    assert (rv, result) == (CKR.ARGUMENTS_BAD, None)
    rv, result = call(ready, 5, "C_GetAttributeValue", [session, handle, [CKA.LABEL] * (MAX_ATTRIBUTES + 1)])
    assert (rv, result) == (CKR.ARGUMENTS_BAD, None)
    rv, result = call(ready, 6, "C_GetAttributeValue", [session, handle, [CKA.LABEL] * MAX_ATTRIBUTES])
    assert (rv, result) == (CKR.OK, [b"limit"] * MAX_ATTRIBUTES)
    assert_usable(ready)
    witness.check()


WRONG_KINDS = {
    "token-as-bytes": [[CKA.CLASS, CKO.DATA], [CKA.TOKEN, b"\x01"]],
    "token-as-int": [[CKA.CLASS, CKO.DATA], [CKA.TOKEN, 1]],
    "class-as-bytes": [[CKA.CLASS, b"\x00\x00\x00\x00"]],
    "class-negative": [[CKA.CLASS, -1]],
    "label-as-str": [[CKA.CLASS, CKO.DATA], [CKA.LABEL, "text"]],
    "allowed-mechanisms-as-bytes": [[CKA.CLASS, CKO.DATA], [CKA.ALLOWED_MECHANISMS, b"\x01"]],
}


@pytest.mark.parametrize("template", WRONG_KINDS.values(), ids=WRONG_KINDS.keys())
def test_template_value_of_the_wrong_kind(ready: socket.socket, witness: Witness, template: list[Any]) -> None:
    session = open_raw_session(ready)
    rv, result = call(ready, 2, "C_CreateObject", [session, template])
    assert (rv, result) == (CKR.ATTRIBUTE_VALUE_INVALID, None)
    assert_usable(ready)
    witness.check()


BAD_PARAMS = {
    "str": [CKM.ECDSA, "param"],
    "int": [CKM.ECDSA, 5],
    "map": [CKM.ECDSA, {"iv": b""}],
    "empty-list": [CKM.AES_GCM, []],
    "unknown-type": [CKM.AES_GCM, [99, b"iv"]],
    "gcm-too-few-fields": [CKM.AES_GCM, [1, b"\x00" * 12]],
    "gcm-too-many-fields": [CKM.AES_GCM, [1, b"\x00" * 12, 96, b"", 128, 0]],
    "gcm-str-field": [CKM.AES_GCM, [1, b"\x00" * 12, "96", b"", 128]],
    "pss-negative": [CKM.SHA256_RSA_PKCS_PSS, [3, CKM.SHA256, 2, -1]],
    "eddsa-int-flag": [CKM.EDDSA, [6, 1, b""]],
    "ulong-bytes": [CKM.SHA256_HMAC_GENERAL, [7, b"\x20"]],
}


@pytest.mark.parametrize("mechanism", BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_malformed_mechanism_parameter(ready: socket.socket, witness: Witness, mechanism: list[Any]) -> None:
    session = open_raw_session(ready)
    rv, result = call(ready, 2, "C_SignInit", [session, mechanism, 1])
    assert (rv, result) == (CKR.MECHANISM_PARAM_INVALID, None)
    assert_usable(ready)
    witness.check()


def test_handles_of_another_connection(bad_daemon: RunningDaemon, witness: Witness) -> None:
    with Client(bad_daemon.socket, timeout=TIMEOUT) as owner, Client(bad_daemon.socket, timeout=TIMEOUT) as other:
        session = owner.C_OpenSession(0, RW)
        obj = owner.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: False, CKA.LABEL: b"mine"})
        token_obj = owner.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.LABEL: b"shared"})
        for method, args in [
            ("C_GetSessionInfo", (session,)),
            ("C_CloseSession", (session,)),
            ("C_GenerateRandom", (session, 16)),
            ("C_GetAttributeValue", (session, obj, [CKA.LABEL])),
            ("C_DestroyObject", (session, obj)),
        ]:
            assert other.call_raw(method, *args) == (CKR.SESSION_HANDLE_INVALID, None), method
        other_session = other.C_OpenSession(0, RW)
        for handle in (obj, token_obj, obj + 100):
            for method, args in [
                ("C_GetAttributeValue", (other_session, handle, [CKA.LABEL])),
                ("C_DestroyObject", (other_session, handle)),
                ("C_GetObjectSize", (other_session, handle)),
            ]:
                assert other.call_raw(method, *args)[0] == CKR.OBJECT_HANDLE_INVALID, (method, handle)
        # The owner's handles are untouched by the other connection's attempts.
        assert owner.C_GetAttributeValue(session, obj, [CKA.LABEL]) == [b"mine"]
        owner.C_DestroyObject(session, token_obj)
    witness.check()


def test_client_disconnects_mid_call(bad_daemon: RunningDaemon, witness: Witness) -> None:
    client = Client(bad_daemon.socket, timeout=TIMEOUT)
    session = client.C_OpenSession(SLOW_SLOT, RW)
    client.C_Login(session, CKU.USER, USER_PIN)
    _, private = client.C_GenerateKeyPair(session, CKM.EC_KEY_PAIR_GEN, {CKA.EC_PARAMS: P256}, {CKA.SIGN: True})
    client.C_SignInit(session, CKM.ECDSA, private)
    _, request = client._proto.request("C_Sign", [session, bytes(32), None])
    client._sock.sendall(request)  # in flight for 400 ms on the daemon
    client.close()
    witness.check()
    # The slow slot itself still serves a new application.
    with Client(bad_daemon.socket, timeout=TIMEOUT) as again:
        s = again.C_OpenSession(SLOW_SLOT, RW)
        again.C_Login(s, CKU.USER, USER_PIN)
        assert again.C_GetSessionInfo(s)["slot_id"] == SLOW_SLOT
    assert "Traceback" not in bad_daemon.log()


@pytest.mark.parametrize("msgid", ["1", None, 1.5, b"\x01", [1], {"id": 1}])
def test_request_id_not_an_integer(ready: socket.socket, witness: Witness, msgid: Any) -> None:
    send_message(ready, [0, msgid, "KG_Ping", []])
    assert "id" in assert_fatal_then_close(ready)
    witness.check()


@pytest.mark.parametrize(
    "message",
    [
        {"method": "KG_Ping"},
        "KG_Ping",
        0,
        None,
        b"\x00",
        [],
        [0, 2, "KG_Ping"],
        [0, 2, "KG_Ping", [], 0],
        [1, 2, "KG_Ping", []],
        [2, 0, 0, "bye"],
    ],
    ids=["map", "str", "int", "nil", "bin", "empty", "three", "five", "response", "fatal"],
)
def test_non_request_after_hello(ready: socket.socket, witness: Witness, message: Any) -> None:
    send_message(ready, message)
    assert_fatal_then_close(ready)
    witness.check()


def test_pipelined_garbage_after_a_good_request(ready: socket.socket, witness: Witness) -> None:
    """A good request and a malformed frame in one write: the good one may be answered, then FATAL."""
    ready.sendall(frame(pack([0, 2, "KG_Ping", []])) + frame(b"\xc1"))
    message = recv_message(ready)
    if message[0] == 1:
        assert message[:3] == [1, 2, CKR.OK]
        message = recv_message(ready)
    assert message[:3] == [2, 0, CKR.ARGUMENTS_BAD]
    assert_closed(ready)
    witness.check()


def try_join(path: str, app_id: bytes) -> bool:
    """Whether a hello joining ``app_id`` is accepted (it is refused once the application is gone)."""
    with connect(path) as sock:
        send_message(sock, hello_request(app_id=app_id))
        reply = recv_message(sock)
        if reply[0] == 2:
            assert_closed(sock)
            return False
        assert reply[:3] == [1, 1, CKR.OK]
        return True


@pytest.mark.parametrize("when", ["unread-replies", "closed-after-hello"])
def test_peer_reset_does_not_stop_the_daemon(daemon_factory: Starter, when: str) -> None:
    running = daemon_factory(CONFIG, name="reset")
    w = Witness(running)
    try:
        sock = connect(running.socket)
        if when == "unread-replies":
            app_id = handshake(sock)["app_id"]
            for msgid in range(2, 12):
                send_message(sock, [0, msgid, "KG_Ping", []])
            sock.recv(1, socket.MSG_PEEK)  # replies are waiting, unread: closing now resets the connection
            sock.close()
            # The daemon ends that connection's application: poll until a join is refused.
            deadline = time.monotonic() + TIMEOUT
            while try_join(running.socket, app_id):
                assert time.monotonic() < deadline
        else:
            send_message(sock, hello_request())
            sock.close()  # the daemon's hello reply meets a closed socket
            # Nothing tells when the daemon has met the closed socket: keep checking for a while.
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and running.process.poll() is None:
                w.check()
        w.check()
        assert "Traceback" not in running.log()
    finally:
        w.client.close()
