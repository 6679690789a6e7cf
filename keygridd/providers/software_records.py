"""The software token's records: the metadata record and the object records, as stored (sealed).

``Meta`` is the token's metadata (uuid, label, the master key's wraps, PIN
state); ``ObjectRecord`` is one object: its public attributes readable, its
private ones sealed. Both are MessagePack maps; nothing here does I/O or holds
a key beyond the call that seals or opens a record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from keygridd.core import policy
from keygridd.core.store import Attributes
from keygridd.pkcs11 import CKA
from keygridd.pkcs11.errors import DeviceError
from keygridd.protocol.codec import decode_value, encode_value
from keygridd.storage.base import ABSENT, Record
from keygridd.storage.sealed import Sealer, SealError, Wrap

FORMAT = 1  # the record format version


@dataclass
class Meta:
    """The token's metadata record, decoded."""

    uuid: bytes = b""
    label: bytes = b" " * 32
    so: Wrap | None = None
    user: Wrap | None = None
    so_failures: int = 0
    user_failures: int = 0
    unlock: Wrap | None = None
    version: int = ABSENT

    @property
    def initialized(self) -> bool:
        return self.so is not None

    def wrap(self, role: str) -> Wrap | None:
        return self.so if role == "so" else self.user

    def failures(self, role: str) -> int:
        return self.so_failures if role == "so" else self.user_failures

    def set_failures(self, role: str, count: int) -> None:
        if role == "so":
            self.so_failures = count
        else:
            self.user_failures = count

    def encode(self) -> bytes:
        def w(wrap: Wrap | None) -> Any:
            return None if wrap is None else wrap.to_dict()

        doc = {
            "format": FORMAT,
            "uuid": self.uuid,
            "label": self.label,
            "so": w(self.so),
            "user": w(self.user),
            "so_failures": self.so_failures,
            "user_failures": self.user_failures,
            "unlock": w(self.unlock),
        }
        data: bytes = msgpack.packb(doc, use_bin_type=True)
        return data

    @classmethod
    def decode(cls, record: Record) -> Meta:
        try:
            doc = msgpack.unpackb(record.value, raw=False)
            if doc["format"] != FORMAT:
                raise DeviceError(f"token metadata format {doc['format']} is not supported")

            def w(raw: Any) -> Wrap | None:
                return None if raw is None else Wrap.from_dict(raw)

            return cls(
                bytes(doc["uuid"]),
                bytes(doc["label"]),
                w(doc["so"]),
                w(doc["user"]),
                int(doc["so_failures"]),
                int(doc["user_failures"]),
                w(doc["unlock"]),
                record.version,
            )
        except (KeyError, TypeError, ValueError, SealError, msgpack.ExtraData, msgpack.UnpackException) as exc:
            raise DeviceError("the token's metadata record is damaged") from exc


def _pack_attrs(attrs: Iterable[tuple[int, Any]]) -> bytes:
    data: bytes = msgpack.packb([[a, encode_value(v)] for a, v in sorted(attrs)], use_bin_type=True)
    return data


def _unpack_attrs(data: bytes) -> Attributes:
    return {int(a): decode_value(int(a), v) for a, v in msgpack.unpackb(data, raw=False)}


def is_secret(attrs: Mapping[int, Any], attr: int) -> bool:
    cls = attrs.get(CKA.CLASS)
    if not isinstance(cls, int):
        return False
    key_type = attrs.get(CKA.KEY_TYPE)
    return policy.is_sensitive_attribute(cls, key_type if isinstance(key_type, int) else None, attr)


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """An object record: the header (authenticated at unlock) and the sealed part."""

    private: bool
    has_secrets: bool
    clear: bytes  # packed non-secret attributes of a public object; empty for a private one
    sealed: bytes

    def header(self) -> bytes:
        data: bytes = msgpack.packb([FORMAT, self.private, self.has_secrets, self.clear], use_bin_type=True)
        return data

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(
            [FORMAT, self.private, self.has_secrets, self.clear, self.sealed], use_bin_type=True
        )
        return data

    @classmethod
    def decode(cls, value: bytes) -> ObjectRecord:
        try:
            fmt, private, has_secrets, clear, sealed = msgpack.unpackb(value, raw=False)
        except (TypeError, ValueError, msgpack.ExtraData, msgpack.UnpackException) as exc:
            raise SealError("malformed object record") from exc
        if fmt != FORMAT or not isinstance(clear, bytes) or not isinstance(sealed, bytes):
            raise SealError("malformed object record")
        return cls(bool(private), bool(has_secrets), clear, sealed)

    @classmethod
    def seal(cls, sealer: Sealer, key: bytes, version: int, attrs: Attributes) -> ObjectRecord:
        private = attrs.get(CKA.PRIVATE) is True
        if private:
            head = cls(True, True, b"", b"")
            return replace(head, sealed=sealer.seal(key, version, _pack_attrs(attrs.items()), head.header()))
        secret = [(a, v) for a, v in attrs.items() if is_secret(attrs, a)]
        public = [(a, v) for a, v in attrs.items() if not is_secret(attrs, a)]
        head = cls(False, bool(secret), _pack_attrs(public), b"")
        return replace(head, sealed=sealer.seal(key, version, _pack_attrs(secret), head.header()))

    def open(self, sealer: Sealer, key: bytes, version: int) -> Attributes:
        """Every attribute, after checking the seal (and with it the clear part)."""
        inner = _unpack_attrs(sealer.open(key, version, self.sealed, self.header()))
        if self.private:
            return inner
        return {**_unpack_attrs(self.clear), **inner}

    def public_view(self) -> Attributes | None:
        """The attributes readable without the master key (unchecked), or None when it holds secrets."""
        if self.private or self.has_secrets:
            return None
        return _unpack_attrs(self.clear)


@dataclass
class Entry:
    version: int
    attrs: Attributes | None  # None: cannot be read now (needs the master key, or damaged)
