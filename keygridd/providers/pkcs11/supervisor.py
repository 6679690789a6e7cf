"""The daemon side of a PKCS#11 module worker: spawn it, call it, time calls out, restart it.

``ModuleWorker`` runs ``worker.py`` in a child process and talks to it over
lanes: connected Unix stream socket pairs, one call at a time on each.

Rules:

* The trio loop never blocks and no thread or task is made per call: a call
  takes a free lane and writes one frame (a non-blocking ``send``). Awaited
  (``call``), it waits with ``trio.lowlevel.wait_readable`` for the reply
  (after polling for it briefly when nothing else is runnable:
  ``lanes.spin``). Started from the loop (``submit``, when a clean lane is
  free), the lane is watched by the caller's ``ReplyWatcher`` (the server's
  reactor), which reads the reply in its own turn and hands it to ``done``.
* Every call is bounded by ``call_timeout``, waiting for a lane or a restart
  included (a submitted call's deadline is kept by a watchdog task). A call
  that times out after its request went out leaves its lane stuck: the lane
  is closed and never reused; when every lane is stuck the worker is killed
  (SIGKILL) and restarted like a crashed one.
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
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

import keygridd
from keygridd.core.offload import Done, ReplyWatcher
from keygridd.pkcs11.errors import ArgumentsBad, DeviceError, error_for
from keygridd.protocol.codec import unpack
from keygridd.providers.pkcs11.lanes import IDLE, RECV_SIZE, SENDING, WAITING, Lane
from keygridd.providers.pkcs11.worker import MAX_FRAME, decode_result, encode_request

log = logging.getLogger("keygridd.pkcs11")

DEFAULT_LANES = 4
START_TIMEOUT = 30.0  # loading and initialising a module (an HSM client may be slow to connect)
CLOSE_GRACE = 2.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
STABLE_AFTER = 10.0
SUBMIT_MAX = 1 << 15  # larger requests are awaited by a task (a clean lane takes this much at once)
EOF_GRACE = 1.0  # seconds a lane at end of file waits for its worker's exit status


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


@dataclass(slots=True)
class _Submitted:
    """A call started from the loop, its reply not yet read."""

    method: str
    args: Sequence[Any]
    done: Done
    watcher: ReplyWatcher
    deadline: float
    current: _Incarnation
    at_eof: bool = False  # its lane ended: the worker is dying, its exit status comes soon


class _Incarnation:
    """One worker process and its lanes."""

    def __init__(self, process: trio.Process, lanes: list[Lane], threads_ok: bool, native: bool) -> None:
        self.process = process
        self.lanes = lanes
        self.free = list(lanes)
        self.threads_ok = threads_ok
        self.native = native
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
        self.native = False  # the lanes are served by libkeygrid-worker.so (worker.py)
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
        self._submitted: dict[Lane, _Submitted] = {}
        self._watchdog_wake: trio.Event | None = None  # set to wake the parked watchdog
        self._watchdog_sleep: trio.CancelScope | None = None  # its sleep until the next deadline

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
        trio.lowlevel.spawn_system_task(self._watchdog, name=f"pkcs11 worker watchdog {self.module}")

    async def aclose(self) -> None:
        """Stop the worker (C_Finalize on a clean exit) and reap it; calls in flight fail."""
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._wake_watchdog()
        self._lot.unpark_all()
        current = self._current
        with trio.CancelScope(shield=True):
            if current is not None:
                if current.dead is None:
                    current.dead = "was closed"
                    self._close_lanes(current)
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
        argv = [sys.executable, "-P", "-m", "keygridd.providers.pkcs11.worker", "--module", self.module]
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
        lanes = [Lane(ours) for ours, _ in pairs]
        try:
            with trio.fail_after(self.start_timeout):
                hello = unpack(await lanes[0].receive())
            if not isinstance(hello, dict) or "error" in hello:
                raise WorkerFailed(str(hello.get("error") if isinstance(hello, dict) else "a malformed hello"))
            used = int(hello["lanes"])
            threads_ok = bool(hello["threads_ok"])
            native = bool(hello.get("native"))
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
        return _Incarnation(process, lanes[:used], threads_ok, native)

    def _adopt(self, current: _Incarnation) -> None:
        self._current = current
        self._failure = None
        self.threads_ok = current.threads_ok
        self.native = current.native
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
        self._close_lanes(current)

    def _close_lanes(self, current: _Incarnation) -> None:
        """Close the lanes of a worker gone out of service (``current.dead`` says why): awaited calls wake
        and submitted ones fail."""
        failed = [self._forget(lane) for lane, entry in list(self._submitted.items()) if entry.current is current]
        for lane in current.lanes:
            lane.close()
        current.free.clear()
        self._lot.unpark_all()
        for entry in failed:
            if entry is not None:
                entry.done(None, DeviceError(f"{entry.method}: {current.why()}"))

    # --- calls ----------------------------------------------------------------------------------------

    async def _acquire(self, method: str, deadline: float) -> tuple[_Incarnation, Lane]:
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

    def _release(self, current: _Incarnation, lane: Lane) -> None:
        if current.dead is None and not lane.closed:
            if lane.orphans:
                current.free.insert(0, lane)  # clean lanes first
            else:
                current.free.append(lane)
            if self._lot:  # unpark() costs a generator even with nobody parked: this runs once a call
                self._lot.unpark()

    def _stick(self, current: _Incarnation, lane: Lane) -> None:
        lane.close()
        current.stuck += 1
        if current.stuck >= len(current.lanes):
            self._bury(current, f"was killed: every lane is stuck (calls exceeded {self.call_timeout:g} s)")

    def _abandon(self, current: _Incarnation, lane: Lane) -> None:
        """The caller was cancelled from outside during its round trip."""
        if lane.state == SENDING:
            self._stick(current, lane)  # half a frame cannot be taken back
            return
        if lane.state == WAITING:
            lane.orphans += 1
            lane.state = IDLE
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
                reply = _reply(body)
        except trio.Cancelled:
            self._abandon(current, lane)
            raise
        except (OSError, EOFError, ValueError, TypeError, IndexError, trio.ClosedResourceError):
            self._bury(current, "died")
            with trio.move_on_after(EOF_GRACE):  # for the exit status in the message
                await current.process.wait()
            raise DeviceError(f"{method}: {current.why()}") from None
        if scope.cancelled_caught:
            self._time_out(current, lane, method)
            raise DeviceError(f"{method} timed out after {self.call_timeout:g} s")
        self._release(current, lane)
        return _result(method, args, reply)

    def _time_out(self, current: _Incarnation, lane: Lane, method: str) -> None:
        log.warning(
            "PKCS#11 module %s: %s timed out after %g s; its lane is stuck", self.module, method, self.call_timeout
        )
        self._stick(current, lane)

    # --- calls started from the loop ------------------------------------------------------------------

    def submit(self, method: str, args: Sequence[Any], done: Done, watcher: ReplyWatcher) -> bool:
        """Send ``method`` at once on a free clean lane and have ``watcher`` read the reply: True, and
        ``done(result, error)`` is called later (from the loop, never from here); False when nothing went
        out (no such lane, a large request, a worker not serving): await ``call`` instead."""
        current = self._current
        if self._closed or current is None or current.dead is not None or not current.free:
            return False
        lane = current.free[-1]
        if not lane.clean:
            return False
        try:
            frame = encode_request(method, args)
        except Exception:
            return False  # ``call`` raises it
        if len(frame) > SUBMIT_MAX:
            return False
        try:
            sent = lane.sock.send(frame)
        except OSError:
            return False  # a full or broken lane: ``call`` finds out what is wrong
        current.free.pop()
        if sent < len(frame):  # half a request cannot be taken back; the worker never runs it
            self._stick(current, lane)
            return False
        lane.state = WAITING
        deadline = trio.current_time() + self.call_timeout
        self._submitted[lane] = _Submitted(method, args, done, watcher, deadline, current)
        watcher.watch_reply(lane.sock.fileno(), partial(self._on_reply, lane))
        self._wake_watchdog()
        return True

    def _on_reply(self, lane: Lane) -> None:
        """The watcher's turn: the submitted call's lane is readable."""
        entry = self._submitted.get(lane)
        if entry is None or entry.at_eof:
            return
        try:
            chunk = lane.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        try:
            if not chunk:
                raise EOFError("the worker closed the lane")
            body = lane.take(chunk)
        except EOFError:
            # The worker is dying: its supervisor fails the call with the exit status; if the process
            # lives on without this lane, the watchdog fails it shortly.
            entry.watcher.unwatch_reply(lane.sock.fileno())
            entry.at_eof = True
            entry.deadline = min(entry.deadline, trio.current_time() + EOF_GRACE)
            if self._watchdog_sleep is not None:
                self._watchdog_sleep.deadline = min(self._watchdog_sleep.deadline, entry.deadline)
            return
        if body is None:
            return  # the rest of the reply comes in a later turn
        self._forget(lane)
        lane.state = IDLE
        current = entry.current
        try:
            reply = _reply(body)
        except ValueError:
            self._bury(current, "died")
            entry.done(None, DeviceError(f"{entry.method}: {current.why()}"))
            return
        self._release(current, lane)
        try:
            value = _result(entry.method, entry.args, reply)
        except Exception as exc:  # its CKR, or a garbled result (CKR_GENERAL_ERROR, as an awaited call's)
            entry.done(None, exc)
        else:
            entry.done(value, None)

    def _forget(self, lane: Lane) -> _Submitted | None:
        entry = self._submitted.pop(lane, None)
        if entry is not None and not entry.at_eof and not lane.closed:
            entry.watcher.unwatch_reply(lane.sock.fileno())
        return entry

    def _wake_watchdog(self) -> None:
        if self._watchdog_wake is not None:
            self._watchdog_wake.set()
            self._watchdog_wake = None

    async def _watchdog(self) -> None:
        """Fail submitted calls past their deadline (their lanes are stuck), and calls whose lane ended
        without the worker exiting."""
        try:
            while not self._closed:
                if not self._submitted:
                    self._watchdog_wake = trio.Event()
                    await self._watchdog_wake.wait()
                    continue
                with trio.CancelScope(deadline=min(entry.deadline for entry in self._submitted.values())) as sleep:
                    self._watchdog_sleep = sleep
                    await trio.sleep_forever()
                self._watchdog_sleep = None
                now = trio.current_time()
                for lane, entry in list(self._submitted.items()):
                    if entry.deadline > now or self._submitted.get(lane) is not entry:
                        continue
                    current = entry.current
                    if entry.at_eof and current.dead is None:
                        self._bury(current, "died")  # fails it with the others
                        continue
                    self._forget(lane)
                    if entry.at_eof:
                        entry.done(None, DeviceError(f"{entry.method}: {current.why()}"))
                        continue
                    self._time_out(current, lane, entry.method)
                    entry.done(None, DeviceError(f"{entry.method} timed out after {self.call_timeout:g} s"))
        except Exception:
            log.exception("PKCS#11 module %s: the worker watchdog failed", self.module)


def _reply(body: bytes) -> list[Any]:
    """``[rv, result, message...]`` from a reply frame's body (ValueError: garbled, the worker is broken)."""
    reply = unpack(body)
    if not (isinstance(reply, list) and len(reply) >= 2 and type(reply[0]) is int):
        raise ValueError("a malformed reply")
    return reply


def _result(method: str, args: Sequence[Any], reply: list[Any]) -> Any:
    """A reply's result, or its CKR raised."""
    rv, result = reply[0], reply[1]
    if rv == 0:
        return decode_result(method, args, result)
    message = reply[2] if len(reply) > 2 and isinstance(reply[2], str) else method
    raise error_for(rv)(message, result=decode_result(method, args, result))
