"""A real keygridd for the shim tests: one memory slot with an initialised token.

``Daemon.start`` runs ``keygridd --config FILE`` on a socket in a folder and
waits until the socket accepts; ``kill`` (SIGKILL) and ``start`` again bring it
back on the same socket with a fresh token.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

KEYGRIDD = Path(sys.executable).with_name("keygridd")
LABEL = "shim tests ✓"
SO_PIN = "87654321"
USER_PIN = "123456"


class Daemon:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "keygrid.sock"
        self.config = folder / "keygrid.yaml"
        self.log = folder / "keygridd.log"
        config = {
            "server": {"socket": str(self.socket)},
            "slots": [{"provider": "memory", "token": {"label": LABEL, "so_pin": SO_PIN, "user_pin": USER_PIN}}],
        }
        self.config.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        with self.log.open("ab") as log:
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the ASan runtime is for the shim
            self.proc = subprocess.Popen([str(KEYGRIDD), "--config", str(self.config)], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keygridd exited: {self.log.read_text(errors='replace')}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("keygridd did not open its socket")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
