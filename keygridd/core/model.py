"""The state the core keeps: slots, applications, sessions, objects, operations.

* A ``Slot`` is configured once and holds its token's store and in-memory
  token objects (shared by every application allowed to see the slot).
* An ``Application`` is one client (PKCS#11 v2.40 Base 2.5: each application
  has its own sessions, object handles and login state). Object handles are
  per application: a handle never given to an application does not exist for it.
* A ``Session`` holds at most one active operation of each kind.
"""

from __future__ import annotations

import gc
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keygridd.core.store import Attributes, TokenStore
from keygridd.mechanisms import LoadedKey, MechanismInfo
from keygridd.pkcs11 import CKA, CKK, CKO, CKS, CKU

_PRIVATE = int(CKA.PRIVATE)  # read on every object use: a module global is read faster than an enum member


@dataclass(frozen=True, slots=True)
class Peer:
    """Credentials of the process at the other end of a connection (SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = frozenset()


class Obj:
    """An object: its attributes and, for keys, the parsed key (cached)."""

    __slots__ = ("_loaded", "attrs", "destroyed", "oid", "owner", "slot_id")

    def __init__(self, oid: bytes, attrs: Attributes, slot_id: int, owner: Session | None) -> None:
        self.oid = oid
        self.attrs = attrs
        self.slot_id = slot_id
        self.owner = owner  # the session that created a session object; None for token objects
        self.destroyed = False
        self._loaded: LoadedKey | None = None

    @property
    def is_token(self) -> bool:
        return self.owner is None

    @property
    def cls(self) -> int:
        value = self.attrs.get(CKA.CLASS, CKO.DATA)
        return int(value) if isinstance(value, int) else CKO.DATA

    @property
    def key_type(self) -> int | None:
        value = self.attrs.get(CKA.KEY_TYPE)
        return int(value) if isinstance(value, int) else None

    @property
    def private(self) -> bool:
        return bool(self.attrs.get(_PRIVATE, False))

    def flag(self, attr: int) -> bool:
        return self.attrs.get(attr) is True

    def loaded(self, load: Callable[[Attributes], LoadedKey]) -> LoadedKey:
        if self._loaded is None:
            self._loaded = load(self.attrs)
        return self._loaded

    def replace(self, attrs: Attributes) -> None:
        self.attrs = attrs
        self._loaded = None


def new_oid() -> bytes:
    return secrets.token_bytes(16)


class OpKind(StrEnum):  # str's hash: ops dicts are looked up on every call
    FIND = "find"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    DIGEST = "digest"
    SIGN = "sign"
    VERIFY = "verify"


@dataclass(slots=True)
class Operation:
    kind: OpKind
    context: Any  # the mechanism's context, or the list of handles for FIND
    mechanism: int
    key: Obj | None = None
    thread: bool = False
    multipart: bool = False
    needs_context_login: bool = False  # CKA_ALWAYS_AUTHENTICATE: C_Login(CKU_CONTEXT_SPECIFIC) first
    pending: tuple[str, bytes, bytes] | None = None  # (step, input, output) kept for a retried short buffer


@dataclass(slots=True)
class Session:
    handle: int
    slot_id: int
    app: Application
    rw: bool
    ops: dict[OpKind, Operation] = field(default_factory=dict)
    remote: Any = None  # a passthrough slot's session: its module session (core/remote.py)

    def state(self) -> int:
        login = self.app.login.get(self.slot_id)
        if login == CKU.SO:
            return CKS.RW_SO_FUNCTIONS
        if login == CKU.USER:
            return CKS.RW_USER_FUNCTIONS if self.rw else CKS.RO_USER_FUNCTIONS
        return CKS.RW_PUBLIC_SESSION if self.rw else CKS.RO_PUBLIC_SESSION


class Application:
    """One PKCS#11 application: a client connection, or several joined by app id."""

    def __init__(self, app_id: bytes, peer: Peer) -> None:
        self.app_id = app_id
        self.peer = peer
        self.sessions: dict[int, Session] = {}
        self.login: dict[int, int] = {}  # slot id -> CKU of the logged-in user
        self.session_objects: dict[bytes, Obj] = {}
        self._handles: dict[int, Obj] = {}
        self._handle_of: dict[int, int] = {}  # id(obj) -> handle
        self._next_handle = 1
        self._next_session = 1

    def new_session_handle(self) -> int:
        handle = self._next_session
        self._next_session += 1
        return handle

    def handle_for(self, obj: Obj) -> int:
        handle = self._handle_of.get(id(obj))
        if handle is None:
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = obj
            self._handle_of[id(obj)] = handle
        return handle

    def object(self, handle: int) -> Obj | None:
        obj = self._handles.get(handle)
        if obj is not None and obj.destroyed:
            self.forget(obj)
            return None
        return obj

    def forget(self, obj: Obj) -> None:
        handle = self._handle_of.pop(id(obj), None)
        if handle is not None:
            del self._handles[handle]

    def forget_where(self, predicate: Callable[[Obj], bool]) -> None:
        for obj in [o for o in self._handles.values() if predicate(o)]:
            self.forget(obj)


# Attributes C_FindObjects looks up by index instead of scanning (the ones applications search by).
INDEXED = (CKA.CLASS, CKA.LABEL, CKA.ID, CKA.KEY_TYPE)
IndexKey = tuple[int, Any]


@dataclass
class Slot:
    """A configured slot and its token: the token objects that can be read now, indexed."""

    slot_id: int
    description: str
    provider: str
    store: TokenStore
    mechanisms: dict[int, MechanismInfo]
    allows: Callable[[Peer], bool]
    objects: dict[bytes, Obj] = field(default_factory=dict)
    ready: bool = True
    index: dict[IndexKey, set[bytes]] = field(default_factory=dict)
    loaded_unlocked: bool = False  # was the store unlocked when the objects were last loaded?

    def refresh(self) -> None:
        """Reload after a login or a lock, only if that changed what the store can read (O(objects))."""
        if self.store.unlocked != self.loaded_unlocked:
            self.load_objects()

    def load_objects(self) -> None:
        """Take the store's readable objects: new ones are added, changed ones replaced, gone ones dropped."""
        self.loaded_unlocked = self.store.unlocked
        readable = self.store.objects()
        before = len(self.objects)
        for oid in [oid for oid in self.objects if oid not in readable]:
            self.remove(self.objects[oid])
        for oid, attrs in readable.items():
            current = self.objects.get(oid)
            if current is None:
                self.add(Obj(oid, dict(attrs), self.slot_id, None))
            elif current.attrs != attrs:
                self.update(current, dict(attrs))
        if len(self.objects) - before > 1000:
            # Long-lived objects: keep the collector from walking them again on every full collection,
            # which would make every call slower as the token grows.
            gc.freeze()

    def apply(self, oid: bytes, attrs: dict[int, Any] | None) -> None:
        """Another writer changed this object (a shared store): take its state as re-read (None: gone)."""
        current = self.objects.get(oid)
        if attrs is None:
            if current is not None:
                self.remove(current)
        elif current is None:
            self.add(Obj(oid, dict(attrs), self.slot_id, None))
        elif current.attrs != attrs:
            self.update(current, dict(attrs))

    def add(self, obj: Obj) -> None:
        self.objects[obj.oid] = obj
        for attr in INDEXED:
            if attr in obj.attrs:
                self.index.setdefault((attr, obj.attrs[attr]), set()).add(obj.oid)

    def remove(self, obj: Obj) -> None:
        self.objects.pop(obj.oid, None)
        obj.destroyed = True
        self._unindex(obj)

    def update(self, obj: Obj, attrs: dict[int, Any]) -> None:
        self._unindex(obj)
        obj.replace(attrs)
        for attr in INDEXED:
            if attr in attrs:
                self.index.setdefault((attr, attrs[attr]), set()).add(obj.oid)

    def clear(self) -> None:
        for obj in self.objects.values():
            obj.destroyed = True
        self.objects.clear()
        self.index.clear()

    def _unindex(self, obj: Obj) -> None:
        for attr in INDEXED:
            if attr in obj.attrs:
                key = (attr, obj.attrs[attr])
                oids = self.index.get(key)
                if oids is not None:
                    oids.discard(obj.oid)
                    if not oids:
                        del self.index[key]

    def candidates(self, template: Iterable[tuple[int, Any]]) -> Iterable[Obj]:
        """The objects that may match ``template``: an index lookup when it names an indexed attribute."""
        best: set[bytes] | None = None
        for attr, value in template:
            if attr in INDEXED:
                try:
                    oids = self.index.get((attr, value), set())
                except TypeError:  # an unhashable value cannot be in the index
                    return []
                if best is None or len(oids) < len(best):
                    best = oids
        if best is None:
            return list(self.objects.values())
        return [self.objects[oid] for oid in best if oid in self.objects]


SESSION_KEY_TYPES = {CKK.EC, CKK.RSA}
