"""keygridd.server.connection over trio memory streams: no socket, no daemon."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from keygridd.core.core import Core
from keygridd.core.model import Peer
from keygridd.pkcs11 import CKR
from keygridd.server.connection import Applications, Connection
from keygridd.server.dispatch import Dispatcher

MAX_FRAME = 4096


def frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HELLO = frame([0, 1, "hello", [{"versions": [1, 1], "features": ["outlen"], "app_id": None}]])


def make_connection() -> tuple[Connection, trio.abc.Stream, Applications]:
    client, server = trio.testing.memory_stream_pair()
    dispatcher = Dispatcher(Core([]), {}, trio.CapacityLimiter(1), 16)
    apps = Applications(dispatcher)
    peer = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    return Connection(server, peer, apps, MAX_FRAME, 16), client, apps


async def serve_and_close(conn: Connection) -> None:
    """What the daemon's handler does around serve()."""
    try:
        await conn.serve()
    finally:
        await conn.stream.aclose()


async def read_message(stream: trio.abc.Stream, buffer: bytearray) -> Any:
    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    (length,) = struct.unpack(">I", buffer[:4])
    body = bytes(buffer[4 : 4 + length])
    del buffer[: 4 + length]
    return msgpack.unpackb(body, raw=False)


async def test_hello_then_calls_then_eof() -> None:
    conn, client, apps = make_connection()
    buffer = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_and_close, conn)
            await client.send_all(HELLO + frame([0, 2, "C_GetSlotList", [False]]) + frame([0, 3, "C_Nope", []]))
            hello = await read_message(client, buffer)
            assert hello[:3] == [1, 1, CKR.OK]
            assert hello[3]["features"] == ["outlen"]
            assert hello[3]["limits"] == {"max_frame": MAX_FRAME, "max_attributes": 16}
            app_id = hello[3]["app_id"]
            assert isinstance(app_id, bytes) and len(app_id) == 16 and apps.refs == {app_id: 1}
            assert await read_message(client, buffer) == [1, 2, CKR.OK, [], None]
            reply = await read_message(client, buffer)
            assert reply[:4] == [1, 3, CKR.FUNCTION_NOT_SUPPORTED, None]
            await client.aclose()  # the peer goes away: serve returns and the application is closed
    assert apps.refs == {}
    assert apps.dispatcher.core.apps == {}


@pytest.mark.parametrize(
    "data",
    [struct.pack(">I", MAX_FRAME + 1), b"\x00\x00\x00\x00", b"\x00\x00\x00\x01\xc1", frame([0, 1, "KG_Ping", []])],
    ids=["oversize", "zero", "malformed", "not-hello"],
)
async def test_fatal_before_hello(data: bytes) -> None:
    conn, client, apps = make_connection()
    buffer = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_and_close, conn)
            await client.send_all(data)
            message = await read_message(client, buffer)
            assert message[:3] == [2, 0, CKR.ARGUMENTS_BAD]
            assert await read_message(client, buffer) is None  # and then the close
    assert apps.refs == {}


async def test_broken_stream_ends_only_the_connection() -> None:
    client, server = trio.testing.lockstep_stream_pair()
    dispatcher = Dispatcher(Core([]), {}, trio.CapacityLimiter(1), 16)
    apps = Applications(dispatcher)
    conn = Connection(server, Peer(uid=0, gid=0, pid=os.getpid()), apps, MAX_FRAME, 16)

    async def peer() -> None:
        await client.send_all(HELLO)
        await client.aclose()  # closed without reading the hello reply: the daemon's send breaks

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            await conn.serve()
    assert apps.refs == {}
