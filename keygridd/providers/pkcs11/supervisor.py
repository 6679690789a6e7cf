"""The daemon side of a PKCS#11 module worker: spawn it, call it, time calls out, restart it.

``ModuleWorker`` runs ``worker.py`` in a child process and talks to it over
lanes: connected Unix stream socket pairs, one call at a time on each.

Rules:

* The trio loop never blocks and no thread or task is made per call: a call
  takes a free lane, writes one frame (a non-blocking ``send``) and waits with
  ``trio.lowlevel.wait_readable`` for the reply frame (after polling for it
  briefly when nothing else is runnable: ``_spin``).
* Every call is bounded by ``call_timeout``, waiting for a lane or a restart
  included. A call that times out after its request went out leaves its lane
  stuck: the lane is closed and never reused; when every lane is stuck the
  worker is killed (SIGKILL) and restarted like a crashed one.
* A worker that dies (exit, signal, EOF on a lane, a garbled reply) fails
  every call in flight with CKR_DEVICE_ERROR and is restarted by a
  supervising system task after a delay of 0.1 s, doubling up to 5 s while
  workers keep dying young or restarts keep failing (reset after a worker
  stayed up 10 s). ``generation`` counts the restarts and ``on_restart`` is
  called after each: module sessions and handles of older generations are
  gone. While the last restart attempt has failed, calls fail at once.
* A call cancelled from outside after its request went out leaves the reply
  in flight: the lane stays in service and its next call discards that reply
  first. A request cancelled half-written makes the lane stuck.
* Children are always reaped. ``aclose()`` closes the lanes (the worker calls
  C_Finalize and exits) and kills the worker after a short grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

import keygridd
from keygridd.core.offload import may_busy_poll
from keygridd.pkcs11.errors import ArgumentsBad, DeviceError, error_for
from keygridd.protocol.codec import unpack
from keygridd.providers.pkcs11.worker import MAX_FRAME, decode_result, encode_request

log = logging.getLogger("keygridd.pkcs11")

DEFAULT_LANES = 4
START_TIMEOUT = 30.0  # loading and initialising a module (an HSM client may be slow to connect)
CLOSE_GRACE = 2.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
STABLE_AFTER = 10.0
_RECV_SIZE = 1 << 16
SPIN = 0.0002  # seconds a call polls for its reply before it sleeps (see _spin)
_IDLE, _SENDING, _WAITING = 0, 1, 2


class WorkerFailed(Exception):
    """The worker did not start: the module does not load or initialise, or the process died first."""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "its lane closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _spin(sock: socket.socket) -> bytes | None:
    """Poll for a reply for up to SPIN seconds, while the loop has nothing else to do (else None).

    A fast module call (random bytes, an ECDSA signature) answers within that
    time; polling for it costs nothing the loop could have used and saves a
    pass through epoll and the scheduler, which here costs more than the call.
    The poll ends as soon as a task is runnable or a client has a request
    waiting (``may_busy_poll``): the loop serves them meanwhile.
    """
    if trio.lowlevel.current_statistics().tasks_runnable:
        return None
    allowed = may_busy_poll.get()
    ready = select.poll()
    ready.register(sock, select.POLLIN)
    end = time.perf_counter() + SPIN
    while allowed():
        if ready.poll(0):
            try:
                return sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return None  # readiness without data: wait the usual way
        if time.perf_counter() >= end:
            break
    return None


class _Lane:
    """One socket of the daemon's end: frames out, frames in, and what is in flight."""

    __slots__ = ("_buffer", "closed", "orphans", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()
        self.state = _IDLE
        self.orphans = 0  # replies of cancelled calls still to come; the next call discards them
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def send(self, frame: bytes) -> None:
        sent = 0
        view = memoryview(frame)
        while True:
            try:
                sent += self.sock.send(view[sent:])
            except BlockingIOError:
                pass
            if sent == len(frame):
                return
            if sent:
                self.state = _SENDING
            await trio.lowlevel.wait_writable(self.sock)

    async def receive(self) -> bytes:
        buffer = self._buffer
        while True:
            if len(buffer) >= 4:
                end = 4 + int.from_bytes(buffer[:4], "big")
                if end > 4 + MAX_FRAME:
                    raise EOFError("a reply frame is too long")
                if len(buffer) >= end:
                    body = bytes(buffer[4:end])
                    del buffer[:end]
                    return body
            got: bytes | None
            try:
                got = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                got = _spin(self.sock)
            if got is None:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            chunk = got
            if not chunk:
                raise EOFError("the worker closed the lane")
            if not buffer and len(chunk) >= 4 and len(chunk) == 4 + int.from_bytes(chunk[:4], "big"):
                return chunk[4:]  # the usual case: one recv, one whole reply
            buffer += chunk

    async def roundtrip(self, frame: bytes) -> bytes:
        while self.orphans:
            await self.receive()
            self.orphans -= 1
        await self.send(frame)
        self.state = _WAITING
        body = await self.receive()
        self.state = _IDLE
        return body


class _Incarnation:
    """One worker process and its lanes."""

    def __init__(self, process: trio.Process, lanes: list[_Lane], threads_ok: bool) -> None:
        self.process = process
        self.lanes = lanes
        self.free = list(lanes)
        self.threads_ok = threads_ok
        self.stuck = 0
        self.dead: str | None = None  # why it is out of service: "died", "was closed", "was killed: ..."
        self.started = trio.current_time()

    def why(self) -> str:
        """The reason it is out of service, for messages: with the exit status once it is known."""
        text = f"the PKCS#11 module worker (pid {self.process.pid}) {self.dead}"
        if self.dead == "died" and self.process.returncode is not None:
            text += f" ({_exit_text(self.process.returncode)})"
        return text


class ModuleWorker:
    """A supervised worker process serving one PKCS#11 module; ``await call("C_Sign", [...])``."""

    def __init__(
        self,
        module: str,
        *,
        lanes: int | None,
        call_timeout: float,
        env: Mapping[str, str],
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if lanes is not None and lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.module = module
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.generation = 0
        self.threads_ok = False
        self.lanes = 0
        self.on_restart: Callable[[int], None] | None = None
        self._want_lanes = lanes or DEFAULT_LANES
        self._env = dict(env)
        self._current: _Incarnation | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._failure: str | None = None
        self._closed = False
        self._backoff = BACKOFF_MIN
        self._supervisor: trio.CancelScope | None = None
        self._supervisor_done: trio.Event | None = None

    @property
    def ready(self) -> bool:
        current = self._current
        return current is not None and current.dead is None and not self._closed

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.process.pid if current is not None and current.dead is None else None

    # --- life cycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker and wait for its hello; WorkerFailed says why it did not start."""
        if self._current is not None or self._closed:
            raise RuntimeError("ModuleWorker.start() is called once")
        self._adopt(await self._spawn())
        self._supervisor_done = trio.Event()
        trio.lowlevel.spawn_system_task(self._supervise, name=f"pkcs11 worker supervisor {self.module}")

    async def aclose(self) -> None:
        """Stop the worker (C_Finalize on a clean exit) and reap it; calls in flight fail."""
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._lot.unpark_all()
        current = self._current
        with trio.CancelScope(shield=True):
            if current is not None:
                if current.dead is None:
                    current.dead = "was closed"
                    for lane in current.lanes:
                        lane.close()
                    with trio.move_on_after(CLOSE_GRACE):
                        await current.process.wait()
                with contextlib.suppress(OSError):
                    current.process.kill()
                await current.process.wait()
            if self._supervisor_done is not None:
                await self._supervisor_done.wait()

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, **self._env}
        root = str(Path(keygridd.__file__).resolve().parents[1])  # the worker runs this very code
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    async def _spawn(self) -> _Incarnation:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(self._want_lanes)]
        fds = [theirs.fileno() for _, theirs in pairs]
        argv = [sys.executable, "-m", "keygridd.providers.pkcs11.worker", "--module", self.module]
        argv += ["--lanes", str(len(fds)), "--fds", ",".join(map(str, fds))]
        try:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, pass_fds=fds, env=self._child_env()
            )
        except OSError as exc:
            for ours, _ in pairs:
                ours.close()
            raise WorkerFailed(f"cannot start the worker for {self.module}: {exc}") from None
        finally:
            for _, theirs in pairs:
                theirs.close()
        lanes = [_Lane(ours) for ours, _ in pairs]
        try:
            with trio.fail_after(self.start_timeout):
                hello = unpack(await lanes[0].receive())
            if not isinstance(hello, dict) or "error" in hello:
                raise WorkerFailed(str(hello.get("error") if isinstance(hello, dict) else "a malformed hello"))
            used = int(hello["lanes"])
            threads_ok = bool(hello["threads_ok"])
        except BaseException as exc:
            for lane in lanes:
                lane.close()
            with trio.CancelScope(shield=True):
                with contextlib.suppress(OSError):
                    process.kill()
                await process.wait()
            if isinstance(exc, trio.TooSlowError):
                raise WorkerFailed(
                    f"the worker for {self.module} did not start within {self.start_timeout:g} s"
                ) from None
            if isinstance(exc, (EOFError, OSError, ValueError, KeyError, TypeError)):
                what = _exit_text(process.returncode)
                raise WorkerFailed(f"the worker for {self.module} died before it was ready ({what})") from None
            raise
        for lane in lanes[used:]:
            lane.close()
        return _Incarnation(process, lanes[:used], threads_ok)

    def _adopt(self, current: _Incarnation) -> None:
        self._current = current
        self._failure = None
        self.threads_ok = current.threads_ok
        self.lanes = len(current.lanes)
        self._lot.unpark_all()

    async def _supervise(self) -> None:
        assert self._supervisor_done is not None
        try:
            with trio.CancelScope() as self._supervisor:
                while not self._closed and self._current is not None:
                    current = self._current
                    await current.process.wait()
                    self._bury(current, "died")
                    log.warning("PKCS#11 module %s: %s", self.module, current.why())
                    await self._restart(current)
        except Exception:
            log.exception("PKCS#11 module %s: the worker supervisor failed", self.module)
        finally:
            self._supervisor_done.set()

    async def _restart(self, previous: _Incarnation) -> None:
        if trio.current_time() - previous.started >= STABLE_AFTER:
            self._backoff = BACKOFF_MIN
        while not self._closed:
            await trio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            try:
                current = await self._spawn()
            except WorkerFailed as exc:
                self._failure = f"the PKCS#11 module worker is down: {exc}"
                log.warning("PKCS#11 module %s: restart failed: %s", self.module, exc)
                self._lot.unpark_all()
                continue
            self.generation += 1
            self._adopt(current)
            log.warning("PKCS#11 module %s: worker restarted (generation %d)", self.module, self.generation)
            if self.on_restart is not None:
                try:
                    self.on_restart(self.generation)
                except Exception:
                    log.exception("PKCS#11 module %s: on_restart failed", self.module)
            return

    def recycle(self, reason: str) -> None:
        """Replace the worker by a fresh one (the module is initialised again and finds its tokens anew)."""
        current = self._current
        if current is not None and current.dead is None and not self._closed:
            log.warning("PKCS#11 module %s: restarting the worker: %s", self.module, reason)
            self._bury(current, f"was restarted: {reason}")

    def _bury(self, current: _Incarnation, reason: str) -> None:
        """Take a worker out of service: kill it, close its lanes (waking every call in flight)."""
        if current.dead is not None:
            return
        current.dead = reason
        with contextlib.suppress(OSError):
            current.process.kill()
        for lane in current.lanes:
            lane.close()
        current.free.clear()
        self._lot.unpark_all()

    # --- calls ----------------------------------------------------------------------------------------

    async def _acquire(self, method: str, deadline: float) -> tuple[_Incarnation, _Lane]:
        while True:
            current = self._current
            if self._closed or current is None:
                raise DeviceError(f"{method}: the PKCS#11 module worker is not running")
            if current.dead is None:
                if current.free:
                    return current, current.free.pop()
            elif self._failure is not None:
                raise DeviceError(f"{method}: {self._failure}")
            with trio.CancelScope(deadline=deadline) as scope:
                await self._lot.park()
            if scope.cancelled_caught:
                raise DeviceError(f"{method}: no PKCS#11 module worker lane within {self.call_timeout:g} s")

    def _release(self, current: _Incarnation, lane: _Lane) -> None:
        if current.dead is None and not lane.closed:
            if lane.orphans:
                current.free.insert(0, lane)  # clean lanes first
            else:
                current.free.append(lane)
            self._lot.unpark()

    def _stick(self, current: _Incarnation, lane: _Lane) -> None:
        lane.close()
        current.stuck += 1
        if current.stuck >= len(current.lanes):
            self._bury(current, f"was killed: every lane is stuck (calls exceeded {self.call_timeout:g} s)")

    def _abandon(self, current: _Incarnation, lane: _Lane) -> None:
        """The caller was cancelled from outside during its round trip."""
        if lane.state == _SENDING:
            self._stick(current, lane)  # half a frame cannot be taken back
            return
        if lane.state == _WAITING:
            lane.orphans += 1
            lane.state = _IDLE
        self._release(current, lane)

    async def call(self, method: str, args: Sequence[Any]) -> Any:
        """Call ``method`` in the module; returns its result or raises its CKR (DeviceError if the worker fails)."""
        frame = encode_request(method, args)
        if len(frame) > 4 + MAX_FRAME:
            raise ArgumentsBad(f"{method}: the request is too large for the module worker")
        deadline = trio.current_time() + self.call_timeout
        current, lane = await self._acquire(method, deadline)
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                body = await lane.roundtrip(frame)
            if not scope.cancelled_caught:
                reply = unpack(body)
                rv, result = reply[0], reply[1]
        except trio.Cancelled:
            self._abandon(current, lane)
            raise
        except (OSError, EOFError, ValueError, TypeError, IndexError, trio.ClosedResourceError):
            self._bury(current, "died")
            with trio.move_on_after(1.0):  # for the exit status in the message
                await current.process.wait()
            raise DeviceError(f"{method}: {current.why()}") from None
        if scope.cancelled_caught:
            log.warning(
                "PKCS#11 module %s: %s timed out after %g s; its lane is stuck", self.module, method, self.call_timeout
            )
            self._stick(current, lane)
            raise DeviceError(f"{method} timed out after {self.call_timeout:g} s")
        self._release(current, lane)
        if rv == 0:
            return decode_result(method, args, result)
        message = reply[2] if len(reply) > 2 and isinstance(reply[2], str) else method
        raise error_for(rv)(message, result=decode_result(method, args, result))
