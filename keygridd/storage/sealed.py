"""The sealing layer of the software token: what makes records safe to hand to a raw store.

Rules:

* Every token has a random 256-bit *master key* and a random 128-bit *uuid*.
  The master key never leaves this process in the clear: it is stored only
  *wrapped* (AES-256-GCM) under a key derived from the user PIN, the SO PIN
  (Argon2id or scrypt, parameters stored with the wrap so they can be raised
  later) or an unlock key (HKDF-SHA256, for unattended tokens).
* A record is sealed under a per-record key, HKDF-SHA256(master key,
  salt = token uuid, info = label || record key), with AES-256-GCM and a fresh
  random 96-bit nonce on every write. The associated data binds the record to
  its identity: token uuid || record key || version (|| any clear part stored
  next to it). So a record copied under another key, into another token, or
  replayed at another version fails to open, as does a flipped bit.
* Wrong key, tampering and malformed blobs all raise ``SealError``; a wrong
  PIN or unlock key raises its subclass ``WrongSecret``. Messages never carry
  key material or PINs.

The master key is held in a ``bytearray`` that ``Sealer.wipe`` overwrites: a
best effort, since Python and OpenSSL may keep copies we cannot reach.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MASTER_KEY_BYTES = 32
UUID_BYTES = 16
NONCE_BYTES = 12
SALT_BYTES = 16
MIN_UNLOCK_KEY_BYTES = 16

KdfName = Literal["argon2id", "scrypt"]
Role = Literal["user", "so", "unlock"]

_OBJECT_INFO = b"keygrid/sealed/object/v1"
_WRAP_AAD = b"keygrid/sealed/wrap/v1"
_UNLOCK_INFO = b"keygrid/sealed/unlock/v1"


class SealError(Exception):
    """A sealed blob cannot be opened: wrong key, another record's blob, another version, or tampered."""


class WrongSecret(SealError):
    """The PIN or unlock key does not unwrap the master key."""


# --- key derivation from PINs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Argon2Cost:
    """Argon2id cost (RFC 9106): memory in KiB, passes, lanes. The default takes about 0.25 s on one core."""

    memory_cost: int = 65536
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.lanes > 255:
            raise ValueError("argon2id.lanes must be between 1 and 255")
        if self.memory_cost < 8 * self.lanes:
            raise ValueError("argon2id.memory_cost must be at least 8 KiB per lane")
        if self.iterations < 1:
            raise ValueError("argon2id.iterations must be >= 1")


@dataclass(frozen=True, slots=True)
class ScryptCost:
    """scrypt cost (RFC 7914): N = 2**log2_n, block size r, parallelism p."""

    log2_n: int = 16
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if not 10 <= self.log2_n <= 22:
            raise ValueError("scrypt.log2_n must be between 10 and 22")
        if self.r < 1 or self.p < 1:
            raise ValueError("scrypt.r and scrypt.p must be >= 1")


@dataclass(frozen=True, slots=True)
class KdfParams:
    """One PIN derivation, as stored with a wrap: the algorithm, its salt and its cost."""

    name: KdfName
    salt: bytes
    argon2: Argon2Cost = field(default_factory=Argon2Cost)
    scrypt: ScryptCost = field(default_factory=ScryptCost)

    @classmethod
    def new(cls, name: KdfName, argon2: Argon2Cost | None = None, scrypt: ScryptCost | None = None) -> KdfParams:
        return cls(name, os.urandom(SALT_BYTES), argon2 or Argon2Cost(), scrypt or ScryptCost())

    def same_cost(self, other: KdfParams) -> bool:
        """Same algorithm and cost (the salt aside): no need to re-wrap."""
        if self.name != other.name:
            return False
        return self.argon2 == other.argon2 if self.name == "argon2id" else self.scrypt == other.scrypt

    def derive(self, pin: bytes) -> bytes:
        if self.name == "argon2id":
            c = self.argon2
            kdf: Argon2id | Scrypt = Argon2id(
                salt=self.salt, length=32, iterations=c.iterations, lanes=c.lanes, memory_cost=c.memory_cost
            )
        else:
            s = self.scrypt
            kdf = Scrypt(salt=self.salt, length=32, n=1 << s.log2_n, r=s.r, p=s.p)
        return kdf.derive(pin)

    def to_dict(self) -> dict[str, Any]:
        if self.name == "argon2id":
            a = self.argon2
            cost = {"m": a.memory_cost, "t": a.iterations, "p": a.lanes}
        else:
            s = self.scrypt
            cost = {"log2_n": s.log2_n, "r": s.r, "p": s.p}
        return {"name": self.name, "salt": self.salt, **cost}

    @classmethod
    def from_dict(cls, raw: Any) -> KdfParams:
        try:
            name = raw["name"]
            if name == "argon2id":
                return cls("argon2id", bytes(raw["salt"]), argon2=Argon2Cost(raw["m"], raw["t"], raw["p"]))
            if name == "scrypt":
                return cls("scrypt", bytes(raw["salt"]), scrypt=ScryptCost(raw["log2_n"], raw["r"], raw["p"]))
        except (KeyError, TypeError, ValueError):
            pass
        raise SealError("malformed key derivation parameters")


# --- wrapping the master key --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wrap:
    """The master key encrypted under a PIN-derived key (``kdf`` set) or an unlock key (``kdf`` None)."""

    nonce: bytes
    ciphertext: bytes
    kdf: KdfParams | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "ct": self.ciphertext, "kdf": None if self.kdf is None else self.kdf.to_dict()}

    @classmethod
    def from_dict(cls, raw: Any) -> Wrap:
        try:
            kdf = None if raw["kdf"] is None else KdfParams.from_dict(raw["kdf"])
            return cls(bytes(raw["nonce"]), bytes(raw["ct"]), kdf)
        except (KeyError, TypeError) as exc:
            raise SealError("malformed key wrap") from exc


def _wrap_aad(token_uuid: bytes, role: Role) -> bytes:
    return _WRAP_AAD + token_uuid + role.encode()


def _wrap(kek: bytes, master_key: bytes | bytearray, token_uuid: bytes, role: Role, kdf: KdfParams | None) -> Wrap:
    nonce = os.urandom(NONCE_BYTES)
    return Wrap(nonce, AESGCM(kek).encrypt(nonce, bytes(master_key), _wrap_aad(token_uuid, role)), kdf)


def _unwrap(kek: bytes, wrap: Wrap, token_uuid: bytes, role: Role) -> bytearray:
    try:
        key = AESGCM(kek).decrypt(wrap.nonce, wrap.ciphertext, _wrap_aad(token_uuid, role))
    except (InvalidTag, ValueError):
        raise WrongSecret(f"the {role} secret does not unwrap the master key") from None
    if len(key) != MASTER_KEY_BYTES:
        raise SealError("the wrapped master key has the wrong size")
    return bytearray(key)


def wrap_with_pin(
    master_key: bytes | bytearray, pin: bytes, token_uuid: bytes, role: Literal["user", "so"], kdf: KdfParams
) -> Wrap:
    """The master key wrapped under a key derived from ``pin`` with ``kdf`` (slow on purpose)."""
    return _wrap(kdf.derive(pin), master_key, token_uuid, role, kdf)


def unwrap_with_pin(wrap: Wrap, pin: bytes, token_uuid: bytes, role: Literal["user", "so"]) -> bytearray:
    """The master key, or ``WrongSecret`` when ``pin`` is not the PIN it was wrapped under."""
    if wrap.kdf is None:
        raise SealError("a PIN wrap without key derivation parameters")
    return _unwrap(wrap.kdf.derive(pin), wrap, token_uuid, "user" if role == "user" else "so")


def _unlock_kek(unlock_key: bytes, token_uuid: bytes) -> bytes:
    if len(unlock_key) < MIN_UNLOCK_KEY_BYTES:
        raise ValueError(f"an unlock key has at least {MIN_UNLOCK_KEY_BYTES} bytes")
    return HKDF(hashes.SHA256(), 32, salt=token_uuid, info=_UNLOCK_INFO).derive(unlock_key)


def wrap_with_unlock_key(master_key: bytes | bytearray, unlock_key: bytes, token_uuid: bytes) -> Wrap:
    """The master key wrapped under an unlock key (high-entropy bytes from a file or credential)."""
    return _wrap(_unlock_kek(unlock_key, token_uuid), master_key, token_uuid, "unlock", None)


def unwrap_with_unlock_key(wrap: Wrap, unlock_key: bytes, token_uuid: bytes) -> bytearray:
    return _unwrap(_unlock_kek(unlock_key, token_uuid), wrap, token_uuid, "unlock")


def new_master_key() -> bytearray:
    return bytearray(os.urandom(MASTER_KEY_BYTES))


def new_token_uuid() -> bytes:
    return os.urandom(UUID_BYTES)


# --- sealing records -----------------------------------------------------------------------------------------------------


def record_aad(token_uuid: bytes, key: bytes, version: int, clear: bytes = b"") -> bytes:
    """token uuid || len(key) || key || version || clear: unambiguous, fixed-width where it can be."""
    return token_uuid + struct.pack(">I", len(key)) + key + struct.pack(">Q", version) + clear


class Sealer:
    """Seals and opens the records of one token with keys derived from its master key."""

    def __init__(self, master_key: bytes | bytearray, token_uuid: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"a master key has {MASTER_KEY_BYTES} bytes")
        if len(token_uuid) != UUID_BYTES:
            raise ValueError(f"a token uuid has {UUID_BYTES} bytes")
        self._master = bytearray(master_key)
        self.token_uuid = token_uuid
        self._keys: dict[bytes, AESGCM] = {}

    @property
    def master_key(self) -> bytearray:
        return self._master

    def _aead(self, key: bytes) -> AESGCM:
        aead = self._keys.get(key)
        if aead is None:
            if not any(self._master):
                raise SealError("the master key was wiped")
            derived = HKDF(hashes.SHA256(), 32, salt=self.token_uuid, info=_OBJECT_INFO + key).derive(
                bytes(self._master)
            )
            aead = self._keys[key] = AESGCM(derived)
        return aead

    def seal(self, key: bytes, version: int, plaintext: bytes, clear: bytes = b"") -> bytes:
        """nonce || ciphertext+tag of ``plaintext`` for record ``key`` at ``version``, authenticating ``clear``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead(key).encrypt(nonce, plaintext, record_aad(self.token_uuid, key, version, clear))

    def open(self, key: bytes, version: int, blob: bytes, clear: bytes = b"") -> bytes:
        """The plaintext ``seal`` was given, or ``SealError``."""
        if len(blob) < NONCE_BYTES + 16:
            raise SealError(f"record {key.hex()}: sealed part too short")
        try:
            return self._aead(key).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], record_aad(self.token_uuid, key, version, clear)
            )
        except InvalidTag:
            raise SealError(
                f"record {key.hex()} version {version} does not open: tampered, moved or from another token"
            ) from None

    def wipe(self) -> None:
        """Overwrite the master key and forget the derived keys."""
        for i in range(len(self._master)):
            self._master[i] = 0
        self._keys.clear()


__all__ = [
    "MASTER_KEY_BYTES", "Argon2Cost", "KdfName", "KdfParams", "Role", "ScryptCost", "SealError", "Sealer", "Wrap",
    "WrongSecret", "new_master_key", "new_token_uuid", "record_aad", "unwrap_with_pin", "unwrap_with_unlock_key",
    "wrap_with_pin", "wrap_with_unlock_key",
]  # fmt: skip
