"""keygridd.server.busypoll: when a connection polls for its next request and when it gives way."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from keygridd.server.busypoll import BusyPoll


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(2)]
    for daemon_end, _ in made:
        daemon_end.setblocking(False)
    yield made
    for a, b in made:
        a.close()
        b.close()


async def test_a_request_already_sent_is_taken(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(100, quiet=0)
    (ours, client), (other, _) = pairs
    poll.watch(ours)
    poll.watch(other)
    client.send(b"request")
    assert poll.receive(ours, 4096) == b"request"
    poll.close()


async def test_nothing_comes_within_the_budget(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(200, quiet=0)
    (ours, _), _ = pairs
    poll.watch(ours)
    assert poll.receive(ours, 4096) is None
    poll.close()


async def test_another_ready_connection_stops_the_poll(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(10_000, quiet=0)
    (ours, client), (other, other_client) = pairs
    poll.watch(ours)
    poll.watch(other)
    other_client.send(b"waiting")
    client.send(b"mine")
    assert poll.receive(ours, 4096) is None  # the other client is served first, through the loop
    assert other.recv(4096) == b"waiting"
    assert poll.receive(ours, 4096) == b"mine"
    poll.close()


async def test_a_runnable_task_stops_the_poll(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(10_000, quiet=0)
    (ours, client), _ = pairs
    poll.watch(ours)
    client.send(b"mine")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
        assert poll.receive(ours, 4096) is None  # the new task must run first
    assert poll.receive(ours, 4096) == b"mine"
    poll.close()


async def test_zero_never_polls(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(0, quiet=0)
    (ours, client), _ = pairs
    poll.watch(ours)
    client.send(b"mine")
    assert poll.receive(ours, 4096) is None
    poll.forget(ours)
    poll.close()


async def test_forgotten_and_closed_sockets_do_not_count(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(10_000, quiet=0)
    (ours, client), (other, other_client) = pairs
    poll.watch(ours)
    poll.watch(other)
    other_client.send(b"never read")
    poll.forget(other)
    poll.forget(other)  # twice: no error
    client.send(b"mine")
    assert poll.receive(ours, 4096) == b"mine"
    poll.close()
    poll.forget(ours)  # after close: no error


async def test_no_poll_while_other_clients_are_busy(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(10_000, quiet=3600)
    (ours, client), (other, _) = pairs
    poll.watch(ours)
    poll.watch(other)
    client.send(b"mine")
    assert poll.receive(ours, 4096) is None  # the first wait of a connection: it has not had the loop to itself
    assert poll.receive(other, 4096) is None
    assert poll.receive(ours, 4096) is None  # another connection was served just now
    poll.close()


async def test_a_connection_alone_for_the_quiet_time_polls(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    poll = BusyPoll(10_000, quiet=0.01)
    (ours, client), _ = pairs
    poll.watch(ours)
    assert poll.receive(ours, 4096) is None
    await trio.sleep(0.02)
    client.send(b"mine")
    assert poll.receive(ours, 4096) == b"mine"
    poll.close()
