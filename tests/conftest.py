"""Shared fixtures: a real keygridd on a temporary socket.

``start_daemon(config_text)`` runs ``python -m keygridd.daemon`` as a child
process with a YAML config and waits until its socket answers; ``daemon`` is
one such daemon shared by a test session, with an initialised memory token.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The session's PostgreSQL server (fixtures ``postgres`` and ``pg_dsn``), for the software token's tests.
pytest_plugins = ["tests.integration.pg"]

SO_PIN = b"so-pin-1234"
USER_PIN = b"user-pin-5678"
RESTRICTED_UID = 4242


@dataclass
class RunningDaemon:
    socket: str
    config_path: str
    process: subprocess.Popen[bytes]
    log_path: str
    so_pin: bytes = SO_PIN
    user_pin: bytes = USER_PIN
    slot_id: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode


def wait_for_socket(path: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keygridd exited with {process.returncode}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    raise TimeoutError(f"keygridd did not listen on {path}")


def default_config(sock: str, extra_slots: str = "") -> str:
    return f"""
server:
  socket: {sock}
  shutdown_grace_seconds: 5
slots:
  - id: 0
    description: conformance slot
    provider: memory
    token: {{label: conformance, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
  - id: 1
    description: blank slot
    provider: memory
  - id: 7
    description: restricted slot
    provider: memory
    access: {{uids: [{RESTRICTED_UID}]}}
    token: {{label: hidden, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
{extra_slots}"""


Starter = Callable[..., RunningDaemon]


def compiled_modules() -> list[str]:
    """``hatch_build.COMPILED`` as module names (read from the hook's source: hatchling is a build tool)."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "hatch_build.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets):
            return [path.removesuffix(".py").replace("/", ".") for path in ast.literal_eval(node.value)]
    raise AssertionError("hatch_build.py has no COMPILED")


def daemon_command(child_env: dict[str, str]) -> list[str]:
    """How the tests run keygridd: from this tree, or with ``KEYGRIDD_COMPILED`` from the wheel unpacked
    there (``make compiled``: the request path compiled by mypyc), which ``child_env`` then imports first."""
    compiled = os.environ.get("KEYGRIDD_COMPILED")
    if not compiled:
        return [sys.executable, "-m", "keygridd.daemon"]
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(compiled), child_env.get("PYTHONPATH")]))
    return [sys.executable, "-P", "-m", "keygridd.daemon"]  # -P: not this tree from the working directory


@pytest.fixture(scope="session")
def daemon_factory() -> Iterator[Starter]:
    started: list[RunningDaemon] = []
    root = tempfile.mkdtemp(prefix="kg-")

    def start(config: str | None = None, *, name: str | None = None, env: dict[str, str] | None = None,
              wait: bool = True) -> RunningDaemon:  # fmt: skip
        directory = tempfile.mkdtemp(prefix=(name or "d") + "-", dir=root)
        sock = os.path.join(directory, "kg.sock")
        text = (config or default_config("{socket}")).replace("{socket}", sock).replace("{dir}", directory)
        config_path = os.path.join(directory, "keygrid.yaml")
        Path(config_path).write_text(text)
        log_path = os.path.join(directory, "keygridd.log")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRID_")}
        child_env.update(env or {})
        command = daemon_command(child_env)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*command, "--config", config_path],
                stdout=log, stderr=subprocess.STDOUT, env=child_env,
            )  # fmt: skip
        running = RunningDaemon(sock, config_path, process, log_path, env={**child_env, "KEYGRID_SOCKET": sock})
        started.append(running)
        if wait:
            try:
                wait_for_socket(sock, process)
            except Exception as exc:
                raise RuntimeError(f"{exc}\n{running.log()}") from None
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest.fixture(scope="session")
def daemon(daemon_factory: Starter) -> RunningDaemon:
    """One keygridd for the test session: slot 0 initialised, slot 1 blank, slot 7 for uid 4242 only."""
    return daemon_factory(name="shared")
