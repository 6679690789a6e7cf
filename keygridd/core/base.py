"""Shared state and lookups of the core: slots, applications, handle checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from keygridd.core.model import Application, Obj, Peer, Session, Slot
from keygridd.core.offload import Offload, Work
from keygridd.core.remote import RemoteToken
from keygridd.mechanisms import LoadedKey, load_key
from keygridd.pkcs11 import CKU, SessionFlag
from keygridd.pkcs11.errors import (
    ObjectHandleInvalid,
    PinIncorrect,
    SessionHandleInvalid,
    SlotIdInvalid,
    TokenNotPresent,
    UserAlreadyLoggedIn,
    UserAnotherAlreadyLoggedIn,
    UserNotLoggedIn,
    UserTypeInvalid,
)


def check_login_request(current: int | None, user_type: int) -> None:
    """C_Login's checks of the user type against the application's login (v2.40 Base 5.6)."""
    if user_type not in (CKU.USER, CKU.SO):
        raise UserTypeInvalid(f"user type {user_type}")
    if current == user_type:
        raise UserAlreadyLoggedIn()
    if current is not None:
        raise UserAnotherAlreadyLoggedIn()


def session_info(session: Session) -> dict[str, Any]:
    """CK_SESSION_INFO of a session, from the application's own login."""
    flags = SessionFlag.SERIAL_SESSION | (SessionFlag.RW_SESSION if session.rw else 0)
    return {"slot_id": session.slot_id, "state": session.state(), "flags": int(flags), "device_error": 0}


_USER = CKU.USER  # read on every call of a session: a module global is read faster than an enum member
THROTTLE_FIRST = 0.1  # seconds before the PIN check that follows one wrong PIN; doubles each time
THROTTLE_MAX = 5.0


class CoreState:
    """Slots and applications, plus the checks every function starts with."""

    def __init__(self, slots: Iterable[Slot], remote: Iterable[RemoteToken] = ()) -> None:
        self.slots: dict[int, Slot] = {slot.slot_id: slot for slot in slots}
        self.remote: dict[int, RemoteToken] = {token.slot_id: token for token in remote}
        self.apps: dict[bytes, Application] = {}
        self.pin_failures: dict[tuple[int, int], int] = {}  # (slot, peer uid) -> wrong PINs in a row
        from keygridd.core.passthrough import Passthrough

        self.passthrough = Passthrough(self, self.remote)
        for slot in self.slots.values():
            slot.load_objects()

    # --- applications --------------------------------------------------------------------------

    def open_application(self, app_id: bytes, peer: Peer) -> Application:
        app = Application(app_id, peer)
        self.apps[app_id] = app
        return app

    def close_application(self, app: Application) -> None:
        """The application went away: its sessions, session objects and logins go with it."""
        self.passthrough.dropped(app)
        for session in list(app.sessions.values()):
            self._drop_session(session)
        app.login.clear()
        self.apps.pop(app.app_id, None)

    # --- lookups -------------------------------------------------------------------------------

    def slot(self, app: Application, slot_id: int) -> Slot:
        slot = self.slots.get(slot_id)
        if slot is None or not slot.allows(app.peer):
            raise SlotIdInvalid(f"no slot {slot_id}")
        return slot

    def token_slot(self, app: Application, slot_id: int) -> Slot:
        slot = self.slot(app, slot_id)
        if not slot.ready:
            raise TokenNotPresent(f"the token of slot {slot_id} is not available")
        return slot

    def session(self, app: Application, handle: int) -> Session:
        session = app.sessions.get(handle)
        if session is None:
            raise SessionHandleInvalid(f"no session {handle}")
        return session

    def logged_in_user(self, session: Session) -> bool:
        return session.app.login.get(session.slot_id) == _USER

    def visible(self, session: Session, obj: Obj) -> bool:
        if obj.destroyed or obj.slot_id != session.slot_id:
            return False
        if obj.owner is not None and obj.owner.app is not session.app:
            return False
        return not obj.private or self.logged_in_user(session)

    def object(self, session: Session, handle: int, error: type[Exception] = ObjectHandleInvalid) -> Obj:
        obj = session.app.object(handle)
        if obj is None or not self.visible(session, obj):
            raise error(f"no object {handle}")
        return obj

    def key(self, session: Session, obj: Obj) -> LoadedKey:
        return obj.loaded(load_key)

    def objects_of(self, session: Session, template: Iterable[tuple[int, Any]] = ()) -> Iterable[Obj]:
        """The token and session objects of the session's slot that may match ``template``."""
        slot = self.slots[session.slot_id]
        yield from slot.candidates(template)
        yield from (o for o in session.app.session_objects.values() if o.slot_id == session.slot_id)

    def require_user(self, session: Session) -> None:
        if not self.logged_in_user(session):
            raise UserNotLoggedIn("log in as the user first")

    # --- session teardown ------------------------------------------------------------------------

    def _drop_session(self, session: Session) -> None:
        app = session.app
        app.sessions.pop(session.handle, None)
        session.ops.clear()
        for oid, obj in list(app.session_objects.items()):
            if obj.owner is session:
                obj.destroyed = True
                app.forget(obj)
                del app.session_objects[oid]
        if not any(s.slot_id == session.slot_id for s in app.sessions.values()):
            # Last session of the application on this token: it is logged out (v2.40 Base 5.6).
            self._logout(app, session.slot_id)

    def check_pin_throttled(self, app: Application, slot_id: int, user_type: int, pin: bytes) -> Work[None]:
        """Check a PIN after a delay that doubles with each wrong PIN this peer gave the token."""
        key = (slot_id, app.peer.uid)
        failures = self.pin_failures.get(key, 0)
        store = self.slots[slot_id].store
        delay = min(THROTTLE_FIRST * 2 ** (failures - 1), THROTTLE_MAX) if failures else 0.0
        try:
            yield Offload(lambda: store.check_pin(user_type, pin), True, delay)
        except PinIncorrect:
            self.pin_failures[key] = failures + 1
            raise
        self.pin_failures.pop(key, None)

    def relock_if_idle(self, slot_id: int) -> None:
        """Lock the token again when no application is logged in to it (after a one-call login)."""
        if not any(slot_id in app.login for app in self.apps.values()):
            slot = self.slots[slot_id]
            slot.store.lock()
            slot.refresh()

    def after_login(self, slot_id: int) -> None:
        """A PIN was right: take the objects the store can read now (private ones, once unlocked)."""
        self.slots[slot_id].refresh()

    def _logout(self, app: Application, slot_id: int) -> None:
        if app.login.pop(slot_id, None) is None:
            return
        if not any(slot_id in other.login for other in self.apps.values()):
            # Nobody is logged in to the token any more: the store forgets what the login unlocked.
            slot = self.slots[slot_id]
            slot.store.lock()
            slot.refresh()
        # Handles to private objects become invalid; private session objects are destroyed (Base 5.6).
        app.forget_where(lambda o: o.slot_id == slot_id and o.private)
        for oid, obj in list(app.session_objects.items()):
            if obj.slot_id == slot_id and obj.private:
                obj.destroyed = True
                del app.session_objects[oid]
        for session in app.sessions.values():
            if session.slot_id == slot_id:
                session.ops.clear()
