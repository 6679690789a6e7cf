"""keygridd.server.reactor: parking, handing back, busy polling; and a Connection driven by it."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from keygridd.core.core import Core
from keygridd.core.model import Peer
from keygridd.protocol.calls import Call
from keygridd.providers.base import Effect
from keygridd.server.connection import Applications, Connection
from keygridd.server.dispatch import Dispatcher, Pending
from keygridd.server.rawstream import RawStream
from keygridd.server.reactor import MAX_FRAMES_PER_TURN, Reactor

LATE = 0.05  # seconds after which a "client" thread sends


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(2)]
    for daemon_end, _ in made:
        daemon_end.setblocking(False)
    yield made
    for a, b in made:
        a.close()
        b.close()


class Fake:
    """A parkable connection that reads what comes and stays parked while ``keep`` says so."""

    def __init__(self, sock: socket.socket, keep: bool = True) -> None:
        self.sock = sock
        self.keep = keep
        self.received: list[bytes] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> bool:
        self.received.append(self.sock.recv(4096))
        return self.keep


def send_later(sock: socket.socket, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(LATE), sock.send(data)))
    thread.start()
    return thread


async def park(reactor: Reactor, conn: Fake, nursery: trio.Nursery) -> list[bool]:
    """Park ``conn`` in a task of its own; the list gets True when the reactor hands it back."""
    woken: list[bool] = []

    async def parked() -> None:
        await reactor.wait(conn)
        woken.append(True)

    nursery.start_soon(parked)
    await trio.testing.wait_all_tasks_blocked()
    return woken


async def test_answered_requests_leave_the_task_parked(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, client), _ = pairs
    reactor = Reactor()
    conn = Fake(ours)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        woken = await park(reactor, conn, nursery)
        client.send(b"first")
        await trio.testing.wait_all_tasks_blocked()
        assert conn.received == [b"first"] and woken == []
        conn.keep = False
        client.send(b"second")
        await trio.testing.wait_all_tasks_blocked()
        assert conn.received == [b"first", b"second"] and woken == [True]
        client.send(b"not the reactor's any more")
        await trio.testing.wait_all_tasks_blocked()
        assert len(conn.received) == 2
        nursery.cancel_scope.cancel()
    reactor.close()


class Endless(Fake):
    """A connection that always has more to read, for ``limit`` turns: then it goes back to its task
    (so that a reactor that never yields ends, and the test fails instead of hanging)."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        super().__init__(sock)
        self.turns = 0
        self.limit = limit

    def on_readable(self) -> bool:
        self.turns += 1  # reads nothing: the socket stays readable
        return self.turns < self.limit


async def test_a_reactor_that_never_runs_out_of_requests_lets_other_tasks_run(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, client), (other, other_client) = pairs
    reactor = Reactor()
    conn = Endless(ours, limit=2_000_000)
    client.send(b"always readable")
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(reactor.wait, conn)  # (park() would wait for all tasks to block: they never do)
        while not conn.turns:
            await trio.sleep(0)
        before = conn.turns
        for _ in range(10):
            await trio.sleep(0)  # a runnable task runs between the reactor's turns
        assert before < conn.turns < conn.limit
        writer = send_later(other_client, b"x")
        await trio.lowlevel.wait_readable(other)  # trio still polls its own I/O
        writer.join()
        await trio.sleep(0.01)  # and runs its timers
        assert conn.turns < conn.limit  # all that while the reactor served on
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_cancelled_wait_leaves_the_reactor(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, client), _ = pairs
    reactor = Reactor()
    conn = Fake(ours)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        with trio.move_on_after(0.01) as scope:
            await reactor.wait(conn)
        assert scope.cancelled_caught
        client.send(b"unseen")
        await trio.testing.wait_all_tasks_blocked()
        assert conn.received == []
        conn.keep = False
        woken = await park(reactor, conn, nursery)  # parking again works: nothing was left registered
        await trio.testing.wait_all_tasks_blocked()
        assert conn.received == [b"unseen"] and woken == [True]
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_request_that_comes_soon_is_polled_for(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, client), _ = pairs
    reactor = Reactor(2_000_000, quiet=0)
    reactor.watch(ours)
    async with trio.open_nursery() as nursery:
        await park(reactor, Fake(ours), nursery)
        thread = send_later(client, b"soon")
        started = time.monotonic()
        assert reactor.poll() == [(ours.fileno(), 1)]
        assert time.monotonic() - started < 1  # it ended when the request came, not at the budget
        thread.join()
        nursery.cancel_scope.cancel()
    reactor.close()


@pytest.mark.parametrize("why", ["zero budget", "a task is runnable", "another client was served"])
async def test_when_the_reactor_does_not_poll(pairs: list[tuple[socket.socket, socket.socket]], why: str) -> None:
    (ours, client), (other, _) = pairs
    budget = 0 if why == "zero budget" else 2_000_000
    reactor = Reactor(budget, quiet=3600 if why == "another client was served" else 0)
    reactor.watch(ours)
    async with trio.open_nursery() as nursery:
        await park(reactor, Fake(ours), nursery)
        if why == "another client was served":
            reactor.serve_ready([(other.fileno(), 1)])  # not parked: only counted
        if why == "a task is runnable":
            nursery.start_soon(trio.lowlevel.checkpoint)
        thread = send_later(client, b"late")
        assert reactor.poll() == []
        thread.join()
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_request_on_a_task_read_connection_ends_the_reactors_poll(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, _), (other, other_client) = pairs
    reactor = Reactor(2_000_000, quiet=0)
    reactor.watch(ours)
    reactor.watch(other)  # read by its task: watched, not parked
    async with trio.open_nursery() as nursery:
        await park(reactor, Fake(ours), nursery)
        thread = send_later(other_client, b"for the task")
        started = time.monotonic()
        assert reactor.poll() == []  # nothing for the reactor: its task is served next
        assert time.monotonic() - started < 1
        thread.join()
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_client_alone_for_the_quiet_time_is_polled_for(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, client), _ = pairs
    reactor = Reactor(2_000_000, quiet=0.01)
    reactor.watch(ours)
    async with trio.open_nursery() as nursery:
        conn = Fake(ours)
        await park(reactor, conn, nursery)
        client.send(b"one")
        reactor.serve_ready(reactor.poll())
        assert conn.received == [b"one"]
        await trio.sleep(0.02)
        thread = send_later(client, b"two")
        assert reactor.poll() == [(ours.fileno(), 1)]
        thread.join()
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_task_read_connection_takes_a_request_already_sent(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, client), _ = pairs
    reactor = Reactor(100, quiet=0)
    reactor.watch(ours)
    client.send(b"request")
    assert reactor.receive(ours, 4096) == b"request"
    reactor.close()


async def test_a_task_read_connection_polls_for_a_request_that_comes_soon(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, client), _ = pairs
    reactor = Reactor(2_000_000, quiet=0)
    reactor.watch(ours)
    thread = send_later(client, b"soon")
    assert reactor.receive(ours, 4096) == b"soon"
    thread.join()
    reactor.close()


@pytest.mark.parametrize(
    "why", ["nothing comes", "zero budget", "a task is runnable", "another client was served", "a parked one is ready"]
)
async def test_when_a_task_read_connection_is_not_polled_for(
    pairs: list[tuple[socket.socket, socket.socket]], why: str
) -> None:
    (ours, client), (other, other_client) = pairs
    budget = {"nothing comes": 2000, "zero budget": 0}.get(why, 2_000_000)
    reactor = Reactor(budget, quiet=3600 if why == "another client was served" else 0)
    reactor.watch(ours)
    async with trio.open_nursery() as nursery:
        if why == "another client was served":
            assert not reactor.may_poll(other.fileno())
        if why == "a task is runnable":
            nursery.start_soon(trio.lowlevel.checkpoint)
        if why == "a parked one is ready":
            parked = Fake(other)
            reactor.watch(other)  # as every connection's stream does
            await park(reactor, parked, nursery)
            other_client.send(b"waiting")
        thread = send_later(client, b"late") if why != "nothing comes" else None
        assert reactor.receive(ours, 4096) is None
        if thread is not None:
            thread.join()
        if why == "a parked one is ready":
            assert parked.received == []  # the reactor serves it once the loop runs
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_waiting_request_on_any_connection_is_seen(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, _), (other, other_client) = pairs
    reactor = Reactor()
    reactor.watch(ours)
    reactor.watch(other)
    assert reactor.nobody_waiting()
    other_client.send(b"waiting")
    assert not reactor.nobody_waiting()
    reactor.forget(other)
    reactor.forget(other)  # twice: no error
    assert reactor.nobody_waiting()
    reactor.close()
    reactor.forget(ours)  # after close: no error


async def test_another_waiting_connection_ends_a_task_read_poll(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    (ours, client), (other, other_client) = pairs
    reactor = Reactor(2_000_000, quiet=0)
    reactor.watch(ours)
    reactor.watch(other)
    other_client.send(b"waiting")
    thread = send_later(client, b"mine")
    assert reactor.receive(ours, 4096) is None  # the other client is served first, through the loop
    thread.join()
    assert other.recv(4096) == b"waiting"
    assert reactor.receive(ours, 4096) == b"mine"
    reactor.close()


# --- a Connection over a socket pair, driven by the reactor ------------------------------------


def frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def read_messages(sock: socket.socket, count: int) -> list[Any]:
    sock.setblocking(True)
    sock.settimeout(5)
    unpacker = msgpack.Unpacker(raw=False)
    buffer = b""
    out: list[Any] = []
    while len(out) < count:
        while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buffer += chunk
        (length,) = struct.unpack(">I", buffer[:4])
        unpacker.feed(buffer[4 : 4 + length])
        out.extend(unpacker)
        buffer = buffer[4 + length :]
    return out


HELLO = frame([0, 1, "hello", [{"versions": [1, 1]}]])


def connection(sock: socket.socket, reactor: Reactor) -> Connection:
    apps = Applications(Dispatcher(Core([]), {}, trio.CapacityLimiter(1), 16))
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    return Connection(RawStream(sock), peer, apps, 1 << 20, 16, reactor)


async def test_more_pipelined_requests_than_one_turn_takes(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, client), _ = pairs
    reactor = Reactor()
    conn = connection(ours, reactor)
    count = 3 * MAX_FRAMES_PER_TURN + 1
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(conn.serve)
        client.send(HELLO)
        assert (await trio.to_thread.run_sync(read_messages, client, 1))[0][2] == 0
        client.sendall(b"".join(frame([0, 10 + i, "C_GetSlotList", [False]]) for i in range(count)))
        replies = await trio.to_thread.run_sync(read_messages, client, count)
        assert [reply[1] for reply in replies] == [10 + i for i in range(count)]
        assert all(reply[2] == 0 and reply[3] == [] for reply in replies)
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_replies_the_socket_does_not_take_at_once(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    (ours, client), _ = pairs
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reactor = Reactor()
    conn = connection(ours, reactor)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(conn.serve)
        client.send(HELLO)
        assert (await trio.to_thread.run_sync(read_messages, client, 1))[0][2] == 0
        # Unknown methods are answered on the loop with a message; many of them fill the socket.
        count = MAX_FRAMES_PER_TURN
        client.sendall(b"".join(frame([0, 100 + i, "C_" + "X" * 3000, []]) for i in range(count)))
        await trio.testing.wait_all_tasks_blocked()
        replies = await trio.to_thread.run_sync(read_messages, client, count)
        assert [reply[1] for reply in replies] == [100 + i for i in range(count)]
        assert all(reply[2] == 0x54 for reply in replies)  # CKR_FUNCTION_NOT_SUPPORTED
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_a_failure_in_the_reactor_ends_only_that_connection(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (ours, client), (other, other_client) = pairs
    reactor = Reactor()
    broken, healthy = connection(ours, reactor), connection(other, reactor)

    def fail(*_: Any) -> None:
        raise RuntimeError("a bug")

    outcome: list[str] = []

    async def serve_broken() -> None:
        try:
            await broken.serve()
        except* RuntimeError as group:
            outcome.extend(str(exc) for exc in group.exceptions)

    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(serve_broken)
        nursery.start_soon(healthy.serve)
        for sock in (client, other_client):
            sock.send(HELLO)
            assert (await trio.to_thread.run_sync(read_messages, sock, 1))[0][2] == 0
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(broken, "begin", fail)
        client.send(frame([0, 2, "C_GetSlotList", [False]]))
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["a bug"]
        other_client.send(frame([0, 2, "C_GetSlotList", [False]]))
        assert (await trio.to_thread.run_sync(read_messages, other_client, 1))[0][:3] == [1, 2, 0]
        nursery.cancel_scope.cancel()
    reactor.close()


async def test_after_a_request_that_waited_the_task_reads_the_next_itself(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (ours, client), _ = pairs
    reactor = Reactor()
    conn = connection(ours, reactor)
    answer_at_once = conn.dispatcher.start

    def delayed(app: Any, call: Call, args: list[Any]) -> Pending:
        return Pending(app, call, args, Effect(0.001, None))

    async def call_and_settle(msgid: int) -> list[Any]:
        client.send(frame([0, msgid, "C_GetSlotList", [False]]))
        reply = (await trio.to_thread.run_sync(read_messages, client, 1))[0]
        await trio.testing.wait_all_tasks_blocked()
        return list(reply[:4])

    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(conn.serve)
        client.send(HELLO)
        assert (await trio.to_thread.run_sync(read_messages, client, 1))[0][2] == 0
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.watches(ours.fileno())
        monkeypatch.setattr(conn.dispatcher, "start", delayed)
        assert await call_and_settle(2) == [1, 2, 0, []]
        assert not reactor.watches(ours.fileno())  # its task reads: the request had to wait
        monkeypatch.setattr(conn.dispatcher, "start", answer_at_once)
        assert await call_and_settle(3) == [1, 3, 0, []]
        assert reactor.watches(ours.fileno())  # answered at once: back with the reactor
        nursery.cancel_scope.cancel()
    reactor.close()
