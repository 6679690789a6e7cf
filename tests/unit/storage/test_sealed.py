"""The sealing layer: round trips, and every way a record can be moved, replayed or altered is refused."""

from __future__ import annotations

import os

import pytest

from keygridd.storage.sealed import (
    Argon2Cost,
    KdfParams,
    ScryptCost,
    Sealer,
    SealError,
    Wrap,
    WrongSecret,
    new_master_key,
    new_token_uuid,
    unwrap_with_pin,
    unwrap_with_unlock_key,
    wrap_with_pin,
    wrap_with_unlock_key,
)

FAST_ARGON2 = Argon2Cost(memory_cost=1024, iterations=1, lanes=1)
FAST_SCRYPT = ScryptCost(log2_n=10, r=8, p=1)
SECRET = b"\x5a" * 32


@pytest.fixture
def sealer() -> Sealer:
    return Sealer(new_master_key(), new_token_uuid())


def test_round_trip(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, SECRET, b"header")
    assert SECRET not in blob
    assert sealer.open(b"obj/a", 1, blob, b"header") == SECRET


def test_nonce_is_fresh_on_every_write(sealer: Sealer) -> None:
    blobs = {sealer.seal(b"obj/a", 1, SECRET) for _ in range(20)}
    assert len(blobs) == 20
    assert len({b[:12] for b in blobs}) == 20


def test_swapped_record_is_refused(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 3, SECRET)
    with pytest.raises(SealError):
        sealer.open(b"obj/b", 3, blob)


@pytest.mark.parametrize("version", [1, 2, 4, 2**40])
def test_changed_version_is_refused(sealer: Sealer, version: int) -> None:
    blob = sealer.seal(b"obj/a", 3, SECRET)
    with pytest.raises(SealError):
        sealer.open(b"obj/a", version, blob)


def test_other_tokens_record_is_refused(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, SECRET)
    same_key_other_uuid = Sealer(sealer.master_key, new_token_uuid())
    other_key_same_uuid = Sealer(new_master_key(), sealer.token_uuid)
    for other in (same_key_other_uuid, other_key_same_uuid):
        with pytest.raises(SealError):
            other.open(b"obj/a", 1, blob)


def test_changed_clear_part_is_refused(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, b"", b"label=mine")
    with pytest.raises(SealError):
        sealer.open(b"obj/a", 1, blob, b"label=evil")


def test_every_flipped_bit_is_refused(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, SECRET)
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(SealError):
            sealer.open(b"obj/a", 1, bytes(bad))


def test_truncated_blob_is_refused(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, SECRET)
    for n in (0, 11, 27, len(blob) - 1):
        with pytest.raises(SealError):
            sealer.open(b"obj/a", 1, blob[:n])


def test_record_key_boundaries_are_unambiguous(sealer: Sealer) -> None:
    # key "ab" + version and key "a" + something else must not share associated data
    blob = sealer.seal(b"ab", 1, SECRET, b"")
    with pytest.raises(SealError):
        sealer.open(b"a", 1, blob, b"b")


def test_wipe_forgets_the_key(sealer: Sealer) -> None:
    blob = sealer.seal(b"obj/a", 1, SECRET)
    sealer.wipe()
    assert not any(sealer.master_key)
    with pytest.raises(SealError):
        sealer.open(b"obj/a", 1, blob)


@pytest.mark.parametrize("kdf", ["argon2id", "scrypt"])
def test_pin_wrap_round_trip_and_wrong_pin(kdf: str) -> None:
    master, uuid = new_master_key(), new_token_uuid()
    params = KdfParams.new(kdf, FAST_ARGON2, FAST_SCRYPT)  # type: ignore[arg-type]
    wrap = wrap_with_pin(master, b"1234-user", uuid, "user", params)
    assert bytes(master) not in wrap.ciphertext
    assert unwrap_with_pin(wrap, b"1234-user", uuid, "user") == master
    with pytest.raises(WrongSecret):
        unwrap_with_pin(wrap, b"1234-usex", uuid, "user")
    with pytest.raises(WrongSecret):  # the user's wrap does not pass for the SO's
        unwrap_with_pin(wrap, b"1234-user", uuid, "so")
    with pytest.raises(WrongSecret):  # nor for another token
        unwrap_with_pin(wrap, b"1234-user", new_token_uuid(), "user")


def test_wrap_serialisation_keeps_parameters() -> None:
    params = KdfParams.new("argon2id", Argon2Cost(memory_cost=2048, iterations=2, lanes=2))
    wrap = wrap_with_pin(new_master_key(), b"pin-pin", new_token_uuid(), "so", params)
    again = Wrap.from_dict(wrap.to_dict())
    assert again == wrap
    assert again.kdf is not None and again.kdf.argon2 == Argon2Cost(2048, 2, 2)
    scrypt = KdfParams.new("scrypt", scrypt=ScryptCost(11, 4, 2))
    assert KdfParams.from_dict(scrypt.to_dict()) == KdfParams("scrypt", scrypt.salt, scrypt=ScryptCost(11, 4, 2))
    assert not params.same_cost(KdfParams.new("argon2id"))
    assert params.same_cost(KdfParams.new("argon2id", Argon2Cost(memory_cost=2048, iterations=2, lanes=2)))


@pytest.mark.parametrize("raw", [{}, {"name": "md5", "salt": b"x"}, {"name": "argon2id", "salt": b"x", "m": 1}])
def test_malformed_kdf_parameters(raw: dict[str, object]) -> None:
    with pytest.raises(SealError):
        KdfParams.from_dict(raw)


def test_unlock_key_wrap() -> None:
    master, uuid = new_master_key(), new_token_uuid()
    key = os.urandom(32)
    wrap = wrap_with_unlock_key(master, key, uuid)
    assert wrap.kdf is None
    assert unwrap_with_unlock_key(wrap, key, uuid) == master
    with pytest.raises(WrongSecret):
        unwrap_with_unlock_key(wrap, os.urandom(32), uuid)
    with pytest.raises(ValueError):
        wrap_with_unlock_key(master, b"short", uuid)


@pytest.mark.parametrize(
    "cost",
    [
        lambda: Argon2Cost(lanes=0),
        lambda: Argon2Cost(memory_cost=7, lanes=1),
        lambda: Argon2Cost(iterations=0),
        lambda: ScryptCost(log2_n=9),
        lambda: ScryptCost(r=0),
    ],
)
def test_cost_validation(cost: object) -> None:
    with pytest.raises(ValueError):
        cost()  # type: ignore[operator]
