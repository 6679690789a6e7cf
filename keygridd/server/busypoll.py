"""Busy polling: waiting a few microseconds for a client's next request without sleeping.

A client that makes one call after another (a signature is ``C_SignInit``
then ``C_Sign``) sends its next request a few microseconds after it reads a
reply. Sleeping in trio's epoll until then costs more than the call itself on
a virtual machine: the kernel parks the loop's thread, wakes it, and trio's
scheduler runs once more. So when a connection has nothing to read and the
loop has nothing else to run, it polls for up to ``microseconds`` before it
waits the usual way.

Polling must never keep the loop from another client: it stops as soon as
any other connection has something to read (one level-triggered epoll set
holds every connection, checked with a zero timeout on each turn) or a task
becomes runnable, and it is bounded in time. Nor may it take the CPU from
clients: when the loop has served another connection within the last
``QUIET`` seconds, several clients are busy, the machine's cores are better
left to them, and the loop sleeps as usual. With ``microseconds = 0`` the
daemon never polls.
"""

from __future__ import annotations

import select
import socket
import time

import trio

QUIET = 0.002  # seconds without another connection's request before one connection may poll


class BusyPoll:
    """Polls a connection's socket for a short while when nothing else needs the loop."""

    def __init__(self, microseconds: int, quiet: float = QUIET) -> None:
        self.budget = microseconds / 1_000_000
        self.quiet = quiet
        self._others = select.epoll() if microseconds > 0 else None
        self._last_fd = -1  # the connection that last waited for a request
        self._since = 0.0  # when the loop last served another one

    def watch(self, sock: socket.socket) -> None:
        """Include a connection in the set whose readiness stops a poll."""
        if self._others is not None:
            self._others.register(sock.fileno(), select.EPOLLIN)

    def forget(self, sock: socket.socket) -> None:
        """Drop a connection before its socket is closed."""
        if self._others is not None:
            try:
                self._others.unregister(sock.fileno())
            except (OSError, ValueError):
                pass  # never watched, or already closed

    def receive(self, sock: socket.socket, size: int) -> bytes | None:
        """What ``sock`` receives within the budget, or None: nothing came, or the loop has other work."""
        others = self._others
        if others is None:
            return None
        fd = sock.fileno()
        now = time.perf_counter()
        if fd != self._last_fd:
            self._last_fd, self._since = fd, now
        if now - self._since < self.quiet:
            return None  # another client was served just now: several are busy
        if trio.lowlevel.current_statistics().tasks_runnable:
            return None
        end = now + self.budget
        while True:
            ready = others.poll(0)
            if ready:
                if any(ready_fd != fd for ready_fd, _ in ready):
                    return None  # another client is waiting: the loop serves it first
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    return None  # readiness without data (a spurious wakeup): wait the usual way
            if time.perf_counter() >= end:
                return None

    def close(self) -> None:
        if self._others is not None:
            self._others.close()
            self._others = None
