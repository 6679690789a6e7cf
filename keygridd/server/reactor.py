"""The reactor: an idle connection's next requests answered without waking its task.

A connection whose task has nothing in flight parks here while it waits for
its client's next request (``Reactor.wait``). One task watches every parked
connection in one level-triggered epoll set. When some are readable it reads
each one and lets the connection answer, there and then, the requests that
complete on the loop (``Connection.on_readable``): most calls do (a signature
with an EC key, random bytes, a find). The replies go out in the same turn of
trio's loop, so a call costs one wakeup of the daemon per batch of clients
rather than a trio task switch, an epoll registration and a failed ``recv``
per request. A request that must wait (a worker thread, a module call, an
injected delay, an earlier call of its session), end of file, a protocol
error or a reply the socket does not take at once wake the connection's task
(``Reactor.wake``), which carries on as if it had read the request itself.

Busy polling: a client that makes one call after another (``C_SignInit`` then
``C_Sign``) sends its next request a few microseconds after it reads a reply.
Sleeping in trio's epoll until then costs more than the call itself on a
virtual machine, so when nothing is runnable and the set is empty the reactor
polls for up to ``microseconds`` before it sleeps, until any connection is
readable (one read by its own task is then served through trio). It never
polls while several clients are busy (another connection was served within
the last ``QUIET`` seconds): the machine's cores are better left to them. A
connection that comes back from its task (after a module call, say) wakes a
sleeping reactor to poll for its next request. With ``microseconds = 0`` it
never polls.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Protocol

import trio

QUIET = 0.002  # seconds without another connection's request before the reactor may poll
MAX_FRAMES_PER_TURN = 16  # requests of one connection answered in one turn; the rest go to its task


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
        self._epoll = select.epoll()  # parked connections, while parked
        self._all = select.epoll()  # every connection, level-triggered: is anyone waiting?
        self._parked: dict[int, tuple[Parkable, trio.lowlevel.Task]] = {}
        self._last_fd = -1  # the connection served last
        self._since = 0.0  # when another connection than that one was last served
        self._sleep: trio.CancelScope | None = None  # while the reactor sleeps in trio's epoll

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
        """Is the connection on ``fd`` parked here?"""
        return fd in self._parked

    def wake(self, fd: int) -> None:
        """Hand a parked connection back to its task."""
        task = self._unpark(fd)
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _unpark(self, fd: int) -> trio.lowlevel.Task | None:
        parked = self._parked.pop(fd, None)
        if parked is None:
            return None
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed meanwhile
        return parked[1]

    def serve_ready(self, events: list[tuple[int, int]]) -> int:
        """Let each readable parked connection answer what it has received; how many went back to their task."""
        woken = 0
        now = time.perf_counter()
        for fd, _ in events:
            if fd != self._last_fd:
                self._last_fd, self._since = fd, now
            parked = self._parked.get(fd)
            if parked is None:
                continue
            if not parked[0].on_readable():
                self.wake(fd)
                woken += 1
        return woken

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
        return now - self._since >= self.quiet and not trio.lowlevel.current_statistics().tasks_runnable

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
        if now - self._since < self.quiet or trio.lowlevel.current_statistics().tasks_runnable:
            return events
        end = now + self.budget
        parked = self._parked
        while time.perf_counter() < end:
            ready = self._all.poll(0)
            if ready:
                return [event for event in ready if event[0] in parked]
        return []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        served = 0
        while True:
            events = self.poll()
            if events and not self.serve_ready(events):
                served += len(events)
                if served >= MAX_FRAMES_PER_TURN:
                    served = 0
                    await trio.lowlevel.checkpoint()  # other tasks run now and then between turns
            else:
                served = 0
                # Nothing came, or connections went back to their tasks: sleep while they run, so that
                # they see an idle loop (a module call polls for its reply only then).
                with trio.CancelScope() as self._sleep:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                self._sleep = None

    def close(self) -> None:
        self._epoll.close()
        self._all.close()
