"""Shared pieces of the real-consumer tests: paths, PINs, the daemon config and a command runner.

A ``Consumers`` value is what a test gets from the ``consumer_daemon``
fixture: the socket, the environment every consumer subprocess runs with (the
daemon's ``KEYGRID_SOCKET``, and a ``KEYGRID_PKCS11_CONF`` that does not exist
so no host configuration leaks in) and helpers that run pkcs11-tool or
``driver.py`` with a timeout, failing the test with the command's output when
it exits non-zero (unless ``check=False``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = ROOT / "keygrid_pkcs11_shim"
SHIM = SHIM_DIR / "build" / "libkeygrid-pkcs11.so"
DRIVER = Path(__file__).resolve().parent / "driver.py"

TOKEN_LABEL = "consumers"
SO_PIN = "so-pin-8765"
USER_PIN = "user-pin-4321"


class CommandFailed(AssertionError):
    pass


def consumer_config(sock: str = "{socket}", persist: str | None = None, mode: str = "0660") -> str:
    """Slot 0: memory token ``consumers`` initialised by the config; slot 1: blank."""
    options = f"\n    options: {{persist: {persist}}}" if persist else ""
    return f"""
server:
  socket: {sock}
  socket_mode: "{mode}"
  shutdown_grace_seconds: 2
slots:
  - id: 0
    description: consumers slot
    provider: memory
    token: {{label: {TOKEN_LABEL}, so_pin: "{SO_PIN}", user_pin: "{USER_PIN}"}}{options}
  - id: 1
    description: blank slot
    provider: memory
"""


def consumer_environment(sock: str) -> dict[str, str]:
    drop = ("KEYGRID_", "OPENSSL_", "GNUTLS_", "P11_KIT_", "SOFTHSM2_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(KEYGRID_SOCKET=sock, KEYGRID_PKCS11_CONF="/nonexistent/keygrid-pkcs11.conf", KEYGRID_SHIM=str(SHIM))
    return env


def run_command(
    argv: Sequence[str], env: dict[str, str], *, timeout: float = 30.0, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run with a timeout; text output; raise CommandFailed with the output on a non-zero exit."""
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(map(str, argv))}\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Consumers:
    socket: str
    env: dict[str, str]
    daemon: Any  # tests/conftest.py RunningDaemon

    def run(
        self, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run_command(argv, self.env if env is None else env, **kwargs)

    def driver(self, *args: str, timeout: float = 60.0, **kwargs: Any) -> Any:
        """Run a driver.py scenario; its JSON result."""
        out = run_command([sys.executable, str(DRIVER), *args], self.env, timeout=timeout, **kwargs).stdout
        return json.loads(out.splitlines()[-1])

    def pkcs11_tool(self, *args: str, login: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        argv = ["pkcs11-tool", "--module", str(SHIM)]
        if login:
            argv += ["--slot", "0", "--login", "--pin", USER_PIN]
        return self.run([*argv, *args], **kwargs)

    def keypair(self, key_type: str, label: str, key_id: str) -> None:
        """A token key pair made by pkcs11-tool (``EC:prime256v1``, ``RSA:2048``, ...)."""
        out = self.pkcs11_tool("--keypairgen", "--key-type", key_type, "--label", label, "--id", key_id, timeout=60)
        assert "Key pair generated" in out.stdout


def start_daemon_at(factory: Any, sock: str, config: str, name: str) -> Any:
    """Start a keygridd (tests/conftest.py ``daemon_factory``) on a socket path of our choosing."""
    running = factory(config, name=name, wait=False)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(f"keygridd exited with {running.process.returncode}\n{running.log()}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
            running.socket = sock
            return running
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    running.process.kill()
    raise TimeoutError(f"keygridd did not listen on {sock}\n{running.log()}")
