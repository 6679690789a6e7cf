"""The reactor: an idle connection's next requests answered without waking its task.

A connection whose task has nothing in flight parks here while it waits for
its client's next request (``Reactor.wait``). One task watches every parked
connection in one level-triggered epoll set. When some are readable it reads
each one and lets the connection answer, there and then, the requests that
complete on the loop (``Connection.on_readable``): most calls do (a signature
with an EC key, random bytes, a find). The replies go out in the same turn of
trio's loop, so a call costs one wakeup of the daemon per batch of clients
rather than a trio task switch, an epoll registration and a failed ``recv``
per request. A request that must wait (a worker thread, an injected delay,
an earlier call of its session), end of file, a protocol error or a reply
the socket does not take at once wake the connection's task
(``Reactor.wake``), which carries on as if it had read the request itself.

A module call (a ``pkcs11`` slot) does not wake the task either when its
request can go out at once: the connection is held (not read) while the
module works (it stays in the epoll set unless its client sends more
meanwhile; then it is taken out until the call is done), the module's lane
is watched in the same epoll set (``watch_reply``), and the reactor reads the
reply in its turn and lets the connection finish the request and send its
answer (``Backend.submit``).

Busy polling: a client that makes one call after another (``C_SignInit`` then
``C_Sign``) sends its next request a few microseconds after it reads a reply.
Sleeping in trio's epoll until then costs more than the call itself on a
virtual machine, so when nothing is runnable and the set is empty the reactor
polls for up to ``microseconds`` before it sleeps, until any connection is
readable (one read by its own task is then served through trio). It does
not poll while several clients are busy (another connection was served
within the last ``QUIET`` seconds): the machine's cores are better left to
them; unless signatures are in flight on the signing thread
(``keygridd.signer``, whose eventfd is watched like a lane), which come
back within tens of microseconds (measured: 1.02-1.06x over sleeping). A
connection that comes back from its task (after a module call, say) wakes a
sleeping reactor to poll for its next request. While it waits for a module's
reply it polls for up to ``REPLY_POLL`` (300 us) if that is longer: a fast
module call (random bytes, an EC signature in SoftHSM2) answers within it.
With ``microseconds = 0`` it never polls.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from typing import Protocol

import trio

from keygridd.runqueue import tasks_runnable

log = logging.getLogger("keygridd.reactor")

QUIET = 0.002  # seconds without another connection's request before the reactor may poll
REPLY_POLL = 0.0003  # seconds polled for a module's reply (a fast call: random bytes, an EC signature)
MAX_FRAMES_PER_TURN = 16  # requests of one connection answered in one turn; the rest go to its task
YIELD_EVERY = 0.001  # seconds the reactor may serve without letting trio run its other tasks and poll its I/O


def _nothing() -> bool:
    return False


class Parkable(Protocol):
    def fileno(self) -> int: ...

    def on_readable(self) -> bool:
        """Answer what has come; False hands the connection back to its task. Never raises."""
        ...


class Reactor:
    """Answers the fast requests of parked connections from one task."""

    def __init__(self, microseconds: int = 0, quiet: float = QUIET) -> None:
        self.budget = microseconds / 1_000_000
        self.quiet = quiet
        self._epoll = select.epoll()  # parked connections, while parked; lanes of module calls started here
        self._all = select.epoll()  # every connection, level-triggered: is anyone waiting?
        self._all.register(self._epoll.fileno(), select.EPOLLIN)  # ... or a module's reply
        self._parked: dict[int, tuple[Parkable, trio.lowlevel.Task]] = {}
        self._holding: dict[int, tuple[Parkable, trio.lowlevel.Task]] = {}  # parked, not read: a module works
        self._held_watched: set[int] = set()  # held connections still in the epoll set (nothing came yet)
        self._replies: dict[int, Callable[[], None]] = {}  # lanes of module calls started here
        self._handoffs = 0
        self._last_fd = -1  # the connection served last
        self._since = 0.0  # when another connection than that one was last served
        self._sleep: trio.CancelScope | None = None  # while the reactor sleeps in trio's epoll
        self.signing: Callable[[], bool] = _nothing  # signatures in flight beside the loop (keygridd.signer)

    async def wait(self, conn: Parkable) -> None:
        """Park ``conn`` until the reactor hands it back to this task (or the task is cancelled)."""
        fd = conn.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (conn, trio.lowlevel.current_task())
        if self._sleep is not None and self.budget:
            self._sleep.cancel()  # a connection back from its task: poll for its next request

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def watches(self, fd: int) -> bool:
        """Is the connection on ``fd`` parked here (read or held)?"""
        return fd in self._parked or fd in self._holding

    def wake(self, fd: int) -> None:
        """Hand a parked connection back to its task."""
        task = self._unpark(fd)
        if task is not None:
            self._handoffs += 1
            trio.lowlevel.reschedule(task)

    def _unpark(self, fd: int) -> trio.lowlevel.Task | None:
        parked = self._parked.pop(fd, None)
        if parked is None:
            parked = self._holding.pop(fd, None)
            if parked is None:
                return None
            if fd not in self._held_watched:
                return parked[1]
            self._held_watched.discard(fd)
        self._unwatch(fd)
        return parked[1]

    def _unwatch(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed meanwhile

    def hold(self, fd: int) -> None:
        """Stop reading a parked connection while a module works on its request (its task stays parked).

        It stays in the epoll set until something comes from it meanwhile (``serve_ready`` takes it out
        then): a call with nothing behind it costs no ``epoll_ctl`` to hold and release."""
        parked = self._parked.pop(fd, None)
        if parked is not None:
            self._holding[fd] = parked
            self._held_watched.add(fd)

    def holds(self, fd: int, conn: Parkable) -> bool:
        """Is ``conn`` held here (and not cancelled meanwhile)?"""
        held = self._holding.get(fd)
        return held is not None and held[0] is conn

    def release(self, fd: int) -> None:
        """Read a held connection again."""
        held = self._holding.pop(fd, None)
        if held is not None:
            if fd in self._held_watched:
                self._held_watched.discard(fd)
            else:
                self._epoll.register(fd, select.EPOLLIN)
            self._parked[fd] = held

    def watch_reply(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` in the reactor's turn while ``fd`` (a module's lane) is readable.

        A lane stays registered, one-shot, from its first call to its closing: arming it again is one
        system call per module call, and nothing needs undoing when the reply has come."""
        self._replies[fd] = on_readable
        self._arm(fd)

    def _arm(self, fd: int) -> None:
        try:
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        except FileNotFoundError:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)

    def unwatch_reply(self, fd: int) -> None:
        """Stop calling the lane's ``on_readable`` (an armed registration fires once more, ignored)."""
        self._replies.pop(fd, None)

    def serve_ready(self, events: list[tuple[int, int]]) -> int:
        """Let each readable parked connection answer what it has received, and each watched lane hand
        over its reply; how many connections went back to their task."""
        self._handoffs = 0
        now = time.perf_counter()
        for fd, _ in events:
            on_reply = self._replies.get(fd)
            if on_reply is not None:
                try:
                    on_reply()
                    if fd in self._replies:
                        self._arm(fd)  # still watched: the rest of the reply is to come
                except Exception:  # a bug: the reactor serves on; the call's deadline fails it
                    log.exception("a module reply handler failed")
                    self.unwatch_reply(fd)
                continue
            if fd != self._last_fd:
                self._last_fd, self._since = fd, now
            parked = self._parked.get(fd)
            if parked is not None:
                if not parked[0].on_readable():
                    self.wake(fd)
            elif fd in self._held_watched:  # a held connection sent more: read it once its call is done
                self._held_watched.discard(fd)
                self._unwatch(fd)
        return self._handoffs

    def watch(self, sock: socket.socket) -> None:
        """Count a new connection in ``nobody_waiting`` and in the busy polls' stop condition."""
        self._all.register(sock.fileno(), select.EPOLLIN)

    def forget(self, sock: socket.socket) -> None:
        """Drop a connection before its socket is closed."""
        try:
            self._all.unregister(sock.fileno())
        except (OSError, ValueError):
            pass  # never watched, or the reactor is closed

    def nobody_waiting(self) -> bool:
        """Has no connection a request waiting to be read? (The daemon's ``may_busy_poll``.)"""
        return not self._all.poll(0)

    def may_poll(self, fd: int) -> bool:
        """May the loop poll for ``fd``'s next request now? Not while several clients are busy or a task
        is runnable."""
        if not self.budget:
            return False
        now = time.perf_counter()
        if fd != self._last_fd:
            self._last_fd, self._since = fd, now
        return now - self._since >= self.quiet and not tasks_runnable()

    def crowded(self) -> bool:
        """Are several clients busy (another connection was served within the last ``quiet`` seconds)?"""
        return time.perf_counter() - self._since < self.quiet

    def receive(self, sock: socket.socket, size: int) -> bytes | None:
        """Busy polling for a connection read by its task: what ``sock`` receives within the budget, or
        None (nothing came, polling is not allowed now, or another connection has a request)."""
        fd = sock.fileno()
        if not self.may_poll(fd):
            return None
        end = time.perf_counter() + self.budget
        while True:
            ready = self._all.poll(0)
            if ready:
                if any(ready_fd != fd for ready_fd, _ in ready):
                    return None  # another client is waiting: the loop serves it first
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    return None  # readiness without data: wait the usual way
            if time.perf_counter() >= end:
                return None

    def poll(self) -> list[tuple[int, int]]:
        """The readable parked connections; polled for up to the budget when the loop is otherwise idle,
        until any connection is readable (one read by its task is then served through trio)."""
        events = self._epoll.poll(0)
        if events or not self.budget:
            return events
        now = time.perf_counter()
        if tasks_runnable():
            return events
        if now - self._since < self.quiet and not self.signing():
            return events
        end = now + (max(self.budget, REPLY_POLL) if self._replies else self.budget)  # the signer's fd is a reply
        while time.perf_counter() < end:
            if self._all.poll(0):
                return self._epoll.poll(0)  # none when it is a connection its task reads
        return []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        yielded = time.perf_counter()
        while True:
            events = self.poll()
            if events and not self.serve_ready(events):
                # Other tasks run between turns when one is runnable, and trio polls its own I/O (a new
                # connection, a worker thread done) at least every YIELD_EVERY. A checkpoint costs about
                # 8 us, half of a short request's work: one every 16 requests cost 4-5% of them.
                if tasks_runnable() or time.perf_counter() - yielded >= YIELD_EVERY:
                    await trio.lowlevel.checkpoint()
                    yielded = time.perf_counter()
            else:
                # Nothing came, or connections went back to their tasks: sleep while they run, so that
                # they see an idle loop (a module call polls for its reply only then).
                with trio.CancelScope() as self._sleep:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                self._sleep = None
                yielded = time.perf_counter()

    def close(self) -> None:
        self._epoll.close()
        self._all.close()
