"""A consumer outlives its daemon: SIGKILL keygridd under an open session, start it again on
the same socket (the memory token persisted to a file), and carry on without C_Initialize.

The old session must fail fast with CKR_DEVICE_REMOVED or
CKR_SESSION_HANDLE_INVALID (the shim's README: DEVICE_REMOVED once, then
SESSION_HANDLE_INVALID); the next C_OpenSession reconnects, and login and
sign work as before.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_kit import DRIVER, USER_PIN, Consumers, consumer_config, consumer_environment, start_daemon_at
from test_concurrency import public_key, tag_digest, valid

pytestmark = pytest.mark.shim

CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID = 0x32, 0xB3
ANSWER_TIMEOUT = 20.0


class Consumer:
    """driver.py ``restart``: one command per line in, one JSON line out."""

    def __init__(self, env: dict[str, str]) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "restart", "restart-p256", USER_PIN], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def answer(self) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=ANSWER_TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"the consumer hung: no answer in {ANSWER_TIMEOUT} s")
        if not line:
            self.stderr.seek(0)
            pytest.fail(f"the consumer exited {self.proc.wait(10)}: {self.stderr.read().decode(errors='replace')}")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(10)
        self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture
def persistent(daemon_factory: Callable[..., Any], shim_path: Path) -> Iterator[tuple[Callable[[], Any], str]]:
    with tempfile.TemporaryDirectory(prefix="kg-restart-") as folder:
        sock = str(Path(folder) / "kg.sock")
        config = consumer_config(sock, persist=str(Path(folder) / "token.msgpack"))
        started: list[Any] = []

        def start() -> Any:
            started.append(start_daemon_at(daemon_factory, sock, config, "restart"))
            return started[-1]

        yield start, sock
        for running in started:
            running.stop(signal.SIGKILL)


def test_consumer_survives_daemon_restart(persistent: tuple[Callable[[], Any], str]) -> None:
    start, sock = persistent
    daemon = start()
    env = consumer_environment(sock)
    Consumers(sock, env, daemon).keypair("EC:prime256v1", "restart-p256", "81")

    consumer = Consumer(env)
    try:
        assert consumer.answer() == {"init_rv": 0}
        opened = consumer.ask("open")
        key = public_key(opened["ec_point"])
        assert valid(key, tag_digest("before"), opened["sig"])

        daemon.stop(signal.SIGKILL)
        old = consumer.ask("sign-old")
        print(f"old session after SIGKILL: 0x{old['rv']:x}, then 0x{old['rv_again']:x}, in {old['seconds']:.3f} s")
        # The shim's README: CKR_DEVICE_REMOVED once, then CKR_SESSION_HANDLE_INVALID.
        assert (old["rv"], old["rv_again"]) == (CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID), old
        assert old["seconds"] < 5

        start()  # same config, same socket: the token and its key were persisted
        again = consumer.ask("open-again")
        assert "error" not in again, again
        assert valid(key, tag_digest("after"), again["sig"])
        assert consumer.ask("quit") == {"finalize_rv": 0}
    finally:
        consumer.close()
