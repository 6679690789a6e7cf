"""PKCS#11 URIs (RFC 7512): parsing, formatting and matching.

A ``pkcs11:`` URI names tokens, slots, libraries and objects. Path attributes
(``;``-separated) identify; query attributes (``&``-separated) say how to get
there (PIN source, module). Values are percent-decoded UTF-8 text, except
``id`` which is raw bytes. Rules kept here:

* each attribute appears at most once (RFC 7512 section 2.3);
* an unknown path attribute is an error unless it is a vendor attribute
  (``x-`` prefix), which is kept; unknown query attributes are kept;
* formatting percent-encodes everything outside the RFC's unreserved and
  allowed characters, and every byte of ``id``;
* ``pin-value`` is never shown by ``repr()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from keygridd.pkcs11._constants import CKA, CKO

SCHEME = "pkcs11:"

# type= value <-> CKO_* (RFC 7512 section 2.3)
OBJECT_TYPES: dict[str, int] = {
    "cert": CKO.CERTIFICATE,
    "data": CKO.DATA,
    "private": CKO.PRIVATE_KEY,
    "public": CKO.PUBLIC_KEY,
    "secret-key": CKO.SECRET_KEY,
}

# URI attribute name -> dataclass field, in the order they are formatted.
_PATH_TEXT = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "slot-id": "slot_id",
    "object": "object",
    "type": "type",
    "id": "id",
}
_QUERY_TEXT = {
    "pin-source": "pin_source",
    "pin-value": "pin_value",
    "module-name": "module_name",
    "module-path": "module_path",
}

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_PATH_SAFE = frozenset(_UNRESERVED + ":[]@!$'()*+,=&")  # pk11-pchar: unreserved / pk11-res-avail / "&"
_QUERY_SAFE = frozenset(_UNRESERVED + ":[]@!$'()*+,=/?|;")  # pk11-qchar: unreserved / pk11-res-avail / "/?|"
_VERSION = re.compile(r"\d+(\.\d+)?")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _decode(raw: str, name: str) -> bytes:
    """Percent-decode ``raw`` (strictly: every ``%`` starts two hex digits)."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise ValueError(f"PKCS#11 URI: attribute {name!r}: bad percent-encoding at {raw[i : i + 3]!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.extend(ch.encode("utf-8"))
            i += 1
    return bytes(out)


def _decode_text(raw: str, name: str) -> str:
    try:
        return _decode(raw, name).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"PKCS#11 URI: attribute {name!r} is not valid UTF-8 after percent-decoding") from None


def _encode(value: bytes | str, safe: frozenset[str], *, every_byte: bool = False) -> str:
    data = value.encode("utf-8") if isinstance(value, str) else value
    if every_byte:
        return "".join(f"%{b:02X}" for b in data)
    return "".join(chr(b) if chr(b) in safe else f"%{b:02X}" for b in data)


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """One parsed PKCS#11 URI; ``None`` = the attribute is absent (matches anything)."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    module_name: str | None = None
    module_path: str | None = None
    vendor: tuple[tuple[str, str], ...] = ()  # x- path attributes, in order
    vendor_query: tuple[tuple[str, str], ...] = ()  # other query attributes, in order

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            known = ", ".join(OBJECT_TYPES)
            raise ValueError(f"PKCS#11 URI: type must be one of {known}, got {self.type!r}")
        if self.slot_id is not None and not 0 <= self.slot_id < 2**64:
            raise ValueError(f"PKCS#11 URI: slot-id out of range: {self.slot_id}")
        if self.library_version is not None and not _VERSION.fullmatch(self.library_version):
            raise ValueError(f"PKCS#11 URI: library-version must be M or M.N, got {self.library_version!r}")

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse ``text``; raises ``ValueError`` saying what is wrong."""
        if not text[: len(SCHEME)].lower() == SCHEME:
            raise ValueError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {text!r}")
        rest = text[len(SCHEME) :]
        path, _, query = rest.partition("?")
        values: dict[str, object] = {}
        vendor: list[tuple[str, str]] = []
        vendor_query: list[tuple[str, str]] = []
        seen: set[str] = set()
        for part in path.split(";") if path else []:
            name, value = _split(part, "path")
            _once(name, seen)
            if name in _PATH_TEXT:
                values[_PATH_TEXT[name]] = _path_value(name, value)
            elif name.lower().startswith("x-"):
                vendor.append((name, _decode_text(value, name)))
            else:
                known = ", ".join(_PATH_TEXT)
                raise ValueError(f"PKCS#11 URI: unknown path attribute {name!r} (known: {known}, or x-<vendor>)")
        for part in query.split("&") if query else []:
            name, value = _split(part, "query")
            _once(name, seen)
            if name in _QUERY_TEXT:
                values[_QUERY_TEXT[name]] = _decode_text(value, name)
            else:
                vendor_query.append((name, _decode_text(value, name)))
        return cls(**values, vendor=tuple(vendor), vendor_query=tuple(vendor_query))  # type: ignore[arg-type]

    def __str__(self) -> str:
        path: list[str] = []
        for name, attr in _PATH_TEXT.items():
            value = getattr(self, attr)
            if value is None:
                continue
            if name == "id":
                path.append(f"id={_encode(value, _PATH_SAFE, every_byte=True)}")
            else:
                path.append(f"{name}={_encode(str(value), _PATH_SAFE)}")
        path.extend(f"{n}={_encode(v, _PATH_SAFE)}" for n, v in self.vendor)
        query = [
            f"{name}={_encode(getattr(self, attr), _QUERY_SAFE)}"
            for name, attr in _QUERY_TEXT.items()
            if getattr(self, attr) is not None
        ]
        query.extend(f"{n}={_encode(v, _QUERY_SAFE)}" for n, v in self.vendor_query)
        text = SCHEME + ";".join(path)
        return f"{text}?{'&'.join(query)}" if query else text

    @property
    def object_class(self) -> int | None:
        """The CKO_* named by ``type``, or None."""
        return None if self.type is None else OBJECT_TYPES[self.type]

    def object_template(self) -> dict[int, bytes | int]:
        """The C_FindObjectsInit template for the object attributes (CKA_LABEL, CKA_ID, CKA_CLASS)."""
        template: dict[int, bytes | int] = {}
        if self.object is not None:
            template[CKA.LABEL] = self.object.encode("utf-8")
        if self.id is not None:
            template[CKA.ID] = self.id
        if self.type is not None:
            template[CKA.CLASS] = OBJECT_TYPES[self.type]
        return template

    def matches_token(self, label: str, manufacturer: str, model: str, serial: str) -> bool:
        """True when every token attribute present in the URI equals the token's (CK_TOKEN_INFO, unpadded)."""
        wanted = ((self.token, label), (self.manufacturer, manufacturer), (self.model, model), (self.serial, serial))
        return all(want is None or want == have for want, have in wanted)

    def matches_slot(self, slot_id: int, description: str = "", manufacturer: str = "") -> bool:
        """True when every slot attribute present in the URI equals the slot's (CK_SLOT_INFO, unpadded)."""
        if self.slot_id is not None and self.slot_id != slot_id:
            return False
        if self.slot_description is not None and self.slot_description != description:
            return False
        return self.slot_manufacturer is None or self.slot_manufacturer == manufacturer

    def names_token(self) -> bool:
        """True when the URI has any token or slot attribute (it narrows which tokens are searched)."""
        return any(
            getattr(self, a) is not None
            for a in ("token", "manufacturer", "model", "serial", "slot_id", "slot_description", "slot_manufacturer")
        )

    def names_object(self) -> bool:
        """True when the URI has CKA_LABEL or CKA_ID (it names particular objects, not all of a type)."""
        return self.object is not None or self.id is not None


def _split(part: str, where: str) -> tuple[str, str]:
    name, eq, value = part.partition("=")
    if not eq or not name:
        raise ValueError(f"PKCS#11 URI: {where} attribute must be name=value, got {part!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"PKCS#11 URI: bad attribute name {name!r}")
    return name, value


def _once(name: str, seen: set[str]) -> None:
    if name in seen:
        raise ValueError(f"PKCS#11 URI: attribute {name!r} appears more than once")
    seen.add(name)


def _path_value(name: str, raw: str) -> object:
    if name == "id":
        return _decode(raw, name)
    text = _decode_text(raw, name)
    if name == "slot-id":
        if not text.isdigit():
            raise ValueError(f"PKCS#11 URI: slot-id must be a decimal number, got {text!r}")
        return int(text)
    return text


__all__ = ["OBJECT_TYPES", "Pkcs11Uri"]
