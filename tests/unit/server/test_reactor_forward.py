"""Module calls started and finished by the reactor (``Connection.forward``), with a backend of sockets.

The backend here stands for a module worker: ``submit`` "sends" a call by
making a socket pair whose far end the test writes the result to, and has
the reactor watch the near end, as ``ModuleWorker.submit`` watches a lane.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from keygridd.core.offload import Done, Forward, ReplyWatcher
from keygridd.protocol.calls import Call
from keygridd.server import reactor as reactor_module
from keygridd.server.connection import Connection
from keygridd.server.dispatch import Pending
from keygridd.server.reactor import Reactor
from tests.unit.server.test_reactor import HELLO, connection, frame, pairs, read_messages, send_later

__all__ = ["pairs"]  # the fixture, used by name


class SocketBackend:
    """Calls that complete when the test says so; ``submit`` can be told to decline."""

    generation = 0

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.accept = True
        self.started: list[tuple[str, socket.socket]] = []  # method, the far end to answer on
        self.awaited: list[str] = []

    def submit(self, method: str, args: Sequence[Any], done: Done, watcher: ReplyWatcher) -> bool:
        if not self.accept:
            return False
        near, far = socket.socketpair()
        near.setblocking(False)

        def on_readable() -> None:
            value = msgpack.unpackb(near.recv(4096))
            watcher.unwatch_reply(near.fileno())
            near.close()
            done(value, None)

        watcher.watch_reply(near.fileno(), on_readable)
        self.started.append((method, far))
        return True

    async def call(self, method: str, args: Sequence[Any]) -> Any:
        self.awaited.append(method)
        await trio.sleep(0)
        return f"{method} awaited"

    def answer(self, index: int, value: Any) -> None:
        _, far = self.started[index]
        far.send(msgpack.packb(value))
        far.close()


def forwarding(conn: Connection, backend: SocketBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call makes two module calls, one after the other, and answers with both results."""

    def start(app: Any, call: Call, args: list[Any]) -> Pending:
        def work() -> Generator[Forward, Any, list[Any]]:
            first = yield Forward(backend, "C_First", [])
            second = yield Forward(backend, "C_Second", [])
            return [first, second]

        gen = work()
        return Pending(app, call, args, None, gen, next(gen))

    async def never(pending: Pending) -> Any:
        raise AssertionError("the connection's task finished a module call the reactor started")

    monkeypatch.setattr(conn.dispatcher, "start", start)
    monkeypatch.setattr(conn.dispatcher, "finish", never)


async def hello(client: socket.socket) -> None:
    client.send(HELLO)
    assert (await trio.to_thread.run_sync(read_messages, client, 1))[0][2] == 0


@contextlib.asynccontextmanager
async def served(
    ours: socket.socket, client: socket.socket
) -> AsyncIterator[tuple[Reactor, Connection, SocketBackend]]:
    """A reactor and a connection on ``ours``, past the handshake, with a backend of sockets."""
    reactor = Reactor()
    conn = connection(ours, reactor)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            nursery.start_soon(conn.serve)
            await hello(client)
            yield reactor, conn, SocketBackend(reactor)
            nursery.cancel_scope.cancel()
    finally:
        reactor.close()


async def test_module_calls_are_started_and_finished_by_the_reactor(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (ours, client), _ = pairs
    async with served(ours, client) as (reactor, conn, backend):
        forwarding(conn, backend, monkeypatch)
        # Two requests in one write: the second waits, unread, behind the first one's module calls.
        client.send(frame([0, 2, "C_GetSlotList", [False]]) + frame([0, 3, "C_GetSlotList", [False]]))
        await trio.testing.wait_all_tasks_blocked()
        assert [method for method, _ in backend.started] == ["C_First"]
        assert reactor.holds(ours.fileno(), conn)
        backend.answer(0, "one")
        await trio.testing.wait_all_tasks_blocked()
        assert [method for method, _ in backend.started] == ["C_First", "C_Second"]  # the next, from the loop
        backend.answer(1, "two")
        await trio.testing.wait_all_tasks_blocked()
        assert [method for method, _ in backend.started] == ["C_First", "C_Second", "C_First"]  # request 3
        backend.answer(2, "three")
        await trio.testing.wait_all_tasks_blocked()
        backend.answer(3, "four")
        replies = await trio.to_thread.run_sync(read_messages, client, 2)
        assert [reply[:4] for reply in replies] == [[1, 2, 0, ["one", "two"]], [1, 3, 0, ["three", "four"]]]
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.watches(ours.fileno()) and not reactor.holds(ours.fileno(), conn)  # read again
        assert backend.awaited == []


async def test_a_request_sent_while_the_module_works_waits_for_it(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held connection stays in the reactor's set until something comes from it; then it is taken out
    (not read, and not reported again and again), and put back when the module's call is done."""
    (ours, client), _ = pairs
    async with served(ours, client) as (reactor, conn, backend):
        forwarding(conn, backend, monkeypatch)
        client.send(frame([0, 2, "C_GetSlotList", [False]]))
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.holds(ours.fileno(), conn)
            client.send(frame([0, 3, "C_GetSlotList", [False]]))
            await trio.testing.wait_all_tasks_blocked()  # a reactor spinning on the readable fd never blocks
            assert [method for method, _ in backend.started] == ["C_First"]
            backend.answer(0, "one")
            await trio.testing.wait_all_tasks_blocked()
            backend.answer(1, "two")
            await trio.testing.wait_all_tasks_blocked()
            assert [method for method, _ in backend.started] == ["C_First", "C_Second", "C_First"]
            backend.answer(2, "three")
            await trio.testing.wait_all_tasks_blocked()
            backend.answer(3, "four")
        replies = await trio.to_thread.run_sync(read_messages, client, 2)
        assert [reply[:4] for reply in replies] == [[1, 2, 0, ["one", "two"]], [1, 3, 0, ["three", "four"]]]


async def test_a_module_call_that_cannot_go_out_at_once_is_awaited_by_the_task(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (ours, client), _ = pairs
    async with served(ours, client) as (reactor, conn, backend):
        finish = conn.dispatcher.finish
        forwarding(conn, backend, monkeypatch)
        monkeypatch.setattr(conn.dispatcher, "finish", finish)
        backend.accept = False  # no free lane, say
        client.send(frame([0, 2, "C_GetSlotList", [False]]))
        (reply,) = await trio.to_thread.run_sync(read_messages, client, 1)
        assert reply[:4] == [1, 2, 0, ["C_First awaited", "C_Second awaited"]]
        assert backend.awaited == ["C_First", "C_Second"]
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.watches(ours.fileno())  # a module call leaves the connection with the reactor
        # The first call goes out from the loop, the second cannot: the task takes over in the middle.
        backend.accept = True
        client.send(frame([0, 3, "C_GetSlotList", [False]]))
        await trio.testing.wait_all_tasks_blocked()
        backend.accept = False
        backend.answer(0, "one")
        (reply,) = await trio.to_thread.run_sync(read_messages, client, 1)
        assert reply[:4] == [1, 3, 0, ["one", "C_Second awaited"]]


async def test_a_connection_that_ends_while_a_module_works(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away during the module call: the reply finds the end, and the task closes the
    connection; the reactor and the other connection go on."""
    (ours, client), (other, other_client) = pairs
    reactor = Reactor()
    conn, bystander = connection(ours, reactor), connection(other, reactor)
    backend = SocketBackend(reactor)
    ended = trio.Event()

    async def serve() -> None:
        await conn.serve()
        ended.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(serve)
        nursery.start_soon(bystander.serve)
        await hello(client)
        await hello(other_client)
        forwarding(conn, backend, monkeypatch)
        client.send(frame([0, 2, "C_GetSlotList", [False]]))
        await trio.testing.wait_all_tasks_blocked()
        client.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not ended.is_set()  # held: nothing reads it until the module answers
        backend.answer(0, "one")
        await trio.testing.wait_all_tasks_blocked()
        backend.answer(1, "two")
        with trio.fail_after(5):
            await ended.wait()
        assert not reactor.watches(ours.fileno())
        other_client.send(frame([0, 2, "C_GetSlotList", [False]]))
        assert (await trio.to_thread.run_sync(read_messages, other_client, 1))[0][:3] == [1, 2, 0]
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_cancelled_connection_drops_its_module_reply(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (ours, client), _ = pairs
    reactor = Reactor()
    conn = connection(ours, reactor)
    backend = SocketBackend(reactor)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        async with trio.open_nursery() as inner:
            inner.start_soon(conn.serve)
            await hello(client)
            forwarding(conn, backend, monkeypatch)
            client.send(frame([0, 2, "C_GetSlotList", [False]]))
            await trio.testing.wait_all_tasks_blocked()
            assert reactor.holds(ours.fileno(), conn)
            inner.cancel_scope.cancel()  # the daemon shuts the connection down
        assert not reactor.watches(ours.fileno())
        backend.answer(0, "one")
        await trio.testing.wait_all_tasks_blocked()
        assert [method for method, _ in backend.started] == ["C_First"]  # dropped, not carried on
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(4096)  # and nothing was sent
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_the_reactor_polls_for_a_module_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Longer than for a client's request (REPLY_POLL), until the reply comes; a lane still watched after
    its handler ran (half a reply read) is armed again, one no longer watched is ignored."""
    monkeypatch.setattr(reactor_module, "REPLY_POLL", 5.0)
    reactor = Reactor(1, quiet=0)  # a microsecond for clients' requests
    near, far = socket.socketpair()
    near.setblocking(False)
    got: list[bytes] = []
    try:
        reactor.watch_reply(near.fileno(), lambda: got.append(near.recv(100)))
        thread = send_later(far, b"half")
        began = time.monotonic()
        events = reactor.poll()
        assert events == [(near.fileno(), select.EPOLLIN)]
        assert time.monotonic() - began < 1  # the reply ended the poll, not the 5 s
        thread.join()
        assert reactor.serve_ready(events) == 0 and got == [b"half"]
        far.send(b"rest")
        events = reactor.poll()
        assert events == [(near.fileno(), select.EPOLLIN)]
        reactor.serve_ready(events)
        assert got == [b"half", b"rest"]
        reactor.unwatch_reply(near.fileno())
        far.send(b"late")
        reactor.serve_ready(reactor.poll())
        assert got == [b"half", b"rest"]
        began = time.monotonic()
        assert reactor.poll() == []  # nothing is watched: the client budget, not REPLY_POLL
        assert time.monotonic() - began < 1
    finally:
        near.close()
        far.close()
        reactor.close()
