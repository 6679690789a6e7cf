"""The client side of the wire, without I/O: requests out, replies in.

``ClientProtocol`` numbers requests, encodes arguments by the call table and
turns replies into results or exceptions (the ``keygridd.pkcs11.errors``
class of the CKR). The sync and trio clients only move its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from keygridd.pkcs11 import CKR
from keygridd.pkcs11.errors import DeviceError, error_for
from keygridd.protocol import codec
from keygridd.protocol.calls import BY_NAME, FEATURES, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN
from keygridd.protocol.framing import DEFAULT_MAX_FRAME, FrameReader, encode_frame

DEFAULT_SOCKET = "/run/keygrid/keygrid.sock"

# Codes that come with a result the caller still wants (C_GetAttributeValue's partial values).
PARTIAL_OK = {CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID}


def default_socket() -> str:
    return os.environ.get("KEYGRID_SOCKET") or DEFAULT_SOCKET


class ProtocolError(Exception):
    """The daemon sent something this client cannot understand, or closed the connection."""


class ClientProtocol:
    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.reader = FrameReader(max_frame)
        self.max_frame = max_frame
        self._next_id = 1
        self.server_info: dict[str, Any] = {}

    def hello(self, app_id: bytes | None = None, client: str = "keygridd.client") -> tuple[int, bytes]:
        request = {
            "versions": [PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX],
            "features": list(FEATURES),
            "app_id": app_id,
            "client": client,
        }
        return self._frame("hello", [request])

    def request(self, method: str, args: Sequence[Any]) -> tuple[int, bytes]:
        call = BY_NAME[method]
        if len(args) != len(call.args):
            raise TypeError(f"{method} takes {len(call.args)} arguments ({', '.join(a.name for a in call.args)})")
        return self._frame(method, codec.encode_args(call, args))

    def _frame(self, method: str, args: list[Any]) -> tuple[int, bytes]:
        msgid = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        return msgid, encode_frame(codec.pack([codec.REQUEST, msgid, method, args]), self.max_frame)

    def feed(self, data: bytes) -> None:
        self.reader.feed(data)

    def next_reply(self) -> tuple[int, int, Any, str | None] | None:
        """(id, rv, result, message) of the next complete reply, or None."""
        body = self.reader.next_frame()
        if body is None:
            return None
        try:
            message = codec.unpack(body)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if isinstance(message, list) and len(message) == 4 and message[0] == codec.FATAL:
            raise ProtocolError(f"the daemon closed the connection: {message[3]}")
        if not (isinstance(message, list) and len(message) == 5 and message[0] == codec.RESPONSE):
            raise ProtocolError("malformed reply")
        _, msgid, rv, result, text = message
        return msgid, rv, result, text


def result_of(method: str, rv: int, result: Any, message: str | None) -> Any:
    """The Python result of a reply, or the exception for its CKR raised."""
    if rv != CKR.OK and not (rv in PARTIAL_OK and method == "C_GetAttributeValue"):
        raise error_for(rv)(message or "")
    call = BY_NAME.get(method)
    if call is None:
        return result
    if call.result == "out":
        if not (isinstance(result, list) and len(result) == 2):
            raise DeviceError("malformed output")
        return result[0] if result[0] is not None else result[1]
    if method == "C_GenerateKeyPair":
        return tuple(result)
    if method == "C_GetAttributeValue":
        return [tuple(v) if isinstance(v, list) and not v else _value(v) for v in result]
    return result


def _value(value: Any) -> Any:
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return tuple((a, _value(v)) for a, v in value)
        return tuple(value)
    return value
