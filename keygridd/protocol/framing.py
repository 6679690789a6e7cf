"""Frames: a 4-byte big-endian length, then that many bytes of MessagePack.

``FrameReader`` is sans-I/O: feed it bytes as they arrive and pull complete
frames out. A length of 0 or above the limit is a framing error: the
connection cannot be resynchronised and must be closed.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20


class FramingError(Exception):
    """The byte stream cannot be split into frames any more."""


def encode_frame(body: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    if not 0 < len(body) <= max_frame:
        raise FramingError(f"frame of {len(body)} bytes (limit {max_frame})")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields complete frame bodies."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_whole(self, data: bytes) -> bytes | None:
        """The body of ``data`` when nothing is buffered and ``data`` is exactly one valid frame (the
        usual read: one request); else None, and nothing is taken (``feed`` it)."""
        if self._buffer or len(data) < 5:
            return None
        length = int.from_bytes(data[:4], "big")
        if len(data) != 4 + length or length > self.max_frame:
            return None
        return data[4:]

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None if more bytes are needed."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (length,) = HEADER.unpack_from(buffer)
        if length == 0 or length > self.max_frame:
            raise FramingError(f"frame length {length} outside 1..{self.max_frame}")
        end = 4 + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[4:end])
        del buffer[:end]
        return body

    def peek_frame(self) -> bytes | None:
        """The next complete frame body, left in place; None if there is none (or the length is bad)."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        (length,) = HEADER.unpack_from(buffer)
        if length == 0 or length > self.max_frame or len(buffer) < 4 + length:
            return None
        return bytes(buffer[4 : 4 + length])

    def has_frame(self) -> bool:
        """Is a complete frame (or a framing error) waiting to be taken?"""
        buffer = self._buffer
        if len(buffer) < 4:
            return False
        length: int = HEADER.unpack_from(buffer)[0]
        return len(buffer) >= 4 + length or length == 0 or length > self.max_frame

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a frame."""
        return len(self._buffer)
