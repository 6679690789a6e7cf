"""``keygrid sign | verify | encrypt | decrypt``: use a key named by a PKCS#11 URI.

Without --mechanism the key is looked up to choose one (see ``mechanisms``).
The operations themselves are single round trips (KG_Sign, KG_Verify,
KG_Encrypt, KG_Decrypt); the URI is narrowed to the key class the operation
needs. ``verify`` prints "Signature OK" (exit 0) or "Signature invalid" (exit 1).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from keygridd.cli.hints import EXIT_FAILURE, CliError
from keygridd.cli.mechanisms import (
    Operation,
    decryption_mechanism,
    default_mechanism,
    encryption_mechanism,
    parse_mechanism,
    signature_mechanism,
)
from keygridd.cli.objects import PRIVATE_OR_SECRET, PUBLIC_OR_SECRET, find_keys, parse_uri, pick_key, with_type
from keygridd.cli.output import read_input, write_output
from keygridd.pkcs11 import CKO
from keygridd.pkcs11.errors import SignatureInvalid, SignatureLenRange
from keygridd.pkcs11.uri import Pkcs11Uri

if TYPE_CHECKING:
    from keygridd.cli.app import Context

# operation -> key classes that can do it, in order of preference
_CLASSES: dict[str, tuple[int, ...]] = {
    "sign": PRIVATE_OR_SECRET,
    "decrypt": PRIVATE_OR_SECRET,
    "verify": PUBLIC_OR_SECRET,
    "encrypt": PUBLIC_OR_SECRET,
}


def register(commands: Any) -> None:
    for name, text in (("sign", "sign data"), ("encrypt", "encrypt data"), ("decrypt", "decrypt data")):
        p = commands.add_parser(name, help=f"{text} with the key a URI names")
        _common(p)
        p.add_argument("--out", default="-", metavar="FILE", help="output file ('-' = stdout, the default)")
        p.set_defaults(handler=_HANDLERS[name])
    p = commands.add_parser("verify", help="verify a signature with the key a URI names")
    _common(p)
    p.add_argument("--signature", required=True, metavar="FILE", help="the signature to check")
    p.set_defaults(handler=verify)


def _common(p: Any) -> None:
    p.add_argument("uri", metavar="URI", help="PKCS#11 URI of the key")
    p.add_argument("--mechanism", metavar="NAME", help="CKM_* name (default: by key type)")
    p.add_argument("--in", dest="input", default="-", metavar="FILE", help="input file ('-' = stdin, the default)")
    p.add_argument("--pin-file", metavar="FILE", help="file holding the user PIN (else KEYGRID_PIN or a prompt)")


def resolve(ctx: Context, operation: Operation, needs_pin: bool) -> tuple[Pkcs11Uri, int, bytes | None]:
    """The URI narrowed to the key class, the mechanism, and the PIN to use."""
    uri = parse_uri(ctx.args.uri)
    pin = ctx.user_pin(uri) if needs_pin else ctx.optional_user_pin(uri)
    keys = find_keys(ctx.client, uri, pin)
    if not keys and pin is None:  # the key may be private: ask for the PIN and look again
        pin = ctx.user_pin(uri)
        keys = find_keys(ctx.client, uri, pin)
    key = pick_key(keys, _CLASSES[operation], uri, operation)
    assert key.object_class is not None and key.key_type is not None
    narrowed = with_type(uri, key.object_class)
    if narrowed.token is None and key.token.label:
        narrowed = replace(narrowed, token=key.token.label)
    if ctx.args.mechanism is not None:
        mechanism = parse_mechanism(ctx.args.mechanism)
    else:
        mechanism = default_mechanism(operation, key.key_type)
    if key.object_class == CKO.SECRET_KEY and pin is None:
        pin = ctx.user_pin(uri)
    return narrowed, mechanism, pin


def sign(ctx: Context) -> int:
    data = read_input(ctx.args.input)
    uri, mechanism, pin = resolve(ctx, "sign", needs_pin=True)
    signature = ctx.client.KG_Sign(str(uri), signature_mechanism(mechanism), data, pin=pin)
    _write_result(ctx, "signature", signature)
    return 0


def verify(ctx: Context) -> int:
    data = read_input(ctx.args.input)
    signature = read_input(ctx.args.signature)
    uri, mechanism, pin = resolve(ctx, "verify", needs_pin=False)
    try:
        ctx.client.KG_Verify(str(uri), signature_mechanism(mechanism), data, signature, pin=pin)
    except (SignatureInvalid, SignatureLenRange) as exc:
        ctx.out.emit({"valid": False, "error": str(exc)}, "Signature invalid")
        return EXIT_FAILURE
    ctx.out.emit({"valid": True}, "Signature OK")
    return 0


def encrypt(ctx: Context) -> int:
    data = read_input(ctx.args.input)
    uri, number, pin = resolve(ctx, "encrypt", needs_pin=False)
    mechanism, prefix = encryption_mechanism(number)
    ciphertext = ctx.client.KG_Encrypt(str(uri), mechanism, data, pin=pin)
    _write_result(ctx, "ciphertext", prefix + ciphertext)
    return 0


def decrypt(ctx: Context) -> int:
    data = read_input(ctx.args.input)
    uri, number, pin = resolve(ctx, "decrypt", needs_pin=True)
    mechanism, ciphertext = decryption_mechanism(number, data)
    plaintext = ctx.client.KG_Decrypt(str(uri), mechanism, ciphertext, pin=pin)
    _write_result(ctx, "plaintext", plaintext)
    return 0


def _write_result(ctx: Context, name: str, data: bytes) -> None:
    if ctx.out.json_mode and ctx.args.out == "-":
        ctx.out.emit({name: data.hex()}, "")
    elif ctx.args.out == "-" and _stdout_is_tty():
        raise CliError(f"refusing to write binary {name} to a terminal", "use --out FILE (or pipe the output)")
    else:
        write_output(ctx.args.out, data)


def _stdout_is_tty() -> bool:
    import sys

    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


_HANDLERS = {"sign": sign, "encrypt": encrypt, "decrypt": decrypt}
