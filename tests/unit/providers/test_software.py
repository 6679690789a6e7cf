"""The software token's store over an in-memory raw store: lock state, PIN policy, records at rest."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keygridd.config import ConfigError, build
from keygridd.pkcs11 import CKA, CKK, CKO, CKU, TokenFlag
from keygridd.pkcs11.errors import PinIncorrect, PinLenRange, PinLocked, UserNotLoggedIn, UserPinNotInitialized
from keygridd.providers.software import (
    META_KEY,
    OBJECT_PREFIX,
    Meta,
    SoftwareOptions,
    SoftwareStore,
    UnlockKeyError,
    read_unlock_key,
)
from keygridd.storage.base import VersionConflict
from keygridd.storage.memory import MemoryStore
from keygridd.storage.sealed import Argon2Cost, ScryptCost

SO = b"so-pin-0001"
USER = b"user-pin-0002"
AES_VALUE = bytes(range(32))
NS = "slot-0"
FAST = SoftwareOptions(
    backend="memory",
    argon2id=Argon2Cost(memory_cost=1024, iterations=1, lanes=1),
    scrypt=ScryptCost(log2_n=10),
    max_pin_failures=3,
)

PRIVATE_AES = {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.TOKEN: True, CKA.PRIVATE: True,
               CKA.LABEL: b"private-aes", CKA.VALUE: AES_VALUE, CKA.SENSITIVE: True}  # fmt: skip
PUBLIC_DATA = {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: False, CKA.LABEL: b"hello",
               CKA.VALUE: b"public data"}  # fmt: skip
PUBLIC_AES = {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.TOKEN: True, CKA.PRIVATE: False,
              CKA.LABEL: b"public-aes", CKA.VALUE: b"\x77" * 16}  # fmt: skip


def open_store(raw: MemoryStore, options: SoftwareOptions = FAST, **kw: Any) -> SoftwareStore:
    return SoftwareStore(raw, kw.pop("namespace", NS), options, **kw)


@pytest.fixture
def raw() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def token(raw: MemoryStore) -> SoftwareStore:
    store = open_store(raw)
    store.init_token(SO, b"test")
    store.init_pin(USER)
    store.check_pin(CKU.USER, USER)
    store.put_object(b"A" * 16, dict(PRIVATE_AES))
    store.put_object(b"B" * 16, dict(PUBLIC_DATA))
    store.put_object(b"C" * 16, dict(PUBLIC_AES))
    store.lock()
    return store


def all_bytes(raw: MemoryStore) -> bytes:
    return b"".join(key + rec.value for ns in raw.namespaces() for key, rec in raw.scan(ns))


def test_blank_token(raw: MemoryStore) -> None:
    store = open_store(raw)
    assert not store.initialized and not store.user_pin_initialized
    assert store.objects() == {}
    with pytest.raises(PinIncorrect):
        store.check_pin(CKU.SO, SO)
    with pytest.raises(UserNotLoggedIn):
        store.put_object(b"x" * 16, dict(PUBLIC_DATA))


def test_start_up_initialisation_leaves_the_token_locked(raw: MemoryStore) -> None:
    store = open_store(raw)
    store.init_token(SO, b"x")
    assert store.unlocked  # for C_InitPIN
    store.init_pin(USER)
    assert not store.unlocked
    store.check_pin(CKU.SO, SO)
    store.init_pin(b"other-user-pin")
    assert store.unlocked  # the SO is logged in: the key stays until lock()


def test_init_label_description(token: SoftwareStore) -> None:
    assert token.initialized and token.user_pin_initialized
    assert token.label == b"test".ljust(32)
    assert token.description.model == "software"
    assert len(token.description.serial) == 16
    assert (token.description.min_pin_len, token.description.max_pin_len) == (4, 255)


def test_public_before_login_all_after(token: SoftwareStore) -> None:
    assert not token.unlocked
    # The public AES key holds a secret (CKA_VALUE): it waits for the master key too.
    assert set(token.objects()) == {b"B" * 16}
    assert token.objects()[b"B" * 16][CKA.VALUE] == b"public data"
    token.check_pin(CKU.USER, USER)
    assert token.unlocked
    objs = token.objects()
    assert set(objs) == {b"A" * 16, b"B" * 16, b"C" * 16}
    assert objs[b"A" * 16][CKA.VALUE] == AES_VALUE
    assert objs[b"C" * 16][CKA.VALUE] == b"\x77" * 16
    token.lock()
    assert set(token.objects()) == {b"B" * 16}


def test_so_login_unlocks_too(token: SoftwareStore) -> None:
    token.check_pin(CKU.SO, SO)
    assert b"A" * 16 in token.objects()


def test_nothing_secret_at_rest(token: SoftwareStore, raw: MemoryStore) -> None:
    data = all_bytes(raw)
    for secret in (AES_VALUE, b"\x77" * 16, SO, USER, SO.hex().encode(), USER.hex().encode(), b"private-aes"):
        assert secret not in data
    assert b"hello" in data  # a public object's label is in clear, as designed


def test_locked_token_refuses_writes_but_deletes(token: SoftwareStore) -> None:
    with pytest.raises(UserNotLoggedIn):
        token.put_object(b"D" * 16, dict(PUBLIC_DATA))
    token.delete_object(b"B" * 16)
    assert token.objects() == {}


def test_restart_keeps_objects(token: SoftwareStore, raw: MemoryStore) -> None:
    again = open_store(raw)
    assert not again.unlocked
    again.check_pin(CKU.USER, USER)
    assert again.objects()[b"A" * 16][CKA.VALUE] == AES_VALUE


def reopen_unlocked(raw: MemoryStore) -> SoftwareStore:
    store = open_store(raw)
    store.check_pin(CKU.USER, USER)
    return store


def test_swapped_record_is_rejected(token: SoftwareStore, raw: MemoryStore) -> None:
    a = raw.get(NS, OBJECT_PREFIX + b"A" * 16)
    c = raw.get(NS, OBJECT_PREFIX + b"C" * 16)
    assert a is not None and c is not None
    raw.put(NS, OBJECT_PREFIX + b"C" * 16, a.value, c.version)  # A's sealed bytes under C's key
    store = reopen_unlocked(raw)
    assert b"C" * 16 not in store.objects()
    assert b"A" * 16 in store.objects()


def test_changed_version_is_rejected(token: SoftwareStore, raw: MemoryStore) -> None:
    key = OBJECT_PREFIX + b"A" * 16
    a = raw.get(NS, key)
    assert a is not None
    raw.put(NS, key, a.value, a.version)  # the same bytes, now at version + 1
    assert b"A" * 16 not in reopen_unlocked(raw).objects()


def test_rollback_seen_by_a_running_store_is_rejected(token: SoftwareStore, raw: MemoryStore) -> None:
    key = OBJECT_PREFIX + b"A" * 16
    token.check_pin(CKU.USER, USER)
    old = raw.get(NS, key)
    assert old is not None
    token.put_object(b"A" * 16, {**PRIVATE_AES, CKA.LABEL: b"renamed"})
    current = raw.get(NS, key)
    assert current is not None
    raw.delete(NS, key, current.version)
    raw.restore(NS, key, old.version, old.value)  # a valid old record, at its old version
    kept = token.load_object(b"A" * 16)  # the old record is not adopted: the newest state stays
    assert kept is not None and kept[CKA.LABEL] == b"renamed"
    assert token.current(b"A" * 16) == kept


def test_other_tokens_record_is_rejected(token: SoftwareStore, raw: MemoryStore) -> None:
    other = open_store(raw, namespace="slot-1")
    other.init_token(SO, b"other")
    other.init_pin(USER)
    other.check_pin(CKU.USER, USER)
    other.put_object(b"Z" * 16, dict(PRIVATE_AES))
    z = raw.get("slot-1", OBJECT_PREFIX + b"Z" * 16)
    assert z is not None
    raw.put(NS, OBJECT_PREFIX + b"Z" * 16, z.value, 0)
    raw.delete(NS, OBJECT_PREFIX + b"Z" * 16, 1)
    raw.restore(NS, OBJECT_PREFIX + b"Z" * 16, z.version, z.value)  # same key and version, other token
    store = reopen_unlocked(raw)
    assert b"Z" * 16 not in store.objects()


@pytest.mark.parametrize("oid", [b"A" * 16, b"B" * 16])
def test_flipped_bit_is_rejected(token: SoftwareStore, raw: MemoryStore, oid: bytes) -> None:
    key = OBJECT_PREFIX + oid
    rec = raw.get(NS, key)
    assert rec is not None
    value = bytearray(rec.value)
    value[len(value) // 2] ^= 0x01
    raw.delete(NS, key, rec.version)
    raw.restore(NS, key, rec.version, bytes(value))
    assert oid not in reopen_unlocked(raw).objects()


def test_public_clear_part_is_checked_at_unlock(token: SoftwareStore, raw: MemoryStore) -> None:
    key = OBJECT_PREFIX + b"B" * 16
    rec = raw.get(NS, key)
    assert rec is not None
    forged = rec.value.replace(b"hello", b"HELLO")
    raw.delete(NS, key, rec.version)
    raw.restore(NS, key, rec.version, forged)
    store = open_store(raw)
    assert store.objects()[b"B" * 16][CKA.LABEL] == b"HELLO"  # cannot be checked before login
    store.check_pin(CKU.USER, USER)
    assert b"B" * 16 not in store.objects()  # and is refused once it can


def test_wrong_pin_cannot_unwrap_and_lockout(token: SoftwareStore) -> None:
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, b"wrong-pin")
    assert not token.unlocked
    assert token.pin_flags() == TokenFlag.USER_PIN_COUNT_LOW
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, b"wrong-pin")
    assert token.pin_flags() == TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_FINAL_TRY
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, b"wrong-pin")
    assert token.pin_flags() == TokenFlag.USER_PIN_LOCKED
    with pytest.raises(PinLocked):
        token.check_pin(CKU.USER, USER)  # even the right PIN
    assert not token.unlocked
    # The SO resets it with C_InitPIN.
    token.check_pin(CKU.SO, SO)
    token.init_pin(b"new-user-pin")
    assert token.pin_flags() == 0
    token.lock()
    token.check_pin(CKU.USER, b"new-user-pin")
    assert token.objects()[b"A" * 16][CKA.VALUE] == AES_VALUE


def test_right_pin_resets_the_count(token: SoftwareStore) -> None:
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, b"wrong-pin")
    token.check_pin(CKU.USER, USER)
    assert token.pin_flags() == 0


def test_failures_are_counted_in_the_store(token: SoftwareStore, raw: MemoryStore) -> None:
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, b"wrong-pin")
    with pytest.raises(PinIncorrect):
        open_store(raw).check_pin(CKU.USER, b"wrong-pin")
    third = open_store(raw)
    assert third.pin_flags() & TokenFlag.USER_PIN_FINAL_TRY
    with pytest.raises(PinIncorrect):
        third.check_pin(CKU.USER, b"wrong-pin")
    with pytest.raises(PinLocked):
        open_store(raw).check_pin(CKU.USER, USER)


def test_so_lockout_flags(token: SoftwareStore) -> None:
    for _ in range(2):
        with pytest.raises(PinIncorrect):
            token.check_pin(CKU.SO, b"wrong-so")
    assert token.pin_flags() == TokenFlag.SO_PIN_COUNT_LOW | TokenFlag.SO_PIN_FINAL_TRY
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.SO, b"wrong-so")
    assert token.pin_flags() == TokenFlag.SO_PIN_LOCKED
    with pytest.raises(PinLocked):
        token.init_token(SO, b"again")


def test_set_pin_rewraps_without_touching_objects(token: SoftwareStore, raw: MemoryStore) -> None:
    before = {k: r for k, r in raw.scan(NS) if k != META_KEY}
    token.set_pin(CKU.USER, USER, b"changed-pin")
    token.set_pin(CKU.SO, SO, b"changed-so")
    assert {k: r for k, r in raw.scan(NS) if k != META_KEY} == before
    assert not token.unlocked  # C_SetPIN in a public session does not unlock
    with pytest.raises(PinIncorrect):
        token.check_pin(CKU.USER, USER)
    token.check_pin(CKU.USER, b"changed-pin")
    assert token.objects()[b"A" * 16][CKA.VALUE] == AES_VALUE
    token.check_pin(CKU.SO, b"changed-so")
    with pytest.raises(PinIncorrect):
        token.set_pin(CKU.USER, b"not-the-pin", b"whatever")


def test_pin_lengths(raw: MemoryStore) -> None:
    store = open_store(raw, replace(FAST, min_pin_len=6, max_pin_len=8))
    assert (store.description.min_pin_len, store.description.max_pin_len) == (6, 8)
    with pytest.raises(PinLenRange):
        store.init_token(b"12345", b"x")
    store.init_token(b"123456", b"x")
    with pytest.raises(PinLenRange):
        store.init_pin(b"123456789")


def test_user_pin_not_initialized(raw: MemoryStore) -> None:
    store = open_store(raw)
    store.init_token(SO, b"x")
    with pytest.raises(UserPinNotInitialized):
        store.check_pin(CKU.USER, USER)


def test_init_token_again_wipes_and_needs_the_so_pin(token: SoftwareStore, raw: MemoryStore) -> None:
    with pytest.raises(PinIncorrect):
        token.init_token(b"wrong-so", b"again")
    old_uuid = Meta.decode(raw.get(NS, META_KEY)).uuid  # type: ignore[arg-type]
    token.init_token(SO, b"again")
    assert token.label == b"again".ljust(32)
    assert not token.user_pin_initialized
    assert token.objects() == {}
    assert [k for k, _ in raw.scan(NS)] == [META_KEY]
    assert Meta.decode(raw.get(NS, META_KEY)).uuid != old_uuid  # type: ignore[arg-type]


def test_version_conflict_then_reload(token: SoftwareStore, raw: MemoryStore) -> None:
    token.check_pin(CKU.USER, USER)
    other = reopen_unlocked(raw)
    other.put_object(b"A" * 16, {**PRIVATE_AES, CKA.LABEL: b"by-other"})
    with pytest.raises(VersionConflict):
        token.put_object(b"A" * 16, {**PRIVATE_AES, CKA.LABEL: b"by-me"})
    reloaded = token.load_object(b"A" * 16)
    assert reloaded is not None and reloaded[CKA.LABEL] == b"by-other"
    token.put_object(b"A" * 16, {**PRIVATE_AES, CKA.LABEL: b"by-me"})
    assert token.load_object(b"A" * 16)[CKA.LABEL] == b"by-me"  # type: ignore[index]
    other.delete_object(b"B" * 16)
    assert token.load_object(b"B" * 16) is None
    assert b"B" * 16 not in token.objects()


def test_kdf_parameters_are_raised_at_login(token: SoftwareStore, raw: MemoryStore) -> None:
    assert Meta.decode(raw.get(NS, META_KEY)).user.kdf.name == "argon2id"  # type: ignore[arg-type, union-attr]
    store = open_store(raw, replace(FAST, kdf="scrypt"))
    store.check_pin(CKU.USER, USER)
    meta = Meta.decode(raw.get(NS, META_KEY))  # type: ignore[arg-type]
    assert meta.user is not None and meta.user.kdf is not None and meta.user.kdf.name == "scrypt"
    store.lock()
    store.check_pin(CKU.USER, USER)


# --- unattended tokens ---------------------------------------------------------------------------------------------


def test_unlock_key_unlocks_from_start(raw: MemoryStore, tmp_path: Path) -> None:
    key_file = tmp_path / "unlock.key"
    key_file.write_bytes(os.urandom(32))
    options = replace(FAST, unlock_key_file=str(key_file))
    store = open_store(raw, options, unlock_key=read_unlock_key(options))
    store.init_token(SO, b"unattended")
    store.init_pin(USER)
    assert store.unlocked  # unattended: init_pin does not lock either
    store.put_object(b"A" * 16, dict(PRIVATE_AES))
    store.lock()
    assert store.unlocked  # unattended: lock() keeps the key
    again = open_store(raw, options, unlock_key=read_unlock_key(options))
    assert again.unlocked
    assert again.objects()[b"A" * 16][CKA.VALUE] == AES_VALUE
    # A wrong unlock key refuses to start.
    key_file.write_bytes(os.urandom(32))
    with pytest.raises(UnlockKeyError):
        open_store(raw, options, unlock_key=read_unlock_key(options))
    # Dropping the unlock key from the configuration drops the wrap.
    attended = open_store(raw)
    assert not attended.unlocked
    assert Meta.decode(raw.get(NS, META_KEY)).unlock is None  # type: ignore[arg-type]


def test_unlock_wrap_is_added_at_first_login(token: SoftwareStore, raw: MemoryStore) -> None:
    key = os.urandom(32)
    store = open_store(raw, unlock_key=key)
    assert not store.unlocked  # an existing token gets its unlock wrap when a PIN opens it
    store.check_pin(CKU.USER, USER)
    assert open_store(raw, unlock_key=key).unlocked


def test_unlock_credential(tmp_path: Path) -> None:
    (tmp_path / "kg-unlock").write_bytes(b"k" * 32)
    options = replace(FAST, unlock_credential="kg-unlock")
    assert read_unlock_key(options, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == b"k" * 32
    with pytest.raises(UnlockKeyError, match="CREDENTIALS_DIRECTORY"):
        read_unlock_key(options, {})
    with pytest.raises(UnlockKeyError, match="cannot read"):
        read_unlock_key(replace(FAST, unlock_credential="missing"), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    (tmp_path / "short").write_bytes(b"k" * 8)
    with pytest.raises(UnlockKeyError, match="at least 16"):
        read_unlock_key(replace(FAST, unlock_credential="short"), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert read_unlock_key(FAST, {}) is None


# --- options ---------------------------------------------------------------------------------------------------------


def test_options_defaults_and_nested() -> None:
    opts = build(SoftwareOptions, {"path": "/var/lib/keygrid", "argon2id": {"memory_cost": 131072}}, "o")
    assert opts.backend == "lmdb" and opts.kdf == "argon2id" and opts.argon2id.memory_cost == 131072
    assert opts.argon2id.iterations == 3


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({}, "needs a path"),
        ({"backend": "postgresql"}, "needs a dsn"),
        ({"backend": "memory", "min_pin_len": 9, "max_pin_len": 8}, "PIN lengths"),
        ({"backend": "memory", "max_pin_failures": 0}, "max_pin_failures"),
        ({"backend": "memory", "unlock_key_file": "/k", "unlock_credential": "k"}, "not both"),
        ({"backend": "memory", "unlock_credential": "../k"}, "not a path"),
        ({"backend": "memory", "kdf": "pbkdf2"}, "must be one of"),
        ({"backend": "memory", "scrypt": {"log2_n": 30}}, "log2_n"),
        ({"backend": "sqlite"}, "must be one of"),
    ],
)
def test_options_validation(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build(SoftwareOptions, raw, "slots[0].options")


class NotifyingStore(MemoryStore):
    """A memory store that hands out its listener, as a shared store would call it."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Any] = []

    def subscribe(self, listener: Any) -> None:
        self.listeners.append(listener)


def test_watch_reports_object_changes_and_rereads_metadata() -> None:
    raw = NotifyingStore()
    store = open_store(raw)
    store.init_token(SO, b"watched")
    changed: list[bytes] = []
    store.watch(changed.append)
    (listener,) = raw.listeners
    listener("slot-9", OBJECT_PREFIX + b"X" * 16)  # another token's namespace: ignored
    listener(NS, OBJECT_PREFIX + b"X" * 16)
    assert changed == [b"X" * 16]
    open_store(raw).init_token(SO, b"relabelled")  # another daemon re-initialises the token
    listener(NS, META_KEY)
    assert store.label == b"relabelled".ljust(32)
