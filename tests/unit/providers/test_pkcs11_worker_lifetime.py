"""The PKCS#11 module worker lives exactly as long as the daemon that started it.

trio starts processes from a cached thread that exits after 10 s idle; a
worker tied to that thread (PR_SET_PDEATHSIG) was killed with it, in the
middle of whatever module call it was serving. The worker must outlive the
thread that started it and still die with the daemon, even when its lanes
stay open (a call in progress, or another holder of the socket).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import keygridd
from keygridd.protocol.codec import unpack
from keygridd.protocol.framing import HEADER
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens

pytestmark = pytest.mark.softhsm

ROOT = str(Path(keygridd.__file__).resolve().parents[1])


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **softhsm_tokens(tmp_path, ["lifetime"]), "PYTHONPATH": ROOT}


def _argv(fd: int) -> list[str]:
    return [sys.executable, "-m", "keygridd.providers.pkcs11.worker", "--module", SOFTHSM_MODULE,
            "--lanes", "1", "--fds", str(fd)]  # fmt: skip


def _hello(sock: socket.socket) -> dict[str, object]:
    sock.settimeout(30)
    header = sock.recv(HEADER.size, socket.MSG_WAITALL)
    (length,) = HEADER.unpack(header)
    hello = unpack(sock.recv(length, socket.MSG_WAITALL))
    assert isinstance(hello, dict) and "threads_ok" in hello, hello
    return hello


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_worker_outlives_the_thread_that_started_it(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    started: list[subprocess.Popen[bytes]] = []
    up = threading.Event()

    def start() -> None:  # like trio.lowlevel.open_process: Popen in a thread that ends afterwards
        started.append(subprocess.Popen(_argv(theirs.fileno()), pass_fds=[theirs.fileno()], env=_env(tmp_path)))
        up.wait(30)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        _hello(ours)
    finally:
        up.set()
        thread.join()
        theirs.close()
    worker = started[0]
    time.sleep(0.5)
    assert worker.poll() is None, f"the worker ended with the thread that started it ({worker.returncode})"
    ours.close()  # the daemon closes its lanes: the worker finalizes the module and exits
    assert worker.wait(10) == 0


def test_worker_dies_with_the_daemon_even_with_its_lanes_open(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    daemon_code = textwrap.dedent(f"""
        import subprocess, sys, time
        worker = subprocess.Popen({_argv(theirs.fileno())!r}, pass_fds=[{theirs.fileno()}])
        print(worker.pid, flush=True)
        time.sleep(60)
    """)
    daemon = subprocess.Popen(
        [sys.executable, "-c", daemon_code], pass_fds=[theirs.fileno()], env=_env(tmp_path), stdout=subprocess.PIPE
    )
    theirs.close()
    assert daemon.stdout is not None
    worker_pid = 0
    try:
        worker_pid = int(daemon.stdout.readline())
        _hello(ours)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        deadline = time.monotonic() + 10
        while not _gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker_pid), "the worker outlived the daemon"
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
        ours.close()
        if worker_pid and not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
