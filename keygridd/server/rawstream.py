"""A Unix socket stream for the daemon's hot path.

``trio.SocketStream`` passes through trio's scheduler on every send and
receive (a checkpoint each), which costs more than the call itself for fast
operations. ``RawStream`` tries the non-blocking system call first and only
waits for readiness (``trio.lowlevel.wait_readable`` / ``wait_writable``,
which are checkpoints) when the socket would block, after busy polling for a
moment when the loop is otherwise idle (``Reactor.receive``). The connection
keeps the loop fair by yielding after a run of requests that never had to
wait (``Connection.MAX_UNYIELDED``). An idle connection whose requests
complete on the loop does not read through its stream at all: the reactor
(``keygridd.server.reactor``) reads its socket.
"""

from __future__ import annotations

import socket

import trio

from keygridd.server.reactor import Reactor


class RawStream(trio.abc.HalfCloseableStream):
    """A non-blocking stdlib socket driven by trio's readiness waits."""

    def __init__(self, sock: socket.socket, poller: Reactor | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._closed = False
        self._poller = poller
        if poller is not None:
            poller.watch(sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                return self.sock.recv(max_bytes or 65536)
            except BlockingIOError:
                if self._poller is not None:
                    data = self._poller.receive(self.sock, max_bytes or 65536)
                    if data is not None:
                        return data
                await trio.lowlevel.wait_readable(self.sock)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    def send_nowait(self, data: bytes) -> int:
        """Bytes of ``data`` the socket took without waiting (0 when it would block)."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    async def send_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._poller is not None:
                self._poller.forget(self.sock)
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
        await trio.lowlevel.checkpoint()
