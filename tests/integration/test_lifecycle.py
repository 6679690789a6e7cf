"""The daemon's life: start (stale and contested sockets, socket activation,
sd_notify, configuration checks and overrides, socket permissions), shutdown
on SIGTERM/SIGINT, and logs that never carry a PIN.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import keygridd
from keygridd import daemon as daemon_main
from keygridd.client import Client
from keygridd.client.protocol import ProtocolError
from keygridd.pkcs11 import CKA, CKM, CKR, CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from tests.conftest import SO_PIN, USER_PIN, RunningDaemon, Starter, wait_for_socket

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
TIMEOUT = 5.0
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keygrid.yaml.example"
KEYGRIDD = Path(sys.executable).parent / "keygridd"


def config(socket_path: str = "{socket}", server: str = "", slots: str = "", logging: str = "") -> str:
    return f"""
server:
  socket: "{socket_path}"
  shutdown_grace_seconds: 5
{server}
{logging}
slots:
  - id: 0
    provider: memory
    token: {{label: life, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
{slots}"""


SLOW = f"""
  - id: 2
    provider: memory
    token: {{label: slow, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
    options: {{scenarios: [{{operations: [C_Sign], latency_ms: 2000}}]}}
"""


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def ping(path: str) -> None:
    with Client(path, timeout=TIMEOUT) as client:
        assert client.KG_Ping() is None
        assert 0 in client.C_GetSlotList(False)


def send_message(sock: socket.socket, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_message(sock: socket.socket) -> Any:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    (length,) = struct.unpack(">I", exactly(4))
    return msgpack.unpackb(exactly(length), raw=False)


# --- the socket at start -----------------------------------------------------------------------------


def test_stale_socket_file_is_replaced(daemon_factory: Starter, tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody accepts on it
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    running = daemon_factory(config(path), name="stale", wait=False)
    wait_for_socket(path, running.process)
    ping(path)
    assert running.stop() == 0
    assert not os.path.exists(path)


def test_a_file_that_is_not_a_socket_is_left_alone(daemon_factory: Starter, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    running = daemon_factory(config(str(path)), name="notsock", wait=False)
    assert running.process.wait(15) == 1
    assert str(path) in running.log()
    assert path.read_text() == "precious"


def test_second_daemon_on_the_same_path_is_refused(daemon_factory: Starter) -> None:
    first = daemon_factory(config(), name="first")
    second = daemon_factory(config(first.socket), name="second", wait=False)
    assert second.process.wait(15) == 1
    log = second.log()
    assert first.socket in log and "another daemon" in log
    assert "Traceback" not in log
    ping(first.socket)
    assert first.stop() == 0


# --- shutdown ----------------------------------------------------------------------------------------------


def read_reply(client: Client, msgid: int) -> tuple[int, Any]:
    """The reply to a request already sent (the daemon may have closed its side since)."""
    while True:
        reply = client._proto.next_reply()
        if reply is not None:
            assert reply[0] == msgid
            return reply[1], reply[2]
        data = client._sock.recv(65536)
        assert data, "the daemon closed the connection without replying"
        client._proto.feed(data)


def test_sigterm_lets_the_in_flight_call_finish(daemon_factory: Starter) -> None:
    running = daemon_factory(config(slots=SLOW), name="sigterm")
    with Client(running.socket, timeout=TIMEOUT) as client:
        session = client.C_OpenSession(2, RW)
        client.C_Login(session, CKU.USER, USER_PIN)
        _, private = client.C_GenerateKeyPair(
            session, CKM.EC_KEY_PAIR_GEN, {CKA.EC_PARAMS: P256, CKA.VERIFY: True}, {CKA.SIGN: True}
        )
        client.C_SignInit(session, CKM.ECDSA, private)
        msgid, request = client._proto.request("C_Sign", [session, bytes(32), None])
        client._sock.sendall(request)  # 2 s on the daemon
        sent = time.monotonic()
        time.sleep(0.3)  # let the daemon read the request: only calls it has read are in flight
        running.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM" in running.log(), what="the daemon to log SIGTERM")
        # New connections are refused while the call is in flight.
        with pytest.raises((ConnectionRefusedError, FileNotFoundError, ProtocolError, ConnectionResetError)):
            Client(running.socket, timeout=0.3).close()
        assert time.monotonic() - sent < 1.8, "the in-flight call should still be running"
        # The in-flight call gets its reply.
        rv, result = read_reply(client, msgid)
        assert rv == CKR.OK
        signature = result[0] if result[0] is not None else result[1]
        assert len(signature) == 64
    assert running.process.wait(15) == 0
    assert not os.path.exists(running.socket)
    assert "stopped" in running.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_when_idle_exits_0_and_removes_the_socket(daemon_factory: Starter, sig: int) -> None:
    running = daemon_factory(config(), name="idle")
    client = Client(running.socket, timeout=TIMEOUT)  # an idle connection does not hold the daemon up
    try:
        client.C_OpenSession(0, RW)
        assert running.stop(sig) == 0
    finally:
        client.close()
    assert not os.path.exists(running.socket)
    assert "Traceback" not in running.log()


# --- systemd ------------------------------------------------------------------------------------------------


def test_socket_activation(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    unused = str(tmp_path / "configured.sock")
    config_path = tmp_path / "keygrid.yaml"
    config_path.write_text(config(unused))
    log_path = tmp_path / "keygridd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["systemd-socket-activate", "-l", path, "--fdname=keygrid",
             "-E", f"PYTHONPATH={ROOT}", "-E", "PYTHONDONTWRITEBYTECODE=1",
             sys.executable, "-m", "keygridd.daemon", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(path) or process.poll() is not None, what="the activation socket")
        assert process.poll() is None, log_path.read_text()
        # The first connection starts the daemon, which serves on the socket it was given.
        ping(path)
        ping(path)
        text = log_path.read_text()
        assert "(socket activation)" in text, text
        assert not os.path.exists(unused)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sd_notify_ready(daemon_factory: Starter, tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.settimeout(20)
    with receiver:
        receiver.bind(notify_path)
        running = daemon_factory(config(), name="notify", env={"NOTIFY_SOCKET": notify_path}, wait=False)
        assert receiver.recv(4096) == b"READY=1"
        ping(running.socket)  # READY=1 comes once the socket is listening
        assert running.stop() == 0
        assert receiver.recv(4096) == b"STOPPING=1"


# --- configuration -------------------------------------------------------------------------------------------


def run_keygridd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRID")}
    child_env.update(env or {})
    return subprocess.run([str(KEYGRIDD), *args], capture_output=True, text=True, env=child_env, timeout=30)


def test_check_config_accepts_the_example() -> None:
    result = run_keygridd("--check-config", str(EXAMPLE), env={"KEYGRID_DEV_SO_PIN": "example-so-pin"})
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "example-so-pin" not in result.stdout + result.stderr


def test_check_config_of_a_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  sockett: /tmp/x.sock\nslots:\n  - provider: memory\n")
    result = run_keygridd("--check-config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "server.sockett" in result.stderr and "socket" in result.stderr
    assert result.stdout == ""


BAD_CONFIGS = {
    "example-without-its-variable": (EXAMPLE.read_text(), ["KEYGRID_DEV_SO_PIN"]),
    "unknown-key": ("server:\n  max_frame: 4096\nslots:\n  - provider: memory\n", ["server.max_frame"]),
    "unknown-slot-key": ("slots:\n  - provider: memory\n    acces: {}\n", ["slots[0].acces", "access"]),
    "wrong-type": ("server:\n  max_connections: many\nslots:\n  - provider: memory\n",
                   ["server.max_connections", "integer"]),
    "out-of-range": ("server:\n  max_frame_bytes: 10\nslots:\n  - provider: memory\n", ["server.max_frame_bytes"]),
    "bad-mode": ("server:\n  socket_mode: rw\nslots:\n  - provider: memory\n", ["server.socket_mode"]),
    "no-slots": ("server: {}\n", ["slots"]),
    "short-pin": ("slots:\n  - provider: memory\n    token: {label: x, so_pin: '12'}\n", ["slots[0].token.so_pin"]),
    "unknown-user": ("slots:\n  - provider: memory\n    access: {users: [no-such-user-kg]}\n",
                     ["slots[0].access.users[0]", "no-such-user-kg"]),
    "invalid-yaml": ("slots: [\n", ["invalid YAML"]),
}  # fmt: skip

BAD_PROVIDER_CONFIGS = {
    "unknown-provider": ("slots:\n  - provider: nosuch\n", ["slots[0].provider", "nosuch", "memory"]),
    "provider-option-wrong-type": ("slots:\n  - provider: memory\n    options: {max_pin_failures: ten}\n",
                                   ["slots[0].options.max_pin_failures"]),
    "provider-option-unknown": ("slots:\n  - provider: memory\n    options: {persistt: null}\n",
                                ["slots[0].options.persistt"]),
    "provider-option-field-type": ("slots:\n  - provider: memory\n    options: {scenarios: [{latency_ms: []}]}\n",
                                   ["slots[0].options.scenarios[0].latency_ms"]),
    "scenario-bad-ckr": ("slots:\n  - provider: memory\n    options: {scenarios: [{error: CKR_NOPE}]}\n",
                         ["slots[0].options.scenarios[0]", "CKR_NOPE"]),
}  # fmt: skip


def check_config_error(path: Path, text: str, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> str:  # fmt: skip
    for name in list(os.environ):
        if name.startswith("KEYGRID"):
            monkeypatch.delenv(name)
    path.write_text(text)
    assert daemon_main.main(["--check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keygridd: configuration error: ")
    return err


@pytest.mark.parametrize("text, expected", BAD_PROVIDER_CONFIGS.values(), ids=BAD_PROVIDER_CONFIGS.keys())
def test_check_config_names_the_provider_option_and_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str,
    expected: list[str],
) -> None:  # fmt: skip
    err = check_config_error(tmp_path / "bad.yaml", text, monkeypatch, capsys)
    for part in expected:
        assert part in err


def test_check_config_names_the_file_in_provider_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.yaml"
    err = check_config_error(path, BAD_PROVIDER_CONFIGS["unknown-provider"][0], monkeypatch, capsys)
    assert str(path) in err


@pytest.mark.parametrize("text, expected", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_check_config_names_the_key_and_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str,
    expected: list[str],
) -> None:  # fmt: skip
    path = tmp_path / "bad.yaml"
    err = check_config_error(path, text, monkeypatch, capsys)
    assert str(path) in err
    for part in expected:
        assert part in err


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_check_config_of_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "keygrid.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"slots: [\xff\xfe]\n")
    assert daemon_main.main(["--check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert ("not found" if kind == "missing" else "cannot read") in err


def test_serving_with_a_bad_config_exits_2(daemon_factory: Starter) -> None:
    running = daemon_factory("server: {bogus: 1}\nslots:\n  - provider: memory\n", name="badconf", wait=False)
    assert running.process.wait(15) == 2
    assert "server.bogus" in running.log()


def test_keygrid_socket_overrides_the_configured_path(daemon_factory: Starter, tmp_path: Path) -> None:
    override = str(tmp_path / "override.sock")
    running = daemon_factory(
        config(server="  socket_mode: '0640'\n  socket_group: 4242"),
        name="envsock",
        env={"KEYGRID_SOCKET": override},
        wait=False,
    )
    wait_for_socket(override, running.process)
    assert not os.path.exists(running.socket)
    ping(override)
    info = os.stat(override)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_gid == 4242
    assert running.stop() == 0
    assert not os.path.exists(override)


def test_socket_mode_0660_by_default(daemon: RunningDaemon) -> None:
    info = os.stat(daemon.socket)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_uid == os.getuid() and info.st_gid == os.getgid()


# --- logs ---------------------------------------------------------------------------------------------------


@pytest.fixture
def chatty(daemon_factory: Starter) -> Iterator[RunningDaemon]:
    running = daemon_factory(
        config(logging="logging: {level: debug}", slots="  - id: 1\n    provider: memory\n"), name="chatty"
    )
    yield running
    running.stop()


def test_logs_never_contain_pins(chatty: RunningDaemon) -> None:
    new_so, new_user, changed_user = b"fresh-so-Q7x", b"fresh-user-K3v", b"changed-user-M9w"
    wrong = b"wrong-pin-Z5q"
    with Client(chatty.socket, timeout=TIMEOUT) as client:
        session = client.C_OpenSession(0, RW)
        assert client.call_raw("C_Login", session, CKU.USER, wrong)[0] == CKR.PIN_INCORRECT
        client.C_Login(session, CKU.USER, USER_PIN)
        _, private = client.C_GenerateKeyPair(
            session,
            CKM.EC_KEY_PAIR_GEN,
            {CKA.EC_PARAMS: P256, CKA.TOKEN: True},
            {CKA.SIGN: True, CKA.TOKEN: True, CKA.PRIVATE: True, CKA.LABEL: b"logkey"},
        )
        client.C_Logout(session)
        assert client.call_raw("C_Login", session, CKU.SO, wrong)[0] == CKR.PIN_INCORRECT
        client.C_Login(session, CKU.SO, SO_PIN)
        client.C_Logout(session)
        client.C_CloseSession(session)
        # A blank token: C_InitToken, then C_InitPIN and C_SetPIN (also with a wrong old PIN).
        client.C_InitToken(1, new_so, b"fresh".ljust(32))
        blank = client.C_OpenSession(1, RW)
        client.C_Login(blank, CKU.SO, new_so)
        client.C_InitPIN(blank, new_user)
        client.C_Logout(blank)
        client.C_Login(blank, CKU.USER, new_user)
        assert client.call_raw("C_SetPIN", blank, wrong, changed_user)[0] == CKR.PIN_INCORRECT
        client.C_SetPIN(blank, new_user, changed_user)
        client.C_CloseSession(blank)
        assert client.call_raw("C_InitToken", 1, wrong, b"again".ljust(32))[0] == CKR.PIN_INCORRECT
        # PINs in the one-shot calls, and a PIN in a malformed request.
        uri = "pkcs11:token=life;object=logkey;type=private"
        assert len(client.KG_Sign(uri, CKM.ECDSA, bytes(32), USER_PIN)) == 64
        assert client.call_raw("KG_Sign", uri, CKM.ECDSA, bytes(32), wrong)[0] == CKR.PIN_INCORRECT
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    with sock:
        sock.connect(chatty.socket)
        send_message(sock, [0, 1, "hello", [{"versions": [1, 1], "app_id": None}]])
        assert recv_message(sock)[2] == CKR.OK
        send_message(sock, [0, 2, wrong.decode(), [wrong]])
        send_message(sock, [0, 3, "C_Login", [1, 1, wrong.decode()]])
        assert recv_message(sock)[2] == CKR.FUNCTION_NOT_SUPPORTED
        assert recv_message(sock)[2] == CKR.ARGUMENTS_BAD
        send_message(sock, [0, wrong.decode(), "C_Login", [1, 1, wrong]])  # FATAL: the id is not an integer
        assert recv_message(sock)[0] == 2
    assert private
    assert chatty.stop() == 0
    log = Path(chatty.log_path).read_bytes()
    assert b"closing connection" in log  # the debug log did record the bad requests
    for pin in (SO_PIN, USER_PIN, new_so, new_user, changed_user, wrong):
        assert pin not in log, pin
        assert pin.hex().encode() not in log, pin


def test_version_flag() -> None:
    result = run_keygridd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"keygridd {keygridd.__version__}"
