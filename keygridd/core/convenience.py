"""KG_* calls: one round trip for local applications, by PKCS#11 URI (RFC 7512).

Each call runs in a transient session of its own, with the application's
login state for the token, or, when a PIN is given and the application is not
logged in, with a login that lasts for this call only. Nothing it does is
visible to the application's sessions afterwards.
"""

from __future__ import annotations

import functools
import time
from typing import Any, cast

import keygridd
import keygridd.mechanisms as mechanisms
from keygridd.core.crypto import CryptoFunctions
from keygridd.core.model import Application, Obj, OpKind, Session, Slot
from keygridd.core.offload import Offload, Work
from keygridd.core.remote import RemoteToken
from keygridd.core.remote_convenience import matching_tokens, uri_call
from keygridd.mechanisms.base import sign_job
from keygridd.pkcs11 import CKA, CKO, CKU
from keygridd.pkcs11.errors import ArgumentsBad, KeyHandleInvalid, SlotIdInvalid, TokenNotRecognized
from keygridd.pkcs11.params import Mechanism
from keygridd.pkcs11.uri import Pkcs11Uri


class ConvenienceFunctions(CryptoFunctions):
    started = time.monotonic()

    def KG_Ping(self, app: Application) -> None:
        return None

    def KG_Status(self, app: Application) -> dict[str, Any]:
        slots: list[dict[str, Any]] = []
        for slot in sorted(self.slots.values(), key=lambda s: s.slot_id):
            if not slot.allows(app.peer):
                continue
            store = slot.store
            slots.append(
                {
                    "slot_id": slot.slot_id,
                    "description": slot.description,
                    "provider": slot.provider,
                    "token_present": slot.ready,
                    "token_label": store.label.decode("utf-8", "replace").rstrip(" "),
                    "initialized": store.initialized,
                    "ready": slot.ready,
                }
            )
        for token in self.remote.values():
            if token.allows(app.peer):
                slots.append(
                    {
                        "slot_id": token.slot_id,
                        "description": token.description,
                        "provider": token.provider,
                        "token_present": token.ready,
                        "token_label": token.info.get("label", token.label or ""),
                        "initialized": True,
                        "ready": token.ready,
                    }
                )
        slots.sort(key=lambda s: int(s["slot_id"]))
        return {"version": keygridd.__version__, "uptime": time.monotonic() - self.started, "slots": slots}

    def _candidates(self, app: Application, uri: Pkcs11Uri) -> list[Slot]:
        candidates: list[Slot] = []
        for slot in sorted(self.slots.values(), key=lambda s: s.slot_id):
            if not (slot.allows(app.peer) and slot.ready and slot.store.initialized):
                continue
            if uri.slot_id is not None and uri.slot_id != slot.slot_id:
                continue
            desc = slot.store.description
            label = slot.store.label.decode("utf-8", "replace").rstrip(" ")
            if uri.matches_token(label, desc.manufacturer, desc.model, desc.serial):
                candidates.append(slot)
        return candidates

    def _route(self, app: Application, uri_text: str) -> tuple[Pkcs11Uri, RemoteToken | None]:
        """The parsed URI, and the passthrough token it names (None: one of KeyGrid's own tokens)."""
        uri = _parse(uri_text)
        remote = matching_tokens(list(self.remote.values()), app, uri) if self.remote else []
        if len(remote) + len(self._candidates(app, uri)) > 1:
            raise ArgumentsBad("the URI matches several tokens: name the token")
        return uri, remote[0] if remote else None

    def _uri_session(self, app: Application, uri: Pkcs11Uri, pin: bytes | None) -> Work[Session]:
        candidates = self._candidates(app, uri)
        if not candidates:
            raise SlotIdInvalid("no token matches the URI")
        if len(candidates) > 1:
            raise ArgumentsBad("the URI matches several tokens: name the token")
        slot = candidates[0]
        if slot.store.initialized is False:
            raise TokenNotRecognized()
        transient = Application(app.app_id, app.peer)
        transient.session_objects = app.session_objects
        login = app.login.get(slot.slot_id)
        if login is None and pin is not None:
            yield from self.check_pin_throttled(app, slot.slot_id, CKU.USER, pin)
            self.after_login(slot.slot_id)
            login = CKU.USER
        if login is not None:
            transient.login[slot.slot_id] = login
        return Session(0, slot.slot_id, transient, False)

    def _uri_key(self, session: Session, uri: Pkcs11Uri, classes: tuple[int, ...], usage: int | None) -> Obj:
        template = list(uri.object_template().items())
        found = [
            o
            for o in self.objects_of(session)
            if self.visible(session, o)
            and o.cls in classes
            and (usage is None or o.attrs.get(usage) is True)
            and all(o.attrs.get(a) == v for a, v in template)
        ]
        if not found:
            raise KeyHandleInvalid("no key matches the URI (log in, or give a PIN, for private keys)")
        if len(found) > 1:
            raise ArgumentsBad(f"the URI matches {len(found)} keys: add id= or type=")
        return found[0]

    def _uri_op(
        self, app: Application, uri_text: str, kind: OpKind, mechanism: Mechanism, pin: bytes | None
    ) -> Work[Any]:
        uri = _parse(uri_text)
        session = yield from self._uri_session(app, uri, pin)
        classes = (
            (CKO.PRIVATE_KEY, CKO.SECRET_KEY)
            if kind in (OpKind.SIGN, OpKind.DECRYPT)
            else (CKO.PUBLIC_KEY, CKO.SECRET_KEY)
        )
        usage = {
            OpKind.SIGN: CKA.SIGN,
            OpKind.VERIFY: CKA.VERIFY,
            OpKind.ENCRYPT: CKA.ENCRYPT,
            OpKind.DECRYPT: CKA.DECRYPT,
        }
        try:
            key = self._uri_key(session, uri, classes, usage[kind])
            return self.init_operation(session, kind, mechanism, key)
        except BaseException:
            self.relock_if_idle(session.slot_id)
            raise

    def _finish(self, op: Any) -> None:
        if op is not None and op.key is not None:
            self.relock_if_idle(op.key.slot_id)

    def KG_Sign(self, app: Application, uri: str, mechanism: Mechanism, data: bytes, pin: bytes | None) -> Work[bytes]:
        parsed, token = self._route(app, uri)
        if token is not None:
            out = yield from uri_call(self.passthrough, app, token, "KG_Sign", parsed, (mechanism, data, pin))
            return cast(bytes, out)
        op = yield from self._uri_op(app, uri, OpKind.SIGN, mechanism, pin)
        try:
            job = sign_job(op.context, data)
            signature: bytes = yield Offload(lambda: op.context.sign(data), op.thread, job=job)
        finally:
            self._finish(op)
        return signature

    def KG_Verify(
        self, app: Application, uri: str, mechanism: Mechanism, data: bytes, signature: bytes, pin: bytes | None
    ) -> Work[None]:
        parsed, token = self._route(app, uri)
        if token is not None:
            yield from uri_call(self.passthrough, app, token, "KG_Verify", parsed, (mechanism, data, signature, pin))
            return
        op = yield from self._uri_op(app, uri, OpKind.VERIFY, mechanism, pin)
        try:
            yield Offload(lambda: op.context.verify(data, signature), op.thread)
        finally:
            self._finish(op)

    def KG_Encrypt(
        self, app: Application, uri: str, mechanism: Mechanism, data: bytes, pin: bytes | None
    ) -> Work[bytes]:
        parsed, token = self._route(app, uri)
        if token is not None:
            result = yield from uri_call(self.passthrough, app, token, "KG_Encrypt", parsed, (mechanism, data, pin))
            return cast(bytes, result)
        op = yield from self._uri_op(app, uri, OpKind.ENCRYPT, mechanism, pin)
        try:
            out: bytes = yield Offload(lambda: op.context.one_shot(data), op.thread)
        finally:
            self._finish(op)
        return out

    def KG_Decrypt(
        self, app: Application, uri: str, mechanism: Mechanism, data: bytes, pin: bytes | None
    ) -> Work[bytes]:
        parsed, token = self._route(app, uri)
        if token is not None:
            result = yield from uri_call(self.passthrough, app, token, "KG_Decrypt", parsed, (mechanism, data, pin))
            return cast(bytes, result)
        op = yield from self._uri_op(app, uri, OpKind.DECRYPT, mechanism, pin)
        try:
            out: bytes = yield Offload(lambda: op.context.one_shot(data), op.thread)
        finally:
            self._finish(op)
        return out

    def KG_GetPublicKey(self, app: Application, uri_text: str, pin: bytes | None) -> Work[bytes]:
        uri, token = self._route(app, uri_text)
        if token is not None:
            out = yield from uri_call(self.passthrough, app, token, "KG_GetPublicKey", uri, (pin,))
            return cast(bytes, out)
        session = yield from self._uri_session(app, uri, pin)
        try:
            try:
                key = self._uri_key(session, uri, (CKO.PUBLIC_KEY,), None)
            except KeyHandleInvalid:
                key = self._uri_key(session, uri, (CKO.PRIVATE_KEY,), None)
            return mechanisms.public_key_info(key.attrs)
        finally:
            self.relock_if_idle(session.slot_id)


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> Pkcs11Uri:
    """Parse a URI once: applications repeat the same few (the result is immutable)."""
    try:
        return Pkcs11Uri.parse(text)
    except ValueError as exc:
        raise ArgumentsBad(f"bad PKCS#11 URI: {exc}") from None
