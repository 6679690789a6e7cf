"""A fake keygridd for the module's transport tests: it speaks the hello, answers every
request with CKR_OK (or a code per method), and records which requests each of its reads
got, so a test sees what went over the socket in which writes."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from door import ShimDoor


def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    conf = tmp_path / "pkcs11.conf"
    conf.write_text(text, encoding="utf-8")
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(conf))


def frame(message: Any) -> bytes:
    body: bytes = msgpack.packb(message)
    return struct.pack(">I", len(body)) + body


class FakeDaemon:
    """Speaks the hello and answers every request with CKR_OK (or ``codes[method]``), all the
    requests a read completed in one write; records their method names per read (hello aside)."""

    RESULTS: dict[str, Any] = {"C_OpenSession": 1, "C_Sign": [bytes(64), 64], "C_FindObjects": [5]}

    def __init__(
        self,
        path: Path,
        codes: dict[str, int] | None = None,
        reverse: bool = False,
        delay: float = 0.0,
        hang_up_on: str | None = None,
    ) -> None:
        self.codes = codes or {}
        self.reverse = reverse  # answer a read's requests last first
        self.delay = delay  # seconds before each answer (not the hello's)
        self.hang_up_on = hang_up_on  # a method whose request closes the connection unanswered
        self.reads: list[list[str]] = []
        self.ids: list[int] = []
        self.lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.stopped = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _answer(self, request: list[Any]) -> bytes:
        _, msgid, method, _args = request
        if method == "hello":
            return frame([1, msgid, 0, {"app_id": bytes(range(16)), "limits": {"max_frame": 1 << 16}}, None])
        rv = self.codes.get(method, 0)
        return frame([1, msgid, rv, self.RESULTS.get(method) if rv == 0 else None, "fake" if rv else None])

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                requests = []
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    (n,) = struct.unpack(">I", buf[:4])
                    requests.append(msgpack.unpackb(buf[4 : 4 + n]))
                    buf = buf[4 + n :]
                calls = [r for r in requests if r[2] != "hello"]
                if calls:
                    with self.lock:
                        self.reads.append([r[2] for r in calls])
                        self.ids += [r[1] for r in calls]
                if self.hang_up_on is not None and any(r[2] == self.hang_up_on for r in requests):
                    time.sleep(self.delay)
                    return
                if calls and self.delay:
                    time.sleep(self.delay)
                answers = [self._answer(r) for r in requests]
                conn.sendall(b"".join(reversed(answers) if self.reverse else answers))

    def take(self) -> list[list[str]]:
        with self.lock:
            reads, self.reads = self.reads, []
        return reads

    def stop(self) -> None:
        self.stopped = True
        self.server.close()
        for t in self.threads:
            t.join(5)


class Fake:
    """Opens the shim (defer_init as given) on a FakeDaemon of its own."""

    def __init__(self, tmp_path: Path, shim_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.shim_lib, self.monkeypatch = tmp_path, shim_lib, monkeypatch
        self.opened: list[tuple[ShimDoor, FakeDaemon]] = []

    def open(self, defer: int = 1, conf: str = "", **options: Any) -> tuple[ShimDoor, FakeDaemon]:
        """``conf``: more lines for the module's configuration file."""
        path = self.tmp_path / f"fake{len(self.opened)}.sock"
        daemon = FakeDaemon(path, **options)
        text = f"socket = {path}\ndefer_init = {defer}\ncall_timeout_ms = 5000\n{conf}"
        configure(self.tmp_path, self.monkeypatch, text)
        door = ShimDoor(str(self.shim_lib))
        self.opened.append((door, daemon))
        return door, daemon

    def close(self) -> None:
        for door, daemon in self.opened:
            door.close()
            daemon.stop()
