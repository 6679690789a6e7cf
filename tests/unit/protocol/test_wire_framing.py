"""keygridd.protocol.framing: lengths, partial feeds, several frames per feed, limits."""

from __future__ import annotations

import pytest

from keygridd.protocol.framing import DEFAULT_MAX_FRAME, FrameReader, FramingError, encode_frame


def test_encode_frame_exact_bytes() -> None:
    assert encode_frame(b"\xc0") == b"\x00\x00\x00\x01\xc0"
    assert encode_frame(b"x" * 258) == b"\x00\x00\x01\x02" + b"x" * 258
    assert encode_frame(b"x" * 10, max_frame=10)[:4] == b"\x00\x00\x00\x0a"


@pytest.mark.parametrize("body, limit", [(b"", DEFAULT_MAX_FRAME), (b"x" * 11, 10)])
def test_encode_frame_refuses_empty_and_oversize(body: bytes, limit: int) -> None:
    with pytest.raises(FramingError):
        encode_frame(body, max_frame=limit)


def test_partial_feeds_byte_by_byte() -> None:
    reader = FrameReader()
    data = b"\x00\x00\x00\x03abc"
    for i, byte in enumerate(data[:-1]):
        reader.feed(bytes([byte]))
        assert reader.next_frame() is None
        assert reader.pending == i + 1
    reader.feed(data[-1:])
    assert reader.next_frame() == b"abc"
    assert reader.pending == 0
    assert reader.next_frame() is None


def test_two_frames_and_a_half_in_one_feed() -> None:
    reader = FrameReader()
    reader.feed(b"\x00\x00\x00\x01a" + b"\x00\x00\x00\x02bc" + b"\x00\x00\x00\x03d")
    assert reader.next_frame() == b"a"
    assert reader.next_frame() == b"bc"
    assert reader.next_frame() is None
    assert reader.pending == 5
    reader.feed(b"ef")
    assert reader.next_frame() == b"def"
    assert reader.pending == 0


def test_frame_at_the_limit_is_accepted() -> None:
    reader = FrameReader(max_frame=8)
    reader.feed(b"\x00\x00\x00\x08" + b"y" * 8)
    assert reader.next_frame() == b"y" * 8


@pytest.mark.parametrize("header", [b"\x00\x00\x00\x09", b"\x80\x00\x00\x00", b"\xff\xff\xff\xff"])
def test_oversize_is_refused_from_the_header_alone(header: bytes) -> None:
    reader = FrameReader(max_frame=8)
    reader.feed(header)  # no body: the reader must not wait for (or buffer) it
    with pytest.raises(FramingError, match=r"outside 1\.\.8"):
        reader.next_frame()


def test_zero_length_is_refused() -> None:
    reader = FrameReader()
    reader.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FramingError):
        reader.next_frame()


def test_error_after_a_good_frame() -> None:
    reader = FrameReader()
    reader.feed(b"\x00\x00\x00\x01a\x00\x00\x00\x00")
    assert reader.next_frame() == b"a"
    with pytest.raises(FramingError):
        reader.next_frame()


def test_peek_leaves_the_frame_in_place() -> None:
    reader = FrameReader(max_frame=8)
    assert reader.peek_frame() is None
    reader.feed(b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x03c")
    assert reader.peek_frame() == b"ab"
    assert reader.peek_frame() == b"ab"
    assert reader.next_frame() == b"ab"
    assert reader.peek_frame() is None  # the next frame is not complete yet
    reader.feed(b"de")
    assert reader.peek_frame() == b"cde"
    assert reader.next_frame() == b"cde"


def test_peek_at_a_bad_length_is_none_and_next_frame_still_refuses_it() -> None:
    reader = FrameReader(max_frame=8)
    reader.feed(b"\x00\x00\x00\x09" + b"z" * 9)
    assert reader.peek_frame() is None
    with pytest.raises(FramingError):
        reader.next_frame()


def test_take_whole_takes_exactly_one_frame_when_nothing_is_buffered() -> None:
    reader = FrameReader(16)
    assert reader.take_whole(encode_frame(b"body")) == b"body"
    assert reader.pending == 0


@pytest.mark.parametrize(
    "data",
    [
        encode_frame(b"one") + encode_frame(b"two"),  # two frames: the reader splits them
        encode_frame(b"body")[:-1],  # part of a frame
        b"\x00\x00\x00\x00" + b"x",  # a zero length
        b"\x00\x00\x00\x11" + b"x" * 17,  # over the limit
        b"\x00\x00\x00",  # not even a header
    ],
)
def test_take_whole_leaves_everything_else_to_the_reader(data: bytes) -> None:
    reader = FrameReader(16)
    assert reader.take_whole(data) is None
    assert reader.pending == 0


def test_take_whole_does_not_jump_a_buffered_frame() -> None:
    reader = FrameReader(16)
    reader.feed(encode_frame(b"first")[:3])
    assert reader.take_whole(encode_frame(b"second")) is None
