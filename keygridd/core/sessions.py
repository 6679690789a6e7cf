"""General, slot, token, session and login functions (PKCS#11 v2.40 Base 5.4-5.6).

Store calls that verify PINs (a deliberately slow KDF) or touch disk are
yielded as ``Offload`` work so the caller can run them off its event loop.
"""

from __future__ import annotations

import os
import time
from typing import Any

import keygridd
from keygridd.core.base import CoreState, check_login_request, session_info
from keygridd.core.model import Application, Session, Slot
from keygridd.core.offload import Offload, Work
from keygridd.core.remote import RemoteToken
from keygridd.pkcs11 import CKU, SessionFlag, SlotFlag, TokenFlag
from keygridd.pkcs11._constants import CKF_DONT_BLOCK
from keygridd.pkcs11.errors import (
    ArgumentsBad,
    FunctionNotParallel,
    FunctionNotSupported,
    MechanismInvalid,
    NoEvent,
    OperationNotInitialized,
    PinLenRange,
    SessionExists,
    SessionParallelNotSupported,
    SessionReadOnly,
    SessionReadOnlyExists,
    SessionReadWriteSoExists,
    TokenNotRecognized,
    UserAlreadyLoggedIn,
    UserNotLoggedIn,
    UserPinNotInitialized,
)

CRYPTOKI_VERSION = (2, 40)
UNAVAILABLE = 0xFFFFFFFFFFFFFFFF  # CK_UNAVAILABLE_INFORMATION
EFFECTIVELY_INFINITE = 0


def _version() -> tuple[int, int]:
    major, minor, *_ = (int(p) for p in keygridd.__version__.split(".") if p.isdigit())
    return major, minor


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip(" ")


class SessionFunctions(CoreState):
    started = time.monotonic()

    # --- general ---------------------------------------------------------------------------------

    def C_GetInfo(self, app: Application) -> dict[str, Any]:
        return {
            "cryptoki_version": list(CRYPTOKI_VERSION),
            "manufacturer_id": "KeyGrid",
            "flags": 0,
            "library_description": "KeyGrid keygridd",
            "library_version": list(_version()),
        }

    def C_GetSlotList(self, app: Application, token_present: bool) -> list[int]:
        slots: list[Slot | RemoteToken] = [*self.slots.values(), *self.remote.values()]
        return sorted(s.slot_id for s in slots if s.allows(app.peer) and (s.ready or not token_present))

    def C_GetSlotInfo(self, app: Application, slot_id: int) -> dict[str, Any]:
        slot = self.slot(app, slot_id)
        desc = slot.store.description
        return {
            "slot_description": slot.description,
            "manufacturer_id": desc.manufacturer,
            "flags": int(SlotFlag.TOKEN_PRESENT) if slot.ready else 0,
            "hardware_version": list(desc.hardware_version),
            "firmware_version": list(desc.firmware_version),
        }

    def C_GetTokenInfo(self, app: Application, slot_id: int) -> dict[str, Any]:
        slot = self.token_slot(app, slot_id)
        store = slot.store
        flags = TokenFlag.RNG | TokenFlag.LOGIN_REQUIRED | TokenFlag.CLOCK_ON_TOKEN
        if store.initialized:
            flags |= TokenFlag.TOKEN_INITIALIZED
        if store.user_pin_initialized:
            flags |= TokenFlag.USER_PIN_INITIALIZED
        flags |= store.pin_flags()
        sessions = [s for a in self.apps.values() for s in a.sessions.values() if s.slot_id == slot_id]
        desc = store.description
        return {
            "label": _text(store.label),
            "manufacturer_id": desc.manufacturer,
            "model": desc.model,
            "serial_number": desc.serial,
            "flags": int(flags),
            "max_session_count": EFFECTIVELY_INFINITE,
            "session_count": len(sessions),
            "max_rw_session_count": EFFECTIVELY_INFINITE,
            "rw_session_count": sum(1 for s in sessions if s.rw),
            "max_pin_len": desc.max_pin_len,
            "min_pin_len": desc.min_pin_len,
            "total_public_memory": UNAVAILABLE,
            "free_public_memory": UNAVAILABLE,
            "total_private_memory": UNAVAILABLE,
            "free_private_memory": UNAVAILABLE,
            "hardware_version": list(desc.hardware_version),
            "firmware_version": list(desc.firmware_version),
            "utc_time": time.strftime("%Y%m%d%H%M%S00", time.gmtime()),
        }

    def C_WaitForSlotEvent(self, app: Application, flags: int) -> int:
        if flags & CKF_DONT_BLOCK:
            raise NoEvent()
        raise FunctionNotSupported("blocking slot events are not served")

    def C_GetMechanismList(self, app: Application, slot_id: int) -> list[int]:
        return sorted(self.token_slot(app, slot_id).mechanisms)

    def C_GetMechanismInfo(self, app: Application, slot_id: int, mechanism: int) -> dict[str, Any]:
        info = self.token_slot(app, slot_id).mechanisms.get(mechanism)
        if info is None:
            raise MechanismInvalid(f"mechanism {mechanism:#x} is not offered by slot {slot_id}")
        return {"min_key_size": info.min_key_size, "max_key_size": info.max_key_size, "flags": info.flags}

    # --- token -----------------------------------------------------------------------------------

    def _check_pin_length(self, slot_id: int, pin: bytes) -> None:
        desc = self.slots[slot_id].store.description
        if not desc.min_pin_len <= len(pin) <= desc.max_pin_len:
            raise PinLenRange(f"PINs are {desc.min_pin_len} to {desc.max_pin_len} bytes")

    def C_InitToken(self, app: Application, slot_id: int, so_pin: bytes, label: bytes) -> Work[None]:
        slot = self.token_slot(app, slot_id)
        if len(label) > 32:
            raise ArgumentsBad("the label is at most 32 bytes")
        if any(s.slot_id == slot_id for a in self.apps.values() for s in a.sessions.values()):
            raise SessionExists("close every session of the token first")
        self._check_pin_length(slot_id, so_pin)
        yield Offload(lambda: slot.store.init_token(so_pin, label.ljust(32, b" ")), True)
        slot.clear()
        slot.store.lock()  # the new master key is not kept: nobody is logged in (no session exists)
        slot.load_objects()

    def C_InitPIN(self, app: Application, handle: int, pin: bytes) -> Work[None]:
        session = self.session(app, handle)
        if app.login.get(session.slot_id) != CKU.SO:
            raise UserNotLoggedIn("C_InitPIN needs the SO logged in")
        if not session.rw:
            raise SessionReadOnly()
        self._check_pin_length(session.slot_id, pin)
        store = self.slots[session.slot_id].store
        yield Offload(lambda: store.init_pin(pin), True)

    def C_SetPIN(self, app: Application, handle: int, old_pin: bytes, new_pin: bytes) -> Work[None]:
        session = self.session(app, handle)
        if not session.rw:
            raise SessionReadOnly()
        user = app.login.get(session.slot_id, CKU.USER)
        self._check_pin_length(session.slot_id, new_pin)
        store = self.slots[session.slot_id].store
        yield Offload(lambda: store.set_pin(user, old_pin, new_pin), True)

    # --- sessions --------------------------------------------------------------------------------

    def C_OpenSession(self, app: Application, slot_id: int, flags: int) -> int:
        slot = self.token_slot(app, slot_id)
        if not flags & SessionFlag.SERIAL_SESSION:
            raise SessionParallelNotSupported("CKF_SERIAL_SESSION must be set")
        if not slot.store.initialized:
            raise TokenNotRecognized("the token is not initialised (C_InitToken)")
        rw = bool(flags & SessionFlag.RW_SESSION)
        if not rw and app.login.get(slot_id) == CKU.SO:
            raise SessionReadWriteSoExists("the SO is logged in: only R/W sessions")
        session = Session(app.new_session_handle(), slot_id, app, rw)
        app.sessions[session.handle] = session
        return session.handle

    def C_CloseSession(self, app: Application, handle: int) -> None:
        self._drop_session(self.session(app, handle))

    def C_CloseAllSessions(self, app: Application, slot_id: int) -> None:
        self.slot(app, slot_id)
        for session in [s for s in app.sessions.values() if s.slot_id == slot_id]:
            self._drop_session(session)

    def C_GetSessionInfo(self, app: Application, handle: int) -> dict[str, Any]:
        return session_info(self.session(app, handle))

    def C_GetOperationState(self, app: Application, handle: int) -> bytes:
        self.session(app, handle)
        raise FunctionNotSupported("operation state cannot be saved")

    def C_SetOperationState(self, app: Application, handle: int, state: bytes, enc: int, auth: int) -> None:
        self.session(app, handle)
        raise FunctionNotSupported("operation state cannot be restored")

    def C_Login(self, app: Application, handle: int, user_type: int, pin: bytes) -> Work[None]:
        session = self.session(app, handle)
        slot_id = session.slot_id
        store = self.slots[slot_id].store
        current = app.login.get(slot_id)
        if user_type == CKU.CONTEXT_SPECIFIC:
            ops = [op for op in session.ops.values() if op.needs_context_login]
            if not ops:
                raise OperationNotInitialized("no operation waits for context-specific login")
            if current != CKU.USER:
                raise UserNotLoggedIn()
            yield from self.check_pin_throttled(app, slot_id, CKU.USER, pin)
            for op in ops:
                op.needs_context_login = False
            return
        check_login_request(current, user_type)
        if user_type == CKU.SO and any(not s.rw for s in app.sessions.values() if s.slot_id == slot_id):
            raise SessionReadOnlyExists("close the read-only sessions before the SO logs in")
        if user_type == CKU.USER and not store.user_pin_initialized:
            raise UserPinNotInitialized()
        yield from self.check_pin_throttled(app, slot_id, user_type, pin)
        if app.login.get(slot_id) is not None:  # another call of this application won the race
            raise UserAlreadyLoggedIn()
        app.login[slot_id] = user_type
        self.after_login(slot_id)

    def C_Logout(self, app: Application, handle: int) -> None:
        session = self.session(app, handle)
        if session.slot_id not in app.login:
            raise UserNotLoggedIn()
        self._logout(app, session.slot_id)

    # --- random and legacy -------------------------------------------------------------------------

    def C_SeedRandom(self, app: Application, handle: int, seed: bytes) -> None:
        self.session(app, handle)

    def C_GenerateRandom(self, app: Application, handle: int, length: int) -> bytes:
        self.session(app, handle)
        if length > 1 << 20:
            raise ArgumentsBad("at most 1 MiB of random bytes per call")
        return os.urandom(length)

    def C_GetFunctionStatus(self, app: Application, handle: int) -> None:
        self.session(app, handle)
        raise FunctionNotParallel()

    def C_CancelFunction(self, app: Application, handle: int) -> None:
        self.session(app, handle)
        raise FunctionNotParallel()
