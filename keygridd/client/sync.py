"""The blocking client: one connection, one call at a time.

Every method of the call table is a method of ``Client`` with the same name
(``c.C_Sign(session, data)``); ``out`` results come back as bytes, failures
as the exception of their CKR. ``call_raw`` returns ``(rv, result)`` for code
that checks return values itself. Thread-safe by a lock; use one client per
thread for concurrency, joined into one application with ``app_id``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from keygridd.client.protocol import ClientProtocol, ProtocolError, default_socket, result_of


class Client:
    def __init__(self, path: str | None = None, *, app_id: bytes | None = None, timeout: float | None = 60.0) -> None:
        self.path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise
        self._proto = ClientProtocol()
        self._lock = threading.Lock()
        try:
            rv, info = self._roundtrip("hello", *self._proto.hello(app_id))
            result = result_of("hello", rv, info[0], info[1])
        except BaseException:
            self._sock.close()
            raise
        self.server_info: dict[str, Any] = result
        self.app_id: bytes = result["app_id"]
        limits = result.get("limits", {})
        self._proto.reader.max_frame = self._proto.max_frame = int(limits.get("max_frame", self._proto.max_frame))

    def _roundtrip(self, method: str, msgid: int, frame: bytes) -> tuple[int, tuple[Any, str | None]]:
        with self._lock:
            self._sock.sendall(frame)
            while True:
                reply = self._proto.next_reply()
                if reply is not None:
                    if reply[0] != msgid:
                        raise ProtocolError(f"reply {reply[0]} to request {msgid}")
                    return reply[1], (reply[2], reply[3])
                data = self._sock.recv(65536)
                if not data:
                    raise ProtocolError("the daemon closed the connection")
                self._proto.feed(data)

    def call_raw(self, method: str, *args: Any) -> tuple[int, Any]:
        msgid, frame = self._proto.request(method, args)
        rv, (result, _message) = self._roundtrip(method, msgid, frame)
        return rv, result

    def pipeline(self, *calls: tuple[str, Sequence[Any]]) -> list[Any]:
        """Send several calls in one write and read their replies: one round trip.

        The daemon answers calls on one session in the order sent. Every call is
        sent, so a later call may fail because an earlier one did (a C_Sign after
        a failed C_SignInit answers CKR_OPERATION_NOT_INITIALIZED); the exception
        raised is the first failure's, in call order.
        """
        requests = [(method, *self._proto.request(method, args)) for method, args in calls]
        with self._lock:
            self._sock.sendall(b"".join(frame for _, _, frame in requests))
            replies: dict[int, tuple[int, Any, str | None]] = {}
            while len(replies) < len(requests):
                reply = self._proto.next_reply()
                if reply is None:
                    data = self._sock.recv(65536)
                    if not data:
                        raise ProtocolError("the daemon closed the connection")
                    self._proto.feed(data)
                    continue
                replies[reply[0]] = reply[1:]
        results = []
        for method, msgid, _ in requests:
            if msgid not in replies:
                raise ProtocolError(f"no reply to request {msgid}")
            results.append(result_of(method, *replies[msgid]))
        return results

    def call(self, method: str, *args: Any) -> Any:
        msgid, frame = self._proto.request(method, args)
        rv, (result, message) = self._roundtrip(method, msgid, frame)
        return result_of(method, rv, result, message)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith(("C_", "KG_")):
            from keygridd.protocol.calls import BY_NAME

            call = BY_NAME.get(name)
            if call is None:
                raise AttributeError(name)
            names = [a.name for a in call.args]
            defaults = {"out_len": None, "pin": None}

            def method(*args: Any, **kwargs: Any) -> Any:
                full = list(args)
                for arg_name in names[len(args) :]:
                    if arg_name in kwargs:
                        full.append(kwargs.pop(arg_name))
                    elif arg_name in defaults:
                        full.append(defaults[arg_name])
                    else:
                        raise TypeError(f"{name}: missing argument {arg_name!r}")
                if kwargs:
                    raise TypeError(f"{name}: unexpected arguments {sorted(kwargs)}")
                return self.call(name, *full)

            method.__name__ = name
            self.__dict__[name] = method  # later lookups skip __getattr__
            return method
        raise AttributeError(name)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(socket_path: str | None = None, **kwargs: Any) -> Client:
    return Client(socket_path, **kwargs)
