"""``keygrid keys``: list, generate, import, delete keys and export public keys.

Generated and imported keys are token objects; private and secret keys are
CKA_PRIVATE, CKA_SENSITIVE and not extractable. Key pairs share a CKA_ID
(random 8 bytes unless --id is given) so one URI names both halves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from keygridd.cli.hints import CliError, UsageError
from keygridd.cli.objects import (
    CURVES,
    describe_object,
    find_keys,
    find_objects,
    one_token,
    open_session,
    parse_uri,
    token_refs,
)
from keygridd.cli.output import format_table, read_input, write_output
from keygridd.pkcs11 import CKA, CKK, CKM, CKO
from keygridd.pkcs11.params import Mechanism
from keygridd.pkcs11.uri import Pkcs11Uri

if TYPE_CHECKING:
    from keygridd.cli.app import Context

KEY_TYPES = ("ec:P-256", "ec:P-384", "ec:P-521", "ec:secp256k1", "rsa:2048", "rsa:3072", "rsa:4096",
             "ed25519", "ed448", "aes:128", "aes:192", "aes:256")  # fmt: skip
RSA_EXPONENT = b"\x01\x00\x01"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A parsed ``--type``: the family and its size or curve."""

    family: str  # ec | rsa | ed | aes
    size: int = 0
    curve: str = ""

    @classmethod
    def parse(cls, text: str) -> KeySpec:
        family, _, arg = text.partition(":")
        family = family.lower()
        if family in ("ed25519", "ed448") and not arg:
            return cls("ed", curve=family)
        if family == "ec" and arg in CURVES and not arg.startswith("ed"):
            return cls("ec", curve=arg)
        if family == "rsa" and arg in ("2048", "3072", "4096"):
            return cls("rsa", size=int(arg))
        if family == "aes" and arg in ("128", "192", "256"):
            return cls("aes", size=int(arg))
        raise UsageError(f"unknown key type {text!r}", f"choose one of {', '.join(KEY_TYPES)}")


def register(commands: Any) -> None:
    p = commands.add_parser("keys", help="list, generate, import and delete keys")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    ls = actions.add_parser("list", help="list keys (private keys only when a PIN is available)")
    ls.add_argument("uri", nargs="?", default="pkcs11:", metavar="URI", help="PKCS#11 URI to filter by")
    _pin_option(ls)
    ls.set_defaults(handler=list_keys)

    gen = actions.add_parser("generate", help="generate a key or key pair on a token")
    gen.add_argument("--type", required=True, metavar="TYPE", help=f"one of {', '.join(KEY_TYPES)}")
    _key_options(gen)
    gen.set_defaults(handler=generate_key)

    imp = actions.add_parser("import", help="import a PEM private key (or a raw AES key with --type aes)")
    imp.add_argument("file", metavar="FILE", help="PEM private key, or raw key bytes ('-' = stdin)")
    imp.add_argument("--type", metavar="TYPE", help="'aes' to import FILE as a raw AES key")
    _key_options(imp)
    imp.set_defaults(handler=import_key)

    rm = actions.add_parser("delete", help="delete the objects a URI names")
    rm.add_argument("uri", metavar="URI")
    _pin_option(rm)
    rm.set_defaults(handler=delete_keys)

    pub = actions.add_parser("public", help="print a public key as PEM")
    pub.add_argument("uri", metavar="URI")
    pub.add_argument("--out", default="-", metavar="FILE", help="write the PEM to FILE (default: stdout)")
    pub.set_defaults(handler=export_public_key)


def _pin_option(p: Any) -> None:
    p.add_argument("--pin-file", metavar="FILE", help="file holding the user PIN (else KEYGRID_PIN or a prompt)")


def _key_options(p: Any) -> None:
    p.add_argument("--label", required=True, help="CKA_LABEL of the new key")
    p.add_argument("--id", metavar="HEX", help="CKA_ID in hex (default: 8 random bytes)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--slot", type=int, metavar="N", help="slot of the token (default: the only token)")
    where.add_argument("uri", nargs="?", metavar="URI", help="PKCS#11 URI of the token (token=LABEL)")
    _pin_option(p)


def _key_id(text: str | None) -> bytes:
    if text is None:
        return os.urandom(8)
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise UsageError(f"--id must be hex, got {text!r}") from None


def list_keys(ctx: Context) -> int:
    uri = parse_uri(ctx.args.uri)
    keys = find_keys(ctx.client, uri, ctx.optional_user_pin(uri))
    rows = [(str(k.uri), k.type_name, k.kind, k.label) for k in keys]
    ctx.out.table([k.as_dict() for k in keys], ("URI", "TYPE", "KEY", "LABEL"), rows)
    return 0


def _target(ctx: Context) -> tuple[Any, Pkcs11Uri | None]:
    uri = parse_uri(ctx.args.uri) if ctx.args.uri else None
    return one_token(ctx.client, uri, ctx.args.slot), uri


def _report_created(ctx: Context, token: Any, label: str, key_id: bytes, kinds: tuple[str, ...], key: str) -> None:
    uris = [str(Pkcs11Uri(token=token.label, object=label, id=key_id, type=t)) for t in kinds]
    data = {"slot": token.slot, "token": token.label, "key": key, "label": label, "id": key_id.hex(), "uris": uris}
    ctx.out.emit(data, "\n".join(uris))


def generate_key(ctx: Context) -> int:
    spec = KeySpec.parse(ctx.args.type)
    label = ctx.args.label
    key_id = _key_id(ctx.args.id)
    pin = ctx.user_pin()
    client = ctx.client
    token, _ = _target(ctx)
    common: dict[int, Any] = {CKA.TOKEN: True, CKA.LABEL: label.encode("utf-8"), CKA.ID: key_id}
    secret: dict[int, Any] = {CKA.PRIVATE: True, CKA.SENSITIVE: True, CKA.EXTRACTABLE: False}
    with open_session(client, token.slot, rw=True, pin=pin) as session:
        if spec.family == "aes":
            template: dict[int, Any] = {**common, **secret, CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES,
                        CKA.VALUE_LEN: spec.size // 8, CKA.ENCRYPT: True, CKA.DECRYPT: True}  # fmt: skip
            client.C_GenerateKey(session, Mechanism(CKM.AES_KEY_GEN), template)
            _report_created(ctx, token, label, key_id, ("secret-key",), ctx.args.type)
            return 0
        public: dict[int, Any] = {**common, CKA.PRIVATE: False, CKA.VERIFY: True}
        private: dict[int, Any] = {**common, **secret, CKA.SIGN: True}
        if spec.family == "rsa":
            mechanism = CKM.RSA_PKCS_KEY_PAIR_GEN
            public |= {CKA.MODULUS_BITS: spec.size, CKA.PUBLIC_EXPONENT: RSA_EXPONENT, CKA.ENCRYPT: True}
            private[CKA.DECRYPT] = True
        else:
            mechanism = CKM.EC_KEY_PAIR_GEN if spec.family == "ec" else CKM.EC_EDWARDS_KEY_PAIR_GEN
            public[CKA.EC_PARAMS] = CURVES[spec.curve]
        client.C_GenerateKeyPair(session, Mechanism(mechanism), public, private)
    _report_created(ctx, token, label, key_id, ("private", "public"), ctx.args.type)
    return 0


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _der_octet_string(data: bytes) -> bytes:
    n = len(data)
    if n < 0x80:
        return b"\x04" + bytes([n]) + data
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + data


def key_templates(key: Any) -> tuple[dict[int, Any], dict[int, Any], str]:
    """The private and public object templates for a ``cryptography`` private key, and its kind."""
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        pub: dict[int, Any] = {CKA.KEY_TYPE: CKK.RSA, CKA.MODULUS: _int_bytes(n.public_numbers.n),
               CKA.PUBLIC_EXPONENT: _int_bytes(n.public_numbers.e)}  # fmt: skip
        priv = pub | {CKA.PRIVATE_EXPONENT: _int_bytes(n.d), CKA.PRIME_1: _int_bytes(n.p), CKA.PRIME_2: _int_bytes(n.q),
                      CKA.EXPONENT_1: _int_bytes(n.dmp1), CKA.EXPONENT_2: _int_bytes(n.dmq1),
                      CKA.COEFFICIENT: _int_bytes(n.iqmp), CKA.SIGN: True, CKA.DECRYPT: True}  # fmt: skip
        return priv, pub | {CKA.VERIFY: True, CKA.ENCRYPT: True}, f"rsa:{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}
        curve = names.get(key.curve.name)
        if curve is None:
            raise CliError(f"curve {key.curve.name} is not supported")
        size = (key.curve.key_size + 7) // 8
        point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        params: dict[int, Any] = {CKA.KEY_TYPE: CKK.EC, CKA.EC_PARAMS: CURVES[curve]}
        priv = params | {CKA.VALUE: key.private_numbers().private_value.to_bytes(size, "big"), CKA.SIGN: True}
        return priv, params | {CKA.EC_POINT: _der_octet_string(point), CKA.VERIFY: True}, f"ec:{curve}"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        curve = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "ed448"
        raw = serialization.Encoding.Raw
        secret = key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        public = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
        params = {CKA.KEY_TYPE: CKK.EC_EDWARDS, CKA.EC_PARAMS: CURVES[curve]}
        return (params | {CKA.VALUE: secret, CKA.SIGN: True},
                params | {CKA.EC_POINT: _der_octet_string(public), CKA.VERIFY: True}, curve)  # fmt: skip
    raise CliError(f"{type(key).__name__} keys are not supported", "import RSA, EC, Ed25519 or Ed448 keys")


def import_key(ctx: Context) -> int:
    data = read_input(ctx.args.file)
    label = ctx.args.label
    key_id = _key_id(ctx.args.id)
    common: dict[int, Any] = {CKA.TOKEN: True, CKA.LABEL: label.encode("utf-8"), CKA.ID: key_id}
    secret: dict[int, Any] = {CKA.PRIVATE: True, CKA.SENSITIVE: True, CKA.EXTRACTABLE: False}
    if ctx.args.type is not None and ctx.args.type.lower() != "aes":
        raise UsageError(f"--type for import must be 'aes', got {ctx.args.type!r}")
    if ctx.args.type is not None:
        if len(data) not in (16, 24, 32):
            raise CliError(f"{ctx.args.file}: an AES key is 16, 24 or 32 bytes, got {len(data)}")
        templates: list[dict[int, Any]] = [{**common, **secret, CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: data,
                      CKA.ENCRYPT: True, CKA.DECRYPT: True}]  # fmt: skip
        kinds: tuple[str, ...] = ("secret-key",)
        kind = f"aes:{len(data) * 8}"
    else:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise CliError(f"{ctx.args.file}: the key is encrypted", "decrypt it first (openssl pkey)") from None
        except ValueError:
            raise CliError(f"{ctx.args.file}: not a PEM private key") from None
        priv, pub, kind = key_templates(key)
        templates = [{**common, **secret, CKA.CLASS: CKO.PRIVATE_KEY, **priv},
                     {**common, CKA.PRIVATE: False, CKA.CLASS: CKO.PUBLIC_KEY, **pub}]  # fmt: skip
        kinds = ("private", "public")
    pin = ctx.user_pin()
    token, _ = _target(ctx)
    with open_session(ctx.client, token.slot, rw=True, pin=pin) as session:
        for template in templates:
            ctx.client.C_CreateObject(session, template)
    _report_created(ctx, token, label, key_id, kinds, kind)
    return 0


def delete_keys(ctx: Context) -> int:
    uri = parse_uri(ctx.args.uri)
    if not uri.names_object():
        raise UsageError("the URI must name objects by object= or id=", "see 'keygrid keys list'")
    pin = ctx.user_pin(uri)
    client = ctx.client
    deleted = []
    for token in [t for t in token_refs(client, uri) if t.initialized]:
        with open_session(client, token.slot, rw=True, pin=pin) as session:
            for handle in find_objects(client, session, dict(uri.object_template())):
                info = describe_object(client, session, token, handle)
                client.C_DestroyObject(session, handle)
                deleted.append(info)
    if not deleted:
        raise CliError(f"nothing matches {uri}", "check the URI with 'keygrid keys list'")
    rows = [(str(k.uri), k.type_name, k.kind) for k in deleted]
    ctx.out.emit([k.as_dict() for k in deleted], "deleted:\n" + format_table(("URI", "TYPE", "KEY"), rows))
    return 0


def export_public_key(ctx: Context) -> int:
    uri = parse_uri(ctx.args.uri)
    der = ctx.client.KG_GetPublicKey(str(uri))
    key = serialization.load_der_public_key(der)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ctx.out.json_mode and ctx.args.out == "-":
        ctx.out.emit({"uri": str(uri), "pem": pem.decode("ascii")}, "")
    else:
        write_output(ctx.args.out, pem)
    return 0
