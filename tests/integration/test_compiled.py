"""The daemon as the wheel ships it: the request path compiled by mypyc (``hatch_build.py``).

``make test`` builds the wheel, unpacks it (``make compiled``) and runs the
daemon-level suites against it with ``KEYGRIDD_COMPILED`` set; these tests
check that the daemon those suites ran is the compiled one. Run on their
own, they build the wheel first (about a minute).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKR
from keygridd.protocol.framing import HEADER
from tests.conftest import RunningDaemon, Starter, compiled_modules, default_config
from tests.integration.test_bad_input import connect, handshake, recv_message, send_message

pytestmark = pytest.mark.compiled

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The unpacked wheel, with ``KEYGRIDD_COMPILED`` naming it while these tests run."""
    found = os.environ.get("KEYGRIDD_COMPILED")
    if found:
        yield Path(found).resolve()
        return
    directory = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(directory), str(ROOT)],
        check=True,
        timeout=900,
    )
    (wheel,) = directory.glob("keygrid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(directory / "tree")
    os.environ["KEYGRIDD_COMPILED"] = str(directory / "tree")
    try:
        yield directory / "tree"
    finally:
        del os.environ["KEYGRIDD_COMPILED"]


def test_the_wheel_carries_the_request_path_compiled(compiled: Path) -> None:
    modules = compiled_modules()
    assert "keygridd.server.connection" in modules
    probe = "import importlib, sys\nfor name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", probe, *modules],
        env={**os.environ, "PYTHONPATH": str(compiled)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == len(modules)
    for name, path in zip(modules, out, strict=True):
        assert path.startswith(str(compiled)), (name, path)
        assert path.endswith(".so"), f"{name} is not compiled: {path}"


def mapped_files(daemon: RunningDaemon) -> set[str]:
    """The files mapped into the daemon's process."""
    maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if line.count(" ") >= 5 and "/" in line}


def test_the_daemon_runs_compiled_and_answers_bad_input(compiled: Path, daemon_factory: Starter) -> None:
    """The daemon the suites start runs the compiled modules, and those keep the rules: a wrong type gets
    CKR_ARGUMENTS_BAD, a malformed frame closes only its own connection."""
    running = daemon_factory(default_config("{socket}"), name="compiled")
    # The compiled code of every module lives in one library of the group (hatch_build.py's group_name).
    (library,) = compiled.glob("keygridd__mypyc.*.so")
    assert str(library) in mapped_files(running), running.log()
    with Client(running.socket) as client:
        slots = client.call("C_GetSlotList", False)
        assert slots
        session = client.call("C_OpenSession", slots[0], 0x4)
        assert len(client.call("C_GenerateRandom", session, 32)) == 32
        with connect(running.socket) as raw:
            handshake(raw)
            send_message(raw, [0, 2, "C_GenerateRandom", [session, "thirty-two"]])
            assert recv_message(raw)[:4] == [1, 2, CKR.ARGUMENTS_BAD, None]
        assert client.call_raw("C_GenerateRandom", session + 1000, 8) == (CKR.SESSION_HANDLE_INVALID, None)
        with socket.socket(socket.AF_UNIX) as bad:
            bad.connect(running.socket)
            bad.sendall(HEADER.pack(3) + b"\xc1\xc1\xc1")  # 0xc1 is never used in MessagePack
            bad.settimeout(10)
            reply = b""
            while chunk := bad.recv(4096):
                reply += chunk
            assert reply, "the daemon closed without a FATAL message"
        assert len(client.call("C_GenerateRandom", session, 16)) == 16
    assert running.process.poll() is None
