"""The server part of keygridd against a real daemon: peer credentials and slot
ACLs, applications (session objects, joining by ``app_id``), concurrency and
back-pressure.

Peers with other credentials are made by forking: the child drops to the
wanted uid/gid/groups, connects (``SO_PEERCRED`` is taken at connect time),
hands the connected socket to the test over ``SCM_RIGHTS`` and stays alive
until the test is done with it (the daemon reads the peer's supplementary
groups from ``/proc/PID/status``).
"""

from __future__ import annotations

import contextlib
import gc
import grp
import os
import pwd
import socket
import struct
import time
import warnings
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from keygridd.client import Client
from keygridd.client.protocol import ProtocolError
from keygridd.client.trio_client import open_client
from keygridd.pkcs11 import CKA, CKM, CKO, CKR, CKS, CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.pkcs11.errorbase import PKCS11Error
from tests.conftest import RESTRICTED_UID, SO_PIN, USER_PIN, RunningDaemon, Starter

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
TIMEOUT = 5.0
SLOW_SLOT = 2
LATENCY = 0.5
OTHER_UID, OTHER_GID, OTHER_GROUP = 4242, 4343, 4444

MY_USER = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name
NOT_MY_GID = next(g for g in range(4300, 4400) if g != os.getgid() and g not in os.getgroups())

TOKEN = f'{{label: server, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}'
CONFIG = f"""
server:
  socket: "{{socket}}"
  socket_mode: "0666"
  shutdown_grace_seconds: 1
slots:
  - id: 0
    provider: memory
    token: {TOKEN}
  - id: {SLOW_SLOT}
    provider: memory
    token: {TOKEN}
    options: {{scenarios: [{{operations: [C_Sign], latency_ms: {int(LATENCY * 1000)}}}]}}
  - id: 3
    provider: memory
    access: {{uids: [{os.getuid()}]}}
  - id: 4
    provider: memory
    access: {{users: [{MY_USER}]}}
  - id: 5
    provider: memory
    access: {{groups: [{MY_GROUP}]}}
  - id: 6
    provider: memory
    access: {{gids: [{NOT_MY_GID}]}}
  - id: 7
    provider: memory
    access: {{uids: [{OTHER_UID}]}}
  - id: 8
    provider: memory
    access: {{gids: [{OTHER_GID}]}}
  - id: 9
    provider: memory
    access: {{groups: [{OTHER_GROUP}]}}
"""
MINE = [0, SLOW_SLOT, 3, 4, 5]


@pytest.fixture(scope="module")
def served(daemon_factory: Starter) -> RunningDaemon:
    running = daemon_factory(CONFIG, name="server")
    # Let other uids reach the 0666 socket: the fixture's directories are 0700.
    directory = os.path.dirname(running.socket)
    os.chmod(directory, 0o711)
    os.chmod(os.path.dirname(directory), 0o711)
    return running


# --- raw wire helpers ---------------------------------------------------------------------------------


def send_message(sock: socket.socket, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


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


def raw_call(sock: socket.socket, msgid: int, method: str, args: list[Any]) -> tuple[int, Any]:
    send_message(sock, [0, msgid, method, args])
    reply = recv_message(sock)
    assert reply[:2] == [1, msgid], reply
    return reply[2], reply[3]


def raw_hello(sock: socket.socket, app_id: bytes | None = None) -> Any:
    send_message(sock, [0, 1, "hello", [{"versions": [1, 1], "features": [], "app_id": app_id}]])
    return recv_message(sock)


def assert_fatal_then_close(sock: socket.socket) -> None:
    message = recv_message(sock)
    assert message[:3] == [2, 0, CKR.ARGUMENTS_BAD], message
    assert sock.recv(1) == b""


@contextlib.contextmanager
def connected_as(path: str, uid: int | None = None, gid: int | None = None,
                 groups: list[int] | None = None) -> Iterator[socket.socket]:  # fmt: skip
    """A socket connected to ``path`` by a forked child with these credentials."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.settimeout(TIMEOUT)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            parent.close()
            if groups is not None:
                os.setgroups(groups)
            if gid is not None:
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            socket.send_fds(child, [b"ok"], [sock.fileno()])
            child.recv(1)  # stay alive (with our pid and groups) until the test is done
            code = 0
        finally:
            os._exit(code)
    child.close()
    try:
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        assert len(fds) == 1, "the child could not connect"
        sock = socket.socket(fileno=fds[0])
        sock.settimeout(TIMEOUT)
        with sock:
            yield sock
    finally:
        parent.close()  # the child's recv returns: it exits
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def make_signing_key(client: Client, session: int) -> tuple[int, int]:
    public, private = client.C_GenerateKeyPair(
        session, CKM.EC_KEY_PAIR_GEN, {CKA.EC_PARAMS: P256, CKA.VERIFY: True}, {CKA.SIGN: True}
    )
    return public, private


# --- peer credentials and slot ACLs ---------------------------------------------------------------------


def test_restricted_slot_is_invisible_on_the_shared_daemon(daemon: RunningDaemon) -> None:
    with Client(daemon.socket, timeout=TIMEOUT) as client:
        assert os.getuid() != RESTRICTED_UID
        assert 7 not in client.C_GetSlotList(False)
        assert 7 not in client.C_GetSlotList(True)
        assert 7 not in [s["slot_id"] for s in client.KG_Status()["slots"]]
        for method, args in [
            ("C_GetSlotInfo", (7,)),
            ("C_GetTokenInfo", (7,)),
            ("C_GetMechanismList", (7,)),
            ("C_OpenSession", (7, RW)),
            ("C_CloseAllSessions", (7,)),
            ("C_InitToken", (7, SO_PIN, b"x".ljust(32))),
        ]:
            assert client.call_raw(method, *args) == (CKR.SLOT_ID_INVALID, None), method
        assert client.call_raw("C_GetSlotInfo", 0)[0] == CKR.OK


def test_access_lists_by_uid_user_and_group_name(served: RunningDaemon) -> None:
    with Client(served.socket, timeout=TIMEOUT) as client:
        assert client.C_GetSlotList(False) == MINE
        assert [s["slot_id"] for s in client.KG_Status()["slots"]] == MINE
        for slot in (3, 4, 5):
            assert client.call_raw("C_GetSlotInfo", slot)[0] == CKR.OK
        for slot in (6, 7, 8, 9):
            assert client.call_raw("C_GetSlotInfo", slot) == (CKR.SLOT_ID_INVALID, None)
            assert client.call_raw("C_OpenSession", slot, RW) == (CKR.SLOT_ID_INVALID, None)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect with other credentials")
@pytest.mark.parametrize(
    "uid, gid, groups, visible",
    [
        (OTHER_UID, 65534, [], [0, SLOW_SLOT, 7]),
        (4243, OTHER_GID, [], [0, SLOW_SLOT, 8]),
        (4243, 65534, [OTHER_GROUP], [0, SLOW_SLOT, 9]),
        (OTHER_UID, OTHER_GID, [OTHER_GROUP], [0, SLOW_SLOT, 7, 8, 9]),
    ],
    ids=["uid", "primary-gid", "supplementary-group", "all"],
)
def test_peer_credentials_decide_slot_visibility(
    served: RunningDaemon, uid: int, gid: int, groups: list[int], visible: list[int]
) -> None:
    with connected_as(served.socket, uid=uid, gid=gid, groups=groups) as sock:
        assert raw_hello(sock)[:3] == [1, 1, CKR.OK]
        assert raw_call(sock, 2, "C_GetSlotList", [False]) == (CKR.OK, visible)
        for slot in (3, 4, 5, 6):  # ours by uid / user / group: not theirs
            assert raw_call(sock, 3, "C_GetSlotInfo", [slot]) == (CKR.SLOT_ID_INVALID, None)
        assert raw_call(sock, 4, "C_GetSlotInfo", [visible[-1]])[0] == CKR.OK


# --- applications ------------------------------------------------------------------------------------------


def find_labels(client: Client, session: int, label: bytes) -> list[int]:
    client.C_FindObjectsInit(session, {CKA.LABEL: label})
    try:
        found: list[int] = client.C_FindObjects(session, 100)
    finally:
        client.C_FindObjectsFinal(session)
    return found


def try_join(path: str, app_id: bytes) -> bool:
    """Whether a hello with ``app_id`` is accepted (raw socket: a refused hello is FATAL then close)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    with sock:
        sock.connect(path)
        reply = raw_hello(sock, app_id)
        if reply[0] == 2:
            assert sock.recv(1) == b""
            return False
        assert reply[:3] == [1, 1, CKR.OK]
        return True


def test_session_objects_belong_to_the_application(served: RunningDaemon) -> None:
    label = os.urandom(8).hex().encode()
    first = Client(served.socket, timeout=TIMEOUT)
    joined = Client(served.socket, app_id=first.app_id, timeout=TIMEOUT)
    session = first.C_OpenSession(0, RW)
    obj = first.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: False, CKA.LABEL: label})
    with Client(served.socket, timeout=TIMEOUT) as other:
        other_session = other.C_OpenSession(0, RW)
        assert find_labels(other, other_session, label) == []
        assert other.call_raw("C_GetAttributeValue", other_session, obj, [CKA.LABEL])[0] == CKR.OBJECT_HANDLE_INVALID
        # The same search finds a token object: the search itself works.
        token_obj = first.C_CreateObject(session, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.LABEL: label + b"-t"})
        assert len(find_labels(other, other_session, label + b"-t")) == 1
        first.C_DestroyObject(session, token_obj)
        # The application's other connection sees the session object.
        assert find_labels(joined, session, label) == [obj]
        first.close()
        assert find_labels(joined, session, label) == [obj]  # the application lives on in `joined`
        joined.close()
        # Every connection of the application is closed: the application and its objects are gone
        # (the daemon notices the close asynchronously: poll until a join is refused).
        deadline = time.monotonic() + TIMEOUT
        while try_join(served.socket, first.app_id):
            assert time.monotonic() < deadline, "the application outlived its connections"
        assert find_labels(other, other_session, label) == []


def test_join_by_app_id_shares_sessions_and_login(served: RunningDaemon) -> None:
    with Client(served.socket, timeout=TIMEOUT) as first:
        session = first.C_OpenSession(0, RW)
        first.C_Login(session, CKU.USER, USER_PIN)
        public, private = make_signing_key(first, session)
        with Client(served.socket, app_id=first.app_id, timeout=TIMEOUT) as second:
            assert second.app_id == first.app_id
            info = second.C_GetSessionInfo(session)
            assert info["state"] == CKS.RW_USER_FUNCTIONS and info["slot_id"] == 0
            second.C_SignInit(session, CKM.ECDSA, private)
            signature = second.C_Sign(session, bytes(32))
            first.C_VerifyInit(session, CKM.ECDSA, public)
            first.C_Verify(session, bytes(32), signature)
            second.C_Logout(session)
            assert first.C_GetSessionInfo(session)["state"] == CKS.RW_PUBLIC_SESSION
        # second is gone, the application (first) keeps its session
        assert first.C_GetSessionInfo(session)["slot_id"] == 0
        with Client(served.socket, timeout=TIMEOUT) as stranger:
            assert stranger.call_raw("C_GetSessionInfo", session) == (CKR.SESSION_HANDLE_INVALID, None)


@pytest.mark.parametrize("app_id", [b"\x00" * 16, b"", b"x" * 1000], ids=["zeros", "empty", "long"])
def test_forged_app_id_is_refused(served: RunningDaemon, app_id: bytes) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    with sock:
        sock.connect(served.socket)
        send_message(sock, [0, 1, "hello", [{"versions": [1, 1], "features": [], "app_id": app_id}]])
        assert_fatal_then_close(sock)


def test_sync_client_raises_and_closes_its_socket_when_the_hello_is_refused(served: RunningDaemon) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ProtocolError, match="application"):
            Client(served.socket, app_id=b"\x00" * 16, timeout=TIMEOUT)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_app_id_of_another_process_is_refused(served: RunningDaemon) -> None:
    """Knowing an app id is not enough: the joining peer must be the same process."""
    with Client(served.socket, timeout=TIMEOUT) as first:
        session = first.C_OpenSession(0, RW)
        with connected_as(served.socket) as sock:
            send_message(sock, [0, 1, "hello", [{"versions": [1, 1], "features": [], "app_id": first.app_id}]])
            assert_fatal_then_close(sock)
        assert first.C_GetSessionInfo(session)["slot_id"] == 0


# --- concurrency -----------------------------------------------------------------------------------------


async def slow_signing_session(c: Any) -> tuple[int, int]:
    session = await c.call("C_OpenSession", SLOW_SLOT, RW)
    await c.call("C_Login", session, CKU.USER, USER_PIN)
    _, private = await c.call(
        "C_GenerateKeyPair", session, CKM.EC_KEY_PAIR_GEN, {CKA.EC_PARAMS: P256}, {CKA.SIGN: True}
    )
    await c.call("C_SignInit", session, CKM.ECDSA, private)
    return session, private


async def test_other_session_runs_while_a_slow_call_is_in_flight(served: RunningDaemon) -> None:
    with trio.fail_after(10):
        async with open_client(served.socket) as c, open_client(served.socket) as other:
            slow, _ = await slow_signing_session(c)
            fast = await c.call("C_OpenSession", 0, RW)
            other_session = await other.call("C_OpenSession", 0, RW)
            done: list[str] = []
            sign_done = trio.Event()

            async def sign() -> None:
                signature = await c.call("C_Sign", slow, bytes(32), None)
                assert len(signature) == 64
                done.append("sign")
                sign_done.set()

            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                nursery.start_soon(sign)
                await trio.testing.wait_all_tasks_blocked()  # the C_Sign request is sent
                assert len(await c.call("C_GenerateRandom", fast, 16)) == 16
                done.append("random, same connection")
                assert len(await other.call("C_GenerateRandom", other_session, 16)) == 16
                done.append("random, other connection")
                assert trio.current_time() - start < LATENCY * 0.6
                assert not sign_done.is_set()
                await sign_done.wait()
                assert trio.current_time() - start >= LATENCY * 0.9
            assert done == ["random, same connection", "random, other connection", "sign"]


def test_requests_on_one_session_complete_in_arrival_order(served: RunningDaemon) -> None:
    """Replies are read off the socket in the order the daemon sent them (a client's task wake-ups are not)."""
    with Client(served.socket, timeout=TIMEOUT) as client:
        slow = client.C_OpenSession(SLOW_SLOT, RW)
        client.C_Login(slow, CKU.USER, USER_PIN)
        _, private = make_signing_key(client, slow)
        client.C_SignInit(slow, CKM.ECDSA, private)
        fast = client.C_OpenSession(0, RW)
        requests = [
            ("C_Sign", [slow, bytes(32), None]),  # 0.5 s
            ("C_GenerateRandom", [slow, 16]),  # same session: after the C_Sign
            ("C_GetSessionInfo", [slow]),
            ("C_GenerateRandom", [fast, 16]),  # another session: not held up
        ]
        ids = {}
        frames = b""
        for name, args in requests:
            msgid, frame = client._proto.request(name, args)
            ids[msgid] = f"{name} {'slow' if args[0] == slow else 'fast'}"
            frames += frame
        client._sock.sendall(frames)
        order: list[str] = []
        while len(order) < len(requests):
            reply = client._proto.next_reply()
            if reply is None:
                data = client._sock.recv(65536)
                assert data
                client._proto.feed(data)
                continue
            assert reply[1] == CKR.OK, reply
            order.append(ids[reply[0]])
        assert order == ["C_GenerateRandom fast", "C_Sign slow", "C_GenerateRandom slow", "C_GetSessionInfo slow"]


async def test_hundred_pipelined_requests_with_large_replies(served: RunningDaemon) -> None:
    """More requests than the daemon runs at once, with replies larger than the socket buffers."""
    size = 64 * 1024
    with trio.fail_after(20):
        async with open_client(served.socket) as c:
            session = await c.call("C_OpenSession", 0, RW)
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                results[i] = await c.call("C_GenerateRandom", session, size)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
            assert sorted(results) == list(range(100))
            assert all(len(r) == size for r in results.values())
            assert len(set(results.values())) == 100


def test_hundred_pipelined_requests_in_one_write(served: RunningDaemon) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    with sock:
        sock.connect(served.socket)
        assert raw_hello(sock)[:3] == [1, 1, CKR.OK]
        frames = b""
        for msgid in range(2, 102):
            body = msgpack.packb([0, msgid, "KG_Ping", []], use_bin_type=True)
            frames += struct.pack(">I", len(body)) + body
        sock.sendall(frames)
        replies = [recv_message(sock) for _ in range(100)]
        assert sorted(r[1] for r in replies) == list(range(2, 102))
        assert all(r[0] == 1 and r[2] == CKR.OK for r in replies)


def test_a_client_that_never_reads_does_not_stall_others(served: RunningDaemon) -> None:
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.settimeout(TIMEOUT)
    with greedy, Client(served.socket, timeout=TIMEOUT) as client:
        greedy.connect(served.socket)
        assert raw_hello(greedy)[:3] == [1, 1, CKR.OK]
        session = raw_call(greedy, 2, "C_OpenSession", [0, RW])[1]
        frames = b""
        for msgid in range(10, 210):  # 200 x 64 KiB of replies that nobody reads
            body = msgpack.packb([0, msgid, "C_GenerateRandom", [session, 65536]], use_bin_type=True)
            frames += struct.pack(">I", len(body)) + body
        greedy.sendall(frames)
        own = client.C_OpenSession(0, RW)
        for _ in range(20):
            assert len(client.C_GenerateRandom(own, 32)) == 32
            assert client.C_GetSlotList(False) == MINE
        # Read everything before closing (closing with unread data resets the connection: see
        # test_bad_input.py::test_peer_reset_does_not_stop_the_daemon).
        replies = [recv_message(greedy) for _ in range(200)]
        assert sorted(r[1] for r in replies) == list(range(10, 210))
        assert all(r[2] == CKR.OK and len(r[3]) == 65536 for r in replies)
    with Client(served.socket, timeout=TIMEOUT) as after:
        assert after.KG_Ping() is None


def test_login_state_errors_reach_the_client(served: RunningDaemon) -> None:
    """A sanity check of the error path through the sync client (the exception class of the CKR)."""
    with Client(served.socket, timeout=TIMEOUT) as client:
        session = client.C_OpenSession(0, RW)
        with pytest.raises(PKCS11Error) as info:
            client.C_Login(session, CKU.USER, b"wrong-pin-0000")
        assert info.value.rv == CKR.PIN_INCORRECT
        client.C_Login(session, CKU.USER, USER_PIN)  # resets the failure counter
