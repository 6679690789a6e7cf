"""Passthrough tokens: slots whose token lives in another PKCS#11 module.

A passthrough slot (provider ``pkcs11``) forwards objects, attributes,
mechanisms and operations to the module that holds the token, so what the
module does, and every CKR code it returns, comes back unchanged. KeyGrid keeps
what one shared module login cannot give each client (v2.40 Base 2.5, 5.6):

* Sessions: each KeyGrid session has a session of its own in the module, opened
  with the same flags. Session info is KeyGrid's (state from the
  application's own login).
* Login: the module is logged in once, for everybody. An application is logged
  in to the KeyGrid slot only after it gave the right PIN itself: the first
  login goes to the module; later ones are checked against a keyed digest of
  the PIN that logged the module in (throttled per peer like any token). With
  a configured PIN (an unattended token) the module is logged in from start and
  every client PIN is checked against that one.
* Visibility: an application that is not logged in never reaches a private
  object, even while the module is logged in for another application; session
  objects are seen only by the application that made them. Object handles are
  KeyGrid's, mapped to the module's, and a handle is never reused.
* Restarts: the module runs in a worker process that may crash and restart.
  Sessions are reopened in the new worker on their next call (operations in
  flight are lost, as after a device error), the module login is restored, and
  token object handles are found again by their identifying attributes.

Every function here is a generator yielding ``Forward`` requests (a call to the
module); nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keygridd.core.model import Application, Peer, Session
from keygridd.core.offload import Backend, Forward, Work
from keygridd.pkcs11 import CKA, CKU, SessionFlag
from keygridd.pkcs11.errors import PKCS11Error, TokenNotPresent, UserAlreadyLoggedIn

# Attributes the worker reads for every object it hands over (the order of its ``meta`` lists).
META_TYPES = (CKA.TOKEN, CKA.PRIVATE, CKA.CLASS, CKA.ID, CKA.LABEL, CKA.KEY_TYPE)
_IDENTITY = META_TYPES[2:]
_SERVICE_FLAGS = int(SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION)


@dataclass(slots=True)
class RemoteObject:
    """A module object handed to applications under a KeyGrid handle."""

    module_handle: int
    generation: int
    token: bool
    private: bool
    identity: tuple[tuple[int, Any], ...]  # what finds a token object again after a worker restart
    owner: Application | None = None  # the application that made a session object
    session: int | None = None  # and the KeyGrid session it belongs to


@dataclass(slots=True)
class RemoteSession:
    """The module's side of one KeyGrid session."""

    module_handle: int
    generation: int
    flags: int
    found: list[int] | None = None  # an active C_FindObjects: the KeyGrid handles still to return


@dataclass
class RemoteToken:
    """A passthrough slot: where its token is in the module, and KeyGrid's state above it."""

    slot_id: int
    description: str
    provider: str
    allows: Callable[[Peer], bool]
    backend: Backend
    label: str | None
    serial: str | None
    configured_pin: bytes | None = None
    module_slot: int | None = None  # None: the token is not present (or the worker not reached yet)
    generation: int = -1  # the worker generation the fields below belong to
    service: int | None = None  # the module session that keeps the login and serves KeyGrid's own lookups
    module_login: int | None = None  # CKU the module is logged in as
    held_user: int = CKU.USER
    held_pin: bytes | None = None  # the PIN of that login, to restore it after a worker restart
    answering: bool = True  # False while health checks get no answer from the module
    objects: dict[int, RemoteObject] = field(default_factory=dict)
    by_module: dict[tuple[int, int], int] = field(default_factory=dict)
    next_handle: int = 1
    digest_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    pin_digest: bytes | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the token's CK_TOKEN_INFO when last found

    @property
    def ready(self) -> bool:
        return self.module_slot is not None and self.answering

    def forward(self, method: str, *args: Any) -> Forward:
        return Forward(self.backend, method, list(args))

    # --- the module's state ---------------------------------------------------------------------------

    def connect(self) -> Work[None]:
        """Find the token in the (possibly restarted) module, open the service session, log in again."""
        generation = self.backend.generation
        slot = yield self.forward("KG_FindToken", self.label, self.serial)
        self.generation = generation
        self.service = None
        self.module_login = None
        self.module_slot = slot
        if slot is None:
            return
        self.info = yield self.forward("C_GetTokenInfo", slot)
        try:
            self.service = yield self.forward("C_OpenSession", slot, _SERVICE_FLAGS)
        except PKCS11Error:
            return  # a token that is not initialised: present, but nothing to log in to
        pin = self.configured_pin if self.configured_pin is not None else self.held_pin
        if pin is None:
            return
        user = CKU.USER if self.configured_pin is not None else self.held_user
        try:
            yield self.forward("C_Login", self.service, user, pin)
        except UserAlreadyLoggedIn:
            pass
        except PKCS11Error:
            self.held_pin = None
            self.pin_digest = None
            return
        self.logged_in(user, pin)

    def logged_in(self, user: int, pin: bytes) -> None:
        self.module_login = user
        self.held_user = user
        self.held_pin = pin
        self.pin_digest = self._digest(pin)

    def logged_out(self) -> None:
        """The module logs out: its handles to private objects end (they get new ones at the next login)."""
        self.module_login = None
        self.held_pin = None
        self.pin_digest = None
        for handle in [h for h, o in self.objects.items() if o.private]:
            self.drop(handle)

    def _digest(self, pin: bytes) -> bytes:
        return hmac.new(self.digest_key, pin, hashlib.sha256).digest()

    def pin_matches(self, pin: bytes) -> bool:
        return self.pin_digest is not None and hmac.compare_digest(self.pin_digest, self._digest(pin))

    def current(self) -> bool:
        return self.generation == self.backend.generation and self.module_slot is not None

    def require_slot(self) -> int:
        if self.module_slot is None:
            raise TokenNotPresent(f"the token of slot {self.slot_id} is not available in its module")
        return self.module_slot

    # --- object handles -----------------------------------------------------------------------------

    def adopt(self, module_handle: int, meta: Sequence[Any] | None, session: Session | None) -> int:
        """The KeyGrid handle of a module object (registered on first sight)."""
        key = (self.generation, module_handle)
        handle = self.by_module.get(key)
        if handle is not None and handle in self.objects:
            return handle
        values = dict(zip(META_TYPES, meta or (), strict=False))
        token = bool(values.get(CKA.TOKEN))
        obj = RemoteObject(
            module_handle,
            self.generation,
            token,
            bool(values.get(CKA.PRIVATE)),
            tuple((attr, values[attr]) for attr in _IDENTITY if values.get(attr) is not None),
        )
        if not token and session is not None:
            obj.owner, obj.session = session.app, session.handle
        handle = self.next_handle
        self.next_handle += 1
        self.objects[handle] = obj
        self.by_module[key] = handle
        return handle

    def drop(self, handle: int) -> None:
        obj = self.objects.pop(handle, None)
        if obj is not None:
            self.by_module.pop((obj.generation, obj.module_handle), None)

    def visible(self, app: Application, obj: RemoteObject) -> bool:
        if not obj.token and obj.owner is not app:
            return False
        return not obj.private or app.login.get(self.slot_id) == CKU.USER

    def module_object(self, app: Application, handle: int, error: type[PKCS11Error]) -> Work[int]:
        """The module's handle for a KeyGrid object handle the application may use."""
        obj = self.objects.get(handle)
        if obj is None or not self.visible(app, obj):
            raise error(f"no object {handle}")
        if obj.generation != self.generation:
            yield from self._find_again(handle, obj, error)
        return obj.module_handle

    def _find_again(self, handle: int, obj: RemoteObject, error: type[PKCS11Error]) -> Work[None]:
        """After a worker restart: the token object with the same identifying attributes, if exactly one."""
        if not obj.token or not obj.identity or self.service is None:
            self.drop(handle)
            raise error(f"object {handle} was lost when the module's worker restarted")
        found = yield self.forward("KG_FindAll", self.service, list(obj.identity))
        matches = [module for module, meta in found if meta is not None and bool(meta[0])]
        if len(matches) != 1:
            self.drop(handle)
            raise error(f"object {handle} cannot be found again after the module's worker restarted")
        self.by_module.pop((obj.generation, obj.module_handle), None)
        obj.module_handle, obj.generation = matches[0], self.generation
        self.by_module[(obj.generation, obj.module_handle)] = handle

    # --- sessions -----------------------------------------------------------------------------------

    def module_session(self, session: Session) -> Work[int]:
        """The module session of a KeyGrid session, reopened if the worker restarted since."""
        remote = session.remote
        assert isinstance(remote, RemoteSession)
        if remote.generation != self.generation or not self.current():
            if not self.current():
                yield from self.connect()
            slot = self.require_slot()
            remote.module_handle = yield self.forward("C_OpenSession", slot, remote.flags)
            remote.generation = self.generation
        return remote.module_handle


def is_remote(session: Session) -> bool:
    return isinstance(session.remote, RemoteSession)


__all__ = ["META_TYPES", "Backend", "Forward", "RemoteObject", "RemoteSession", "RemoteToken", "is_remote"]
