"""Finding tokens and objects for the CLI: slot selection by --slot or PKCS#11 URI, sessions, key descriptions.

A command that names a key by URI searches every visible slot whose token
matches the URI's token and slot attributes; sessions log in as the user when
a PIN is available (``keys list`` works without one, showing public objects).
Keys are described as ``ec:P-256``, ``rsa:2048``, ``ed25519`` or ``aes:256``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from keygridd.cli.contract import Client
from keygridd.cli.hints import CliError
from keygridd.pkcs11 import CKA, CKK, CKO, CKU, SessionFlag, TokenFlag
from keygridd.pkcs11.errors import UserAlreadyLoggedIn
from keygridd.pkcs11.uri import OBJECT_TYPES, Pkcs11Uri

# Curve name -> DER of its OID (CKA_EC_PARAMS), as in `keys generate --type ec:NAME`.
CURVES: dict[str, bytes] = {
    "P-256": bytes.fromhex("06082a8648ce3d030107"),
    "P-384": bytes.fromhex("06052b81040022"),
    "P-521": bytes.fromhex("06052b81040023"),
    "secp256k1": bytes.fromhex("06052b8104000a"),
    "ed25519": bytes.fromhex("06032b6570"),
    "ed448": bytes.fromhex("06032b6571"),
}
_PRINTABLE_CURVES = {b"\x13\x0cedwards25519": "ed25519", b"\x13\x0aedwards448": "ed448"}
_CURVE_NAMES = {der: name for name, der in CURVES.items()} | _PRINTABLE_CURVES
_TYPE_NAMES = {value: name for name, value in OBJECT_TYPES.items()}

DESCRIBE_ATTRIBUTES = [
    CKA.CLASS,
    CKA.KEY_TYPE,
    CKA.LABEL,
    CKA.ID,
    CKA.MODULUS_BITS,
    CKA.EC_PARAMS,
    CKA.VALUE_LEN,
    CKA.MODULUS,
]


@dataclass(frozen=True, slots=True)
class TokenRef:
    """A slot with a token, and the token's identity (CK_TOKEN_INFO strings, unpadded)."""

    slot: int
    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int

    @property
    def initialized(self) -> bool:
        return bool(self.flags & TokenFlag.TOKEN_INITIALIZED)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object found on a token."""

    token: TokenRef
    handle: int
    object_class: int | None
    key_type: int | None
    label: str
    id: bytes
    kind: str  # ec:P-256, rsa:2048, ed25519, aes:256, ...

    @property
    def type_name(self) -> str:
        """The URI ``type=`` value (private, public, ...) or the CKO number."""
        if self.object_class is None:
            return "?"
        return _TYPE_NAMES.get(self.object_class, f"{self.object_class:#x}")

    @property
    def uri(self) -> Pkcs11Uri:
        """A URI naming this object (token label, label, id and type)."""
        return Pkcs11Uri(
            token=self.token.label,
            object=self.label or None,
            id=self.id or None,
            type=_TYPE_NAMES.get(self.object_class) if self.object_class is not None else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "uri": str(self.uri),
            "slot": self.token.slot,
            "token": self.token.label,
            "type": self.type_name,
            "key": self.kind,
            "label": self.label,
            "id": self.id.hex(),
        }


def parse_uri(text: str) -> Pkcs11Uri:
    """A URI from the command line; a PIN inside it is refused (it would show in ps and shell history)."""
    try:
        uri = Pkcs11Uri.parse(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if uri.pin_value is not None:
        raise CliError("refusing a PIN in the URI (pin-value)", "use --pin-file FILE or set KEYGRID_PIN")
    return uri


def token_refs(client: Client, uri: Pkcs11Uri | None = None, slot: int | None = None) -> list[TokenRef]:
    """The slots with a token that match ``slot`` and the token/slot attributes of ``uri``."""
    refs = []
    for slot_id in client.C_GetSlotList(True):
        if slot is not None and slot_id != slot:
            continue
        if uri is not None and (uri.slot_description is not None or uri.slot_manufacturer is not None):
            info = client.C_GetSlotInfo(slot_id)
            if not uri.matches_slot(slot_id, info.get("slot_description", ""), info.get("manufacturer_id", "")):
                continue
        elif uri is not None and not uri.matches_slot(slot_id):
            continue
        t = client.C_GetTokenInfo(slot_id)
        ref = TokenRef(
            slot=slot_id,
            label=str(t.get("label", "")),
            manufacturer=str(t.get("manufacturer_id", "")),
            model=str(t.get("model", "")),
            serial=str(t.get("serial_number", "")),
            flags=int(t.get("flags", 0)),
        )
        if uri is None or uri.matches_token(ref.label, ref.manufacturer, ref.model, ref.serial):
            refs.append(ref)
    return refs


def one_token(client: Client, uri: Pkcs11Uri | None, slot: int | None) -> TokenRef:
    """The single token chosen by ``--slot`` or the URI (or the only initialised token there is)."""
    refs = [r for r in token_refs(client, uri, slot) if r.initialized]
    if not refs:
        where = f"slot {slot}" if slot is not None else (str(uri) if uri is not None else "any slot")
        raise CliError(f"no initialised token in {where}", "check 'keygrid slots' (or run 'keygrid token init')")
    if len(refs) > 1:
        names = ", ".join(f"slot {r.slot} ({r.label})" for r in refs)
        raise CliError(f"several tokens match: {names}", "choose one with --slot N or a URI with token=LABEL")
    return refs[0]


@contextmanager
def open_session(client: Client, slot: int, *, rw: bool = False, pin: bytes | None = None) -> Iterator[int]:
    """A session on ``slot``, logged in as the user when ``pin`` is given; closed on exit."""
    flags = SessionFlag.SERIAL_SESSION | (SessionFlag.RW_SESSION if rw else 0)
    session = client.C_OpenSession(slot, int(flags))
    try:
        if pin is not None:
            try:
                client.C_Login(session, CKU.USER, pin)
            except UserAlreadyLoggedIn:
                pass
        yield session
    finally:
        client.C_CloseSession(session)


def find_objects(client: Client, session: int, template: dict[int, Any]) -> list[int]:
    """Every object handle matching ``template`` in ``session``."""
    client.C_FindObjectsInit(session, template)
    handles: list[int] = []
    try:
        while True:
            batch = client.C_FindObjects(session, 64)
            if not batch:
                break
            handles.extend(batch)
    finally:
        client.C_FindObjectsFinal(session)
    return handles


def describe_object(client: Client, session: int, token: TokenRef, handle: int) -> ObjectInfo:
    """Read the attributes that describe ``handle``."""
    cls, key_type, label, obj_id, bits, ec_params, value_len, modulus = client.C_GetAttributeValue(
        session, handle, [int(a) for a in DESCRIBE_ATTRIBUTES]
    )
    if not isinstance(bits, int) and isinstance(modulus, bytes):
        bits = int.from_bytes(modulus, "big").bit_length()
    return ObjectInfo(
        token=token,
        handle=handle,
        object_class=cls if isinstance(cls, int) else None,
        key_type=key_type if isinstance(key_type, int) else None,
        label=label.decode("utf-8", "replace") if isinstance(label, bytes) else "",
        id=obj_id if isinstance(obj_id, bytes) else b"",
        kind=key_kind(key_type, bits, ec_params, value_len),
    )


def key_kind(key_type: object, modulus_bits: object, ec_params: object, value_len: object) -> str:
    """``rsa:2048``, ``ec:P-256``, ``ed25519``, ``aes:256`` and the like ("" when not a key)."""
    if not isinstance(key_type, int):
        return ""
    if key_type == CKK.RSA:
        return f"rsa:{modulus_bits}" if isinstance(modulus_bits, int) else "rsa"
    if key_type in (CKK.EC, CKK.EC_EDWARDS, CKK.EC_MONTGOMERY):
        name = _CURVE_NAMES.get(ec_params) if isinstance(ec_params, bytes) else None
        if key_type == CKK.EC:
            return f"ec:{name}" if name else "ec"
        return name or ("ed" if key_type == CKK.EC_EDWARDS else "x")
    if key_type == CKK.AES:
        return f"aes:{value_len * 8}" if isinstance(value_len, int) else "aes"
    if key_type == CKK.GENERIC_SECRET:
        return "generic-secret"
    try:
        return str(CKK(key_type)).removeprefix("CKK_").lower()
    except ValueError:
        return f"{key_type:#x}"


def find_keys(client: Client, uri: Pkcs11Uri, pin: bytes | None) -> list[ObjectInfo]:
    """Every object matching ``uri`` on every matching token (logged in when ``pin`` is given)."""
    found: list[ObjectInfo] = []
    template: dict[int, Any] = dict(uri.object_template())
    for token in token_refs(client, uri):
        if not token.initialized:
            continue
        with open_session(client, token.slot, pin=pin) as session:
            found.extend(describe_object(client, session, token, h) for h in find_objects(client, session, template))
    return found


def with_type(uri: Pkcs11Uri, object_class: int) -> Pkcs11Uri:
    """``uri`` narrowed to objects of ``object_class`` (unchanged when it already names a type)."""
    if uri.type is not None:
        return uri
    return replace(uri, type=_TYPE_NAMES[object_class])


def pick_key(keys: list[ObjectInfo], classes: tuple[int, ...], uri: Pkcs11Uri, purpose: str) -> ObjectInfo:
    """The key among ``keys`` usable for ``purpose`` (its class in ``classes``, in order of preference)."""
    for cls in classes:
        matching = [k for k in keys if k.object_class == cls]
        if matching:
            tokens = {k.token.slot for k in matching}
            if len(tokens) > 1:
                raise CliError(f"{uri} matches keys on several tokens", "add token=LABEL to the URI")
            return matching[0]
    wanted = " or ".join(_TYPE_NAMES.get(c, str(c)) for c in classes)
    raise CliError(
        f"no {wanted} key matches {uri} to {purpose} with",
        "check the URI with 'keygrid keys list' (private keys are only listed with a PIN)",
    )


PRIVATE_OR_SECRET = (CKO.PRIVATE_KEY, CKO.SECRET_KEY)
PUBLIC_OR_SECRET = (CKO.PUBLIC_KEY, CKO.SECRET_KEY)
