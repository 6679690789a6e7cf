"""The trio client: many calls in flight on one connection, matched by request id.

async with open_client(path) as c:
    sig = await c.call("C_Sign", session, data, None)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from keygridd.client.protocol import ClientProtocol, ProtocolError, default_socket, result_of


class TrioClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = ClientProtocol()
        self.waiting: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.send_lock = trio.Lock()
        self.server_info: dict[str, Any] = {}
        self.closed: BaseException | None = None

    async def _reader(self) -> None:
        try:
            while True:
                reply = self.proto.next_reply()
                if reply is None:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        raise ProtocolError("the daemon closed the connection")
                    self.proto.feed(data)
                    continue
                entry = self.waiting.pop(reply[0], None)
                if entry is not None:
                    entry[1].extend(reply[1:])
                    entry[0].set()
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.closed = exc
            for event, _ in self.waiting.values():
                event.set()
            self.waiting.clear()

    async def _send(self, msgid: int, frame: bytes) -> list[Any]:
        if self.closed is not None:
            raise ProtocolError(f"connection closed: {self.closed}")
        event, slot = trio.Event(), list[Any]()
        self.waiting[msgid] = (event, slot)
        async with self.send_lock:
            await self.stream.send_all(frame)
        await event.wait()
        if not slot:
            raise ProtocolError(f"connection closed: {self.closed}")
        return slot

    async def hello(self, app_id: bytes | None = None) -> dict[str, Any]:
        rv, result, message = await self._send(*self.proto.hello(app_id))
        self.server_info = result_of("hello", rv, result, message)
        return self.server_info

    async def call(self, method: str, *args: Any) -> Any:
        rv, result, message = await self._send(*self.proto.request(method, args))
        return result_of(method, rv, result, message)

    async def call_raw(self, method: str, *args: Any) -> tuple[int, Any]:
        rv, result, _ = await self._send(*self.proto.request(method, args))
        return rv, result


@asynccontextmanager
async def open_client(path: str | None = None, app_id: bytes | None = None) -> AsyncIterator[TrioClient]:
    stream = await trio.open_unix_socket(path or default_socket())
    async with stream, trio.open_nursery() as nursery:
        client = TrioClient(stream)
        nursery.start_soon(client._reader)
        await client.hello(app_id)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
