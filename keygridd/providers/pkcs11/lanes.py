"""The daemon's end of one lane to a module worker: frames out, frames in, and what is in flight.

A lane is one end of a connected Unix stream socket pair; the worker serves
its end from a thread of its own, one call at a time (``worker.py`` describes
the frames). A call goes out in one of two ways:

* awaited by a task (``Lane.roundtrip``): a non-blocking ``send``, then
  ``trio.lowlevel.wait_readable`` for the reply, after polling for it briefly
  while nothing else is runnable (``spin``);
* started from the loop (``ModuleWorker.submit``): the request is sent at once
  and the reply is read by whoever watches the lane (the server's reactor),
  which hands each chunk to ``Lane.take``.
"""

from __future__ import annotations

import select
import socket
import time

import trio

from keygridd.core.offload import may_busy_poll
from keygridd.providers.pkcs11.worker import MAX_FRAME
from keygridd.runqueue import tasks_runnable

RECV_SIZE = 1 << 16
SPIN = 0.0002  # seconds an awaited call polls for its reply before it sleeps (see spin)
IDLE, SENDING, WAITING = 0, 1, 2


def spin(sock: socket.socket) -> bytes | None:
    """Poll for a reply for up to SPIN seconds, while the loop has nothing else to do (else None).

    A fast module call (random bytes, an ECDSA signature) answers within that
    time; polling for it costs nothing the loop could have used and saves a
    pass through epoll and the scheduler, which here costs more than the call.
    The poll ends as soon as a task is runnable or a client has a request
    waiting (``may_busy_poll``): the loop serves them meanwhile.
    """
    if tasks_runnable():
        return None
    allowed = may_busy_poll.get()
    ready = select.poll()
    ready.register(sock, select.POLLIN)
    end = time.perf_counter() + SPIN
    while allowed():
        if ready.poll(0):
            try:
                return sock.recv(RECV_SIZE)
            except BlockingIOError:
                return None  # readiness without data: wait the usual way
        if time.perf_counter() >= end:
            break
    return None


class Lane:
    """One socket of the daemon's end, and the state of the call on it."""

    __slots__ = ("_buffer", "closed", "orphans", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()
        self.state = IDLE
        self.orphans = 0  # replies of cancelled calls still to come; the next call discards them
        self.closed = False

    @property
    def clean(self) -> bool:
        """Nothing of an earlier call is still to come or half read."""
        return not self.orphans and not self._buffer

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def take(self, chunk: bytes) -> bytes | None:
        """Add what was received; the body of the reply once it is whole (EOFError: a frame too long)."""
        buffer = self._buffer
        if not buffer and len(chunk) >= 4 and len(chunk) == 4 + int.from_bytes(chunk[:4], "big"):
            return chunk[4:]  # the usual case: one recv, one whole reply
        buffer += chunk
        if len(buffer) < 4:
            return None
        end = 4 + int.from_bytes(buffer[:4], "big")
        if end > 4 + MAX_FRAME:
            raise EOFError("a reply frame is too long")
        if len(buffer) < end:
            return None
        body = bytes(buffer[4:end])
        del buffer[:end]
        return body

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
                self.state = SENDING
            await trio.lowlevel.wait_writable(self.sock)

    async def receive(self) -> bytes:
        while True:
            if len(self._buffer) >= 4:
                body = self.take(b"")
                if body is not None:
                    return body
            got: bytes | None
            try:
                got = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                got = spin(self.sock)
            if got is None:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not got:
                raise EOFError("the worker closed the lane")
            body = self.take(got)
            if body is not None:
                return body

    async def roundtrip(self, frame: bytes) -> bytes:
        while self.orphans:
            await self.receive()
            self.orphans -= 1
        await self.send(frame)
        self.state = WAITING
        body = await self.receive()
        self.state = IDLE
        return body


__all__ = ["IDLE", "RECV_SIZE", "SENDING", "SPIN", "WAITING", "Lane", "spin"]
