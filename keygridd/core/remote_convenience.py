"""KG_* calls (one round trip, by PKCS#11 URI) on passthrough slots.

The same contract as ``convenience.py`` for KeyGrid's own tokens: a transient
module session of its own, the application's login for the slot or, when a
PIN is given and the application is not logged in, a login for this call only
(checked and throttled like ``C_Login``; the module is logged out again after
it when nobody else needs the login). The key is found in the module by the
URI's object attributes, the class the operation needs and its usage flag,
among the objects the application may see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keygridd.core.model import Application
from keygridd.core.offload import Work
from keygridd.core.passthrough import Passthrough
from keygridd.core.remote import RemoteToken
from keygridd.mechanisms import public_key_info
from keygridd.pkcs11 import CKA, CKO, CKU, SessionFlag
from keygridd.pkcs11.errors import ArgumentsBad, KeyHandleInvalid, PKCS11Error
from keygridd.pkcs11.params import Mechanism
from keygridd.pkcs11.uri import Pkcs11Uri

# What each call needs: the classes of key it may use, the usage flag, and the module calls.
_USES: dict[str, tuple[tuple[int, ...], int | None]] = {
    "KG_Sign": ((CKO.PRIVATE_KEY, CKO.SECRET_KEY), CKA.SIGN),
    "KG_Verify": ((CKO.PUBLIC_KEY, CKO.SECRET_KEY), CKA.VERIFY),
    "KG_Encrypt": ((CKO.PUBLIC_KEY, CKO.SECRET_KEY), CKA.ENCRYPT),
    "KG_Decrypt": ((CKO.PRIVATE_KEY, CKO.SECRET_KEY), CKA.DECRYPT),
}
_PUBLIC_PARTS = (CKA.CLASS, CKA.KEY_TYPE, CKA.EC_PARAMS, CKA.EC_POINT, CKA.MODULUS, CKA.PUBLIC_EXPONENT, CKA.VALUE)


def matching_tokens(tokens: Sequence[RemoteToken], app: Application, uri: Pkcs11Uri) -> list[RemoteToken]:
    """The ready passthrough tokens this application may use that the URI's token attributes name."""
    found = []
    for token in sorted(tokens, key=lambda t: t.slot_id):
        if not (token.allows(app.peer) and token.ready and token.info):
            continue
        if uri.slot_id is not None and uri.slot_id != token.slot_id:
            continue
        info = token.info
        if uri.matches_token(info["label"], info["manufacturer_id"], info["model"], info["serial_number"]):
            found.append(token)
    return found


def uri_call(
    passthrough: Passthrough, app: Application, token: RemoteToken, name: str, uri: Pkcs11Uri, args: Sequence[Any]
) -> Work[Any]:
    """Run one KG_* call on a passthrough token; ``args`` are the call's arguments after the URI."""
    module_slot = token.require_slot()
    session = yield token.forward("C_OpenSession", module_slot, int(SessionFlag.SERIAL_SESSION))
    transient = False
    try:
        pin = args[-1]
        logged_in = app.login.get(token.slot_id) == CKU.USER
        if not logged_in and pin is not None:
            was = token.module_login
            yield from passthrough.check_pin_throttled(app, token, session, CKU.USER, pin)
            logged_in, transient = True, was is None
        if name == "KG_GetPublicKey":
            return (yield from _public_key(token, session, uri, logged_in))
        classes, usage = _USES[name]
        key = yield from _find_key(token, session, uri, classes, usage, logged_in)
        mechanism: Mechanism = args[0]
        if name == "KG_Sign":
            yield token.forward("C_SignInit", session, mechanism, key)
            return (yield token.forward("C_Sign", session, args[1], None))[0]
        if name == "KG_Verify":
            yield token.forward("C_VerifyInit", session, mechanism, key)
            yield token.forward("C_Verify", session, args[1], args[2])
            return None
        init, run = ("C_EncryptInit", "C_Encrypt") if name == "KG_Encrypt" else ("C_DecryptInit", "C_Decrypt")
        yield token.forward(init, session, mechanism, key)
        return (yield token.forward(run, session, args[1], None))[0]
    finally:
        try:
            yield token.forward("C_CloseSession", session)
        except PKCS11Error:
            pass
        logout = passthrough.module_logout_if_idle(token) if transient else None
        if logout is not None:
            try:
                yield logout
            except PKCS11Error:
                pass


def _candidates(
    token: RemoteToken, session: int, template: dict[int, Any], classes: Sequence[int], logged_in: bool
) -> Work[list[int]]:
    """Module handles of the token objects the URI names, of these classes, that the caller may see."""
    found: list[int] = []
    for cls in classes:
        if CKA.CLASS in template and template[CKA.CLASS] != cls:
            continue
        matches = yield token.forward("KG_FindAll", session, list({**template, CKA.CLASS: cls}.items()))
        for module_handle, meta in matches:
            token_object, private = (bool(meta[0]), bool(meta[1])) if meta is not None else (False, True)
            if token_object and (logged_in or not private):
                found.append(module_handle)
    return found


def _find_key(
    token: RemoteToken,
    session: int,
    uri: Pkcs11Uri,
    classes: Sequence[int],
    usage: int | None,
    logged_in: bool,
) -> Work[int]:
    template: dict[int, Any] = dict(uri.object_template())
    if usage is not None:
        template[usage] = True
    found = yield from _candidates(token, session, template, classes, logged_in)
    if not found:
        raise KeyHandleInvalid("no key matches the URI (log in, or give a PIN, for private keys)")
    if len(found) > 1:
        raise ArgumentsBad(f"the URI matches {len(found)} keys: add id= or type=")
    return found[0]


def _public_key(token: RemoteToken, session: int, uri: Pkcs11Uri, logged_in: bool) -> Work[bytes]:
    """SubjectPublicKeyInfo of the public key object the URI names (a module keeps the public point there)."""
    found = yield from _candidates(token, session, dict(uri.object_template()), (CKO.PUBLIC_KEY,), logged_in)
    if not found:
        raise KeyHandleInvalid("no public key object matches the URI")
    if len(found) > 1:
        raise ArgumentsBad(f"the URI matches {len(found)} keys: add id= or type=")
    try:
        values = yield token.forward("C_GetAttributeValue", session, found[0], list(_PUBLIC_PARTS))
    except PKCS11Error as exc:  # the parts a key type does not have come back unavailable
        values = exc.result if isinstance(exc.result, list) else []
    return public_key_info({a: v for a, v in zip(_PUBLIC_PARTS, values, strict=False) if v is not None})
