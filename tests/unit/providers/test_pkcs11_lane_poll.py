"""The pkcs11 provider's lane: polling for a module's reply gives way to waiting clients; replies put together."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from keygridd.core.offload import may_busy_poll
from keygridd.providers.pkcs11 import lanes

LATE = 0.05  # seconds after which the "worker" replies


@pytest.fixture
def lane(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, socket.socket]]:
    monkeypatch.setattr(lanes, "SPIN", 5.0)  # long enough to catch the late reply
    daemon_end, worker_end = socket.socketpair()
    daemon_end.setblocking(False)
    yield daemon_end, worker_end
    daemon_end.close()
    worker_end.close()


def reply_later(sock: socket.socket) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(LATE), sock.send(b"reply")))
    thread.start()
    return thread


async def test_a_reply_that_comes_soon_is_polled_for(lane: tuple[socket.socket, socket.socket]) -> None:
    daemon_end, worker_end = lane
    thread = reply_later(worker_end)
    assert lanes.spin(daemon_end) == b"reply"
    thread.join()


async def test_a_waiting_client_ends_the_poll(lane: tuple[socket.socket, socket.socket]) -> None:
    daemon_end, worker_end = lane
    asked: list[bool] = []

    def client_waiting() -> bool:
        asked.append(True)
        return len(asked) < 3  # a client's request arrives during the poll

    token = may_busy_poll.set(client_waiting)
    try:
        thread = reply_later(worker_end)
        started = time.monotonic()
        assert lanes.spin(daemon_end) is None
        assert time.monotonic() - started < LATE  # it gave way before the reply came
        thread.join()
    finally:
        may_busy_poll.reset(token)
    assert len(asked) == 3


def reply(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_a_reply_read_in_pieces_is_put_together() -> None:
    a, b = socket.socketpair()
    lane = lanes.Lane(a)
    try:
        whole = reply(b"x" * 10)
        assert lane.take(whole[:2]) is None  # not even the length yet
        assert lane.take(whole[2:7]) is None
        assert lane.take(whole[7:]) == b"x" * 10
        assert lane.clean
        # Two replies in one read (the first one a cancelled call's): one at a time.
        assert lane.take(reply(b"first") + reply(b"second")[:3]) == b"first"
        assert not lane.clean
        assert lane.take(reply(b"second")[3:]) == b"second"
        assert lane.clean
    finally:
        a.close()
        b.close()


def test_a_reply_frame_too_long_ends_the_lane() -> None:
    a, b = socket.socketpair()
    lane = lanes.Lane(a)
    try:
        with pytest.raises(EOFError, match="too long"):
            lane.take((lanes.MAX_FRAME + 1).to_bytes(4, "big") + b"x")
    finally:
        a.close()
        b.close()
