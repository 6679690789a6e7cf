"""The PKCS#11 functions of passthrough slots (see ``remote.py`` for the rules).

``Passthrough.run(app, name, args)`` serves every call whose slot or session
belongs to a passthrough token: KeyGrid's checks (the session is the
application's, the object is visible to it, the login is its own) come first,
then the call goes to the module with module handles in place of KeyGrid's, and
the module's result or CKR comes back unchanged. Objects the module returns are
registered under KeyGrid handles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keygridd.core.base import THROTTLE_FIRST, THROTTLE_MAX, CoreState, check_login_request, session_info
from keygridd.core.model import Application, Session
from keygridd.core.offload import Offload, Work
from keygridd.core.policy import is_sensitive_attribute
from keygridd.core.remote import META_TYPES, Forward, RemoteSession, RemoteToken
from keygridd.pkcs11 import CKA, CKU, SessionFlag
from keygridd.pkcs11.errors import (
    DeviceError,
    FunctionFailed,
    KeyHandleInvalid,
    ObjectHandleInvalid,
    OperationActive,
    OperationNotInitialized,
    PinIncorrect,
    PKCS11Error,
    SessionExists,
    SessionHandleInvalid,
    SessionReadWriteSoExists,
    SlotIdInvalid,
    TokenNotPresent,
    UnwrappingKeyHandleInvalid,
    UserAlreadyLoggedIn,
    UserAnotherAlreadyLoggedIn,
    UserNotLoggedIn,
    WrappingKeyHandleInvalid,
)

# Calls that only need the session translated: the rest of their arguments go to the module as given.
_PLAIN = [
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestFinal",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecover",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetOperationState",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_GetObjectSize",
    "C_GetAttributeValue",
]

# Object handle arguments (position after the session, error for a handle the application cannot use).
_HANDLES: dict[str, tuple[tuple[int, type[PKCS11Error]], ...]] = {
    **{
        name: ((2, KeyHandleInvalid),)
        for name in [
            "C_EncryptInit",
            "C_DecryptInit",
            "C_SignInit",
            "C_VerifyInit",
            "C_SignRecoverInit",
            "C_VerifyRecoverInit",
            "C_DeriveKey",
        ]
    },
    "C_DigestKey": ((1, KeyHandleInvalid),),
    "C_WrapKey": ((2, WrappingKeyHandleInvalid), (3, KeyHandleInvalid)),
    "C_UnwrapKey": ((2, UnwrappingKeyHandleInvalid),),
    "C_GetObjectSize": ((1, ObjectHandleInvalid),),
    "C_GetAttributeValue": ((1, ObjectHandleInvalid),),
    "C_SetAttributeValue": ((1, ObjectHandleInvalid),),
    "C_DestroyObject": ((1, ObjectHandleInvalid),),
    "C_CopyObject": ((1, ObjectHandleInvalid),),
    "C_SetOperationState": ((2, KeyHandleInvalid), (3, KeyHandleInvalid)),
}

# What a module says of a handle that died with a restarted worker.
_STALE = (SessionHandleInvalid, ObjectHandleInvalid, KeyHandleInvalid)

# Calls whose module result is one new object ([handle, meta]).
_CREATES = ("C_CreateObject", "C_CopyObject", "C_GenerateKey", "C_UnwrapKey", "C_DeriveKey")


class Passthrough:
    """Serves the calls of passthrough slots for the core's applications."""

    def __init__(self, state: CoreState, tokens: dict[int, RemoteToken]) -> None:
        self.state = state
        self.tokens = tokens
        self.background: list[Forward] = []  # module calls to make after the fact (sessions of a gone app)
        plain: dict[str, Callable[[Application, str, list[Any]], Any]] = {
            name: self._forward for name in (*_PLAIN, *_HANDLES)
        }
        self.handlers: dict[str, Callable[[Application, str, list[Any]], Any]] = {
            **plain,
            **{name: self._create for name in _CREATES},
            "C_GenerateKeyPair": self._generate_pair,
            "C_SetAttributeValue": self._set_attributes,
            "C_DestroyObject": self._destroy,
            "C_FindObjectsInit": self._find_init,
            "C_FindObjects": self._find,
            "C_FindObjectsFinal": self._find_final,
            "C_GetSlotInfo": self._slot_info,
            "C_GetTokenInfo": self._by_slot,
            "C_GetMechanismList": self._by_slot,
            "C_GetMechanismInfo": self._by_slot,
            "C_InitToken": self._init_token,
            "C_OpenSession": self._open_session,
            "C_CloseSession": self._close_session,
            "C_CloseAllSessions": self._close_all,
            "C_GetSessionInfo": self._session_info,
            "C_Login": self._login,
            "C_Logout": self._logout_call,
            "C_InitPIN": self._forward,
            "C_SetPIN": self._set_pin,
        }

    def run(self, app: Application, name: str, args: list[Any]) -> Any:
        """Serve one call: its result, or a generator of module calls (``Forward``) that ends with it."""
        handler = self.handlers.get(name)
        if handler is None:
            raise SlotIdInvalid(f"{name} does not take a slot or session")
        return handler(app, name, args)

    # --- lookups ------------------------------------------------------------------------------------

    def _token(self, app: Application, slot_id: int) -> RemoteToken:
        token = self.tokens.get(slot_id)
        if token is None or not token.allows(app.peer):
            raise SlotIdInvalid(f"no slot {slot_id}")
        return token

    def _session(self, app: Application, handle: int) -> tuple[Session, RemoteToken]:
        session = app.sessions.get(handle)
        if session is None or not isinstance(session.remote, RemoteSession):
            raise SessionHandleInvalid(f"no session {handle}")
        return session, self.tokens[session.slot_id]

    def _module_args(
        self, app: Application, name: str, args: list[Any]
    ) -> Work[tuple[Session, RemoteToken, list[Any]]]:
        """The call's arguments with the module's session and object handles in place of KeyGrid's."""
        session, token = self._session(app, args[0])
        module_args = list(args)
        module_args[0] = yield from token.module_session(session)
        for position, error in _HANDLES.get(name, ()):
            handle = module_args[position]
            if name == "C_SetOperationState" and handle == 0:
                continue  # CK_INVALID_HANDLE: no key needed
            module_args[position] = yield from token.module_object(app, handle, error)
        return session, token, module_args

    def _call(self, app: Application, name: str, args: list[Any]) -> Work[tuple[Session, RemoteToken, list[Any], Any]]:
        """Forward one session call; once more if the worker restarted under it (stale module handles)."""
        for attempt in (1, 2):
            session, token, module_args = yield from self._module_args(app, name, args)
            try:
                result = yield token.forward(name, *module_args)
            except DeviceError:
                _lost(session)
                raise
            except _STALE:
                if attempt == 2 or token.generation == token.backend.generation:
                    raise
                continue  # the handles were the old worker's: find the session and objects again
            return session, token, module_args, result
        raise AssertionError("unreachable")  # pragma: no cover

    # --- forwarding ---------------------------------------------------------------------------------

    def _forward(self, app: Application, name: str, args: list[Any]) -> Work[Any]:
        _session, _token, _args, result = yield from self._call(app, name, args)
        return result

    def _create(self, app: Application, name: str, args: list[Any]) -> Work[int]:
        session, token, module_args, (module_handle, meta) = yield from self._call(app, name, args)
        return (yield from self._take(session, token, module_args[0], [(module_handle, meta)]))[0]

    def _take(
        self, session: Session, token: RemoteToken, module_session: int, created: list[tuple[int, Any]]
    ) -> Work[list[int]]:
        """Register new module objects; refuse private ones an application that is not logged in made."""
        handles = [token.adopt(module_handle, meta, session) for module_handle, meta in created]
        if all(token.visible(session.app, token.objects[h]) for h in handles):
            return handles
        for handle, (module_handle, _) in zip(handles, created, strict=True):
            token.drop(handle)
            try:
                yield token.forward("C_DestroyObject", module_session, module_handle)
            except PKCS11Error:
                pass  # it is unreachable for this application either way
        raise UserNotLoggedIn("private objects need the user logged in to this slot")

    def _generate_pair(self, app: Application, name: str, args: list[Any]) -> Work[list[int]]:
        session, token, module_args, pair = yield from self._call(app, "C_GenerateKeyPair", args)
        (public, public_meta), (private, private_meta) = pair
        return (yield from self._take(session, token, module_args[0], [(public, public_meta), (private, private_meta)]))

    def _set_attributes(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        _session, token, _args, _ = yield from self._call(app, "C_SetAttributeValue", args)
        obj = token.objects.get(args[1])
        if obj is not None:
            changed = dict(args[2])
            if CKA.PRIVATE in changed:
                obj.private = bool(changed[CKA.PRIVATE])
            identity = dict(obj.identity)
            identity.update({a: v for a, v in changed.items() if a in META_TYPES[2:]})
            obj.identity = tuple(identity.items())

    def _destroy(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        _session, token, _args, _ = yield from self._call(app, "C_DestroyObject", args)
        token.drop(args[1])

    # --- find ---------------------------------------------------------------------------------------

    def _find_init(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        session, token = self._session(app, args[0])
        remote = session.remote
        assert isinstance(remote, RemoteSession)
        if remote.found is not None:
            raise OperationActive("a search is already active in this session")
        module_session = yield from token.module_session(session)
        template = list(args[1])
        try:
            found = yield token.forward("KG_FindAll", module_session, template)
        except DeviceError:
            _lost(session)
            raise
        handles = []
        for module_handle, meta in found:
            handle = token.adopt(module_handle, meta, None)
            if token.visible(app, token.objects[handle]):
                handles.append(handle)
        remote.found = yield from self._unguessable(token, module_session, handles, [a for a, _ in template])

    def _unguessable(
        self, token: RemoteToken, module_session: int, handles: list[int], attrs: list[int]
    ) -> Work[list[int]]:
        """Leave out keys whose secret the search named while the key keeps it secret.

        A module may match a template against a sensitive value (SoftHSM2 does), which would let
        a search confirm a guessed key; KeyGrid's own tokens never match secret components.
        """
        kept = []
        for handle in handles:
            obj = token.objects[handle]
            identity = dict(obj.identity)
            cls, key_type = identity.get(CKA.CLASS), identity.get(CKA.KEY_TYPE)
            named = isinstance(cls, int) and any(
                is_sensitive_attribute(cls, key_type if isinstance(key_type, int) else None, a) for a in attrs
            )
            if named:
                try:
                    sensitive, extractable = yield token.forward(
                        "C_GetAttributeValue", module_session, obj.module_handle, [CKA.SENSITIVE, CKA.EXTRACTABLE]
                    )
                except PKCS11Error:
                    continue  # unknown: treat as secret
                if sensitive is not False or extractable is not True:
                    continue
            kept.append(handle)
        return kept

    def _find(self, app: Application, name: str, args: list[Any]) -> list[int]:
        session, _ = self._session(app, args[0])
        remote = session.remote
        assert isinstance(remote, RemoteSession)
        if remote.found is None:
            raise OperationNotInitialized("C_FindObjectsInit first")
        count = args[1]
        taken, remote.found = remote.found[:count], remote.found[count:]
        return taken

    def _find_final(self, app: Application, name: str, args: list[Any]) -> None:
        session, _ = self._session(app, args[0])
        remote = session.remote
        assert isinstance(remote, RemoteSession)
        if remote.found is None:
            raise OperationNotInitialized("no search is active")
        remote.found = None

    # --- slot and token -----------------------------------------------------------------------------

    def _ensure(self, token: RemoteToken) -> Work[int]:
        if not token.current():
            yield from token.connect()
        return token.require_slot()

    def _slot_info(self, app: Application, name: str, args: list[Any]) -> Work[dict[str, Any]]:
        token = self._token(app, args[0])
        info: dict[str, Any] = {
            "manufacturer_id": "",
            "flags": 0,
            "hardware_version": [0, 0],
            "firmware_version": [0, 0],
        }
        if token.answering:
            try:
                module_slot = yield from self._ensure(token)
                info = yield token.forward("C_GetSlotInfo", module_slot)
            except PKCS11Error:
                pass  # no token in the module now: the slot is shown without one
        return {**info, "slot_description": token.description}

    def _by_slot(self, app: Application, name: str, args: list[Any]) -> Work[Any]:
        token = self._token(app, args[0])
        module_slot = yield from self._ensure(token)
        return (yield token.forward(name, module_slot, *args[1:]))

    def _init_token(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        token = self._token(app, args[0])
        module_slot = yield from self._ensure(token)
        if any(s.slot_id == token.slot_id for a in self.state.apps.values() for s in a.sessions.values()):
            raise SessionExists("close every session of the token first")
        if token.service is not None:
            service, token.service = token.service, None
            try:
                yield token.forward("C_CloseSession", service)
            except PKCS11Error:
                pass
        token.generation = -1  # whatever happens, find the token again before the next call
        yield token.forward("C_InitToken", module_slot, args[1], args[2])
        if token.serial is None:
            token.label = args[2].decode("utf-8", "replace").rstrip(" ")
        token.held_pin = None
        token.pin_digest = None
        yield from token.connect()

    # --- sessions -----------------------------------------------------------------------------------

    def _open_session(self, app: Application, name: str, args: list[Any]) -> Work[int]:
        slot_id, flags = args
        token = self._token(app, slot_id)
        if not token.answering:
            raise TokenNotPresent(f"the module of slot {slot_id} does not answer")
        module_slot = yield from self._ensure(token)
        rw = bool(flags & SessionFlag.RW_SESSION)
        if not rw and app.login.get(slot_id) == CKU.SO:
            raise SessionReadWriteSoExists("the SO is logged in: only R/W sessions")
        module_handle = yield token.forward("C_OpenSession", module_slot, flags)
        session = Session(app.new_session_handle(), slot_id, app, rw)
        session.remote = RemoteSession(module_handle, token.generation, flags)
        app.sessions[session.handle] = session
        return session.handle

    def _close_session(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        session, token = self._session(app, args[0])
        remote = session.remote
        assert isinstance(remote, RemoteSession)
        app.sessions.pop(session.handle, None)
        try:
            if remote.generation == token.generation:
                yield token.forward("C_CloseSession", remote.module_handle)
        finally:
            yield from self._forget_session(session, token)

    def _close_all(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        token = self._token(app, args[0])
        for session in [s for s in app.sessions.values() if s.slot_id == token.slot_id]:
            yield from self._close_session(app, "C_CloseSession", [session.handle])

    def _forget_session(self, session: Session, token: RemoteToken) -> Work[None]:
        """The session is gone: its objects went with it; the last one of the application logs it out."""
        for handle in [h for h, o in token.objects.items() if o.session == session.handle and o.owner is session.app]:
            token.drop(handle)
        app = session.app
        if not any(s.slot_id == session.slot_id for s in app.sessions.values()):
            yield from self._logout(app, token)

    def _session_info(self, app: Application, name: str, args: list[Any]) -> dict[str, Any]:
        return session_info(self._session(app, args[0])[0])

    def dropped(self, app: Application) -> None:
        """The application went away: close its module sessions later (``background``)."""
        for session in [s for s in app.sessions.values() if isinstance(s.remote, RemoteSession)]:
            token = self.tokens[session.slot_id]
            remote = session.remote
            app.sessions.pop(session.handle, None)
            for handle in [h for h, o in token.objects.items() if o.owner is app]:
                token.drop(handle)
            if remote.generation == token.generation:
                self.background.append(token.forward("C_CloseSession", remote.module_handle))
        for slot_id in [s for s in app.login if s in self.tokens]:
            app.login.pop(slot_id, None)
            logout = self.module_logout_if_idle(self.tokens[slot_id])
            if logout is not None:
                self.background.append(logout)

    # --- login --------------------------------------------------------------------------------------

    def _login(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        handle, user_type, pin = args
        session, token = self._session(app, handle)
        slot_id = session.slot_id
        current = app.login.get(slot_id)
        module_session = yield from token.module_session(session)
        if user_type == CKU.CONTEXT_SPECIFIC:
            if current != CKU.USER:
                raise UserNotLoggedIn("log in as the user first")
            yield token.forward("C_Login", module_session, user_type, pin)
            return
        check_login_request(current, user_type)
        yield from self.check_pin_throttled(app, token, module_session, user_type, pin)
        if app.login.get(slot_id) is not None:  # another call of this application won the race
            raise UserAlreadyLoggedIn()
        app.login[slot_id] = user_type

    def check_pin_throttled(
        self, app: Application, token: RemoteToken, module_session: int, user_type: int, pin: bytes
    ) -> Work[None]:
        """``_check_pin`` after a delay that doubles with each wrong PIN this peer gave the slot."""
        key = (token.slot_id, app.peer.uid)
        failures = self.state.pin_failures.get(key, 0)
        if failures:
            yield Offload(_nothing, False, min(THROTTLE_FIRST * 2 ** (failures - 1), THROTTLE_MAX))
        try:
            yield from self._check_pin(token, module_session, user_type, pin)
        except PinIncorrect:
            self.state.pin_failures[key] = failures + 1
            raise
        self.state.pin_failures.pop(key, None)

    def _check_pin(self, token: RemoteToken, module_session: int, user_type: int, pin: bytes) -> Work[None]:
        """Log the module in with this PIN, or check it against the PIN the module is logged in with."""
        for wait in (*_LOGIN_WAITS, None):
            if token.module_login is not None:
                break
            try:
                yield token.forward("C_Login", module_session, user_type, pin)
            except UserAlreadyLoggedIn:
                # Still logged in although KeyGrid is not: the C_Logout of an application that left is on its
                # way (``background``), or another application's login is about to be recorded. Wait for either.
                if wait is None:
                    raise FunctionFailed("the token's module is still logged in: try again") from None
                yield Offload(_nothing, False, wait)
            else:
                token.logged_in(user_type, pin)
                return
        if token.module_login != user_type:
            raise UserAnotherAlreadyLoggedIn("the token's module is logged in as the other user type")
        if not token.pin_matches(pin):
            raise PinIncorrect()

    def _logout_call(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        session, token = self._session(app, args[0])
        if session.slot_id not in app.login:
            raise UserNotLoggedIn()
        yield from self._logout(app, token)

    def _logout(self, app: Application, token: RemoteToken) -> Work[None]:
        if app.login.pop(token.slot_id, None) is None:
            return
        # Private session objects of the application are destroyed (v2.40 Base 5.6).
        for handle, obj in list(token.objects.items()):
            if obj.owner is app and obj.private:
                token.drop(handle)
                session = app.sessions.get(obj.session or 0)
                if session is not None and isinstance(session.remote, RemoteSession):
                    try:
                        yield token.forward("C_DestroyObject", session.remote.module_handle, obj.module_handle)
                    except PKCS11Error:
                        pass
        for session in app.sessions.values():
            if isinstance(session.remote, RemoteSession) and session.slot_id == token.slot_id:
                session.remote.found = None
        logout = self.module_logout_if_idle(token)
        if logout is not None:
            try:
                yield logout
            except PKCS11Error:
                pass

    def module_logout_if_idle(self, token: RemoteToken) -> Forward | None:
        """Nobody is logged in to the slot any more: the module call that logs it out (None: nothing to do,
        or its PIN is configured and it stays logged in)."""
        if token.configured_pin is not None or token.module_login is None:
            return None
        if any(token.slot_id in other.login for other in self.state.apps.values()):
            return None
        token.logged_out()
        if token.service is None or token.generation != token.backend.generation:
            return None
        return token.forward("C_Logout", token.service)

    def _set_pin(self, app: Application, name: str, args: list[Any]) -> Work[None]:
        session, token, _args, _ = yield from self._call(app, "C_SetPIN", args)
        user = app.login.get(session.slot_id, CKU.USER)
        if token.module_login == user and token.configured_pin is None and token.pin_matches(args[1]):
            token.logged_in(user, args[2])


# Pauses before logging the module in again while it is still logged in for nobody (about 1.3 s in all).
_LOGIN_WAITS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.5)


def _lost(session: Session) -> None:
    """The module session may be stuck in a call that timed out, or gone with its worker: the session's next
    call gets a new one (operation state is lost, as after any device error)."""
    remote = session.remote
    assert isinstance(remote, RemoteSession)
    remote.generation = -1


def _nothing() -> None:
    return None
