"""Object management and search (PKCS#11 v2.40 Base 5.7-5.8).

Visibility (Base 4.4, 6.7): private objects only while the application is
logged in as the user; session objects only to their application; token
objects changed only in R/W sessions. C_GetAttributeValue follows Base 5.7
exactly: every attribute it can, CK_UNAVAILABLE_INFORMATION (nil) for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from keygridd.core import objects
from keygridd.core.base import CoreState
from keygridd.core.model import Application, Obj, Operation, OpKind, Session, new_oid
from keygridd.core.objects import Origin, Template
from keygridd.core.offload import Offload, Work
from keygridd.core.store import Attributes
from keygridd.mechanisms import validate_import
from keygridd.pkcs11 import CKA, CKO, CKU
from keygridd.pkcs11.attributes import AttrValue
from keygridd.pkcs11.errors import (
    ActionProhibited,
    AttributeSensitive,
    AttributeTypeInvalid,
    OperationActive,
    OperationNotInitialized,
    SessionReadOnly,
    UserNotLoggedIn,
)

KEY_CLASSES = (CKO.PUBLIC_KEY, CKO.PRIVATE_KEY, CKO.SECRET_KEY)


_FIND = OpKind.FIND  # read on every search call: a module global is read faster than an enum member


class ObjectFunctions(CoreState):
    def _check_writable(self, session: Session, attrs: Attributes) -> None:
        """May this session hold an object with these attributes (token/private)?"""
        if attrs.get(CKA.TOKEN) is True and not session.rw:
            raise SessionReadOnly("token objects need a R/W session")
        if attrs.get(CKA.PRIVATE) is True and not self.logged_in_user(session):
            raise UserNotLoggedIn("private objects need the user logged in")

    def store_object(self, session: Session, attrs: Attributes) -> Work[int]:
        """Add a new object and return its handle (token objects go to the store)."""
        self._check_writable(session, attrs)
        attrs.setdefault(CKA.UNIQUE_ID, b"")
        oid = new_oid()
        attrs[CKA.UNIQUE_ID] = oid.hex().encode()
        slot = self.slots[session.slot_id]
        if attrs.get(CKA.TOKEN) is True:
            obj = Obj(oid, attrs, slot.slot_id, None)
            yield Offload(lambda: slot.store.put_object(oid, attrs), slot.store.blocking)
            slot.add(obj)
        else:
            obj = Obj(oid, attrs, slot.slot_id, session)
            session.app.session_objects[oid] = obj
        return session.app.handle_for(obj)

    def _is_so(self, session: Session) -> bool:
        return session.app.login.get(session.slot_id) == CKU.SO

    def C_CreateObject(self, app: Application, handle: int, template: Template) -> Work[int]:
        session = self.session(app, handle)
        attrs = objects.build(template, Origin.CREATE, is_so=self._is_so(session))
        if attrs[CKA.CLASS] in KEY_CLASSES:
            attrs = cast(Attributes, validate_import(attrs))
            objects.set_key_origin(attrs, local=False, mechanism=None)
        return (yield from self.store_object(session, attrs))

    def C_CopyObject(self, app: Application, handle: int, obj_handle: int, template: Template) -> Work[int]:
        session = self.session(app, handle)
        obj = self.object(session, obj_handle)
        if obj.attrs.get(CKA.COPYABLE) is False:
            raise ActionProhibited("the object is not copyable (CKA_COPYABLE is false)")
        attrs = objects.check_change(obj.attrs, template, copying=True, is_so=self._is_so(session))
        return (yield from self.store_object(session, attrs))

    def C_DestroyObject(self, app: Application, handle: int, obj_handle: int) -> Work[None]:
        session = self.session(app, handle)
        obj = self.object(session, obj_handle)
        if obj.is_token and not session.rw:
            raise SessionReadOnly("token objects need a R/W session")
        if obj.attrs.get(CKA.DESTROYABLE) is False:
            raise ActionProhibited("the object is not destroyable (CKA_DESTROYABLE is false)")
        slot = self.slots[obj.slot_id]
        if obj.is_token:
            yield Offload(lambda: slot.store.delete_object(obj.oid), slot.store.blocking)
            slot.remove(obj)
        else:
            app.session_objects.pop(obj.oid, None)
        obj.destroyed = True
        app.forget(obj)

    def C_GetObjectSize(self, app: Application, handle: int, obj_handle: int) -> int:
        session = self.session(app, handle)
        obj = self.object(session, obj_handle)
        return sum(8 + (len(v) if isinstance(v, bytes) else 8) for v in obj.attrs.values())

    def C_GetAttributeValue(self, app: Application, handle: int, obj_handle: int, types: Sequence[int]) -> list[object]:
        session = self.session(app, handle)
        obj = self.object(session, obj_handle)
        values: list[object] = []
        sensitive = invalid = False
        for attr in types:
            value = obj.attrs.get(attr)
            if objects.unreadable(obj.attrs, attr):
                sensitive = True
                values.append(None)
            elif value is None:
                invalid = True
                values.append(None)
            else:
                values.append(value)
        if sensitive:
            raise AttributeSensitive("some attributes are sensitive", result=values)
        if invalid:
            raise AttributeTypeInvalid("some attributes do not exist on the object", result=values)
        return values

    def C_SetAttributeValue(self, app: Application, handle: int, obj_handle: int, template: Template) -> Work[None]:
        session = self.session(app, handle)
        obj = self.object(session, obj_handle)
        if obj.is_token and not session.rw:
            raise SessionReadOnly("token objects need a R/W session")
        attrs = objects.check_change(obj.attrs, template, copying=False, is_so=self._is_so(session))
        if obj.is_token:
            slot = self.slots[obj.slot_id]
            yield Offload(lambda: slot.store.put_object(obj.oid, attrs), slot.store.blocking)
            slot.update(obj, attrs)
        else:
            obj.replace(attrs)

    # --- search ---------------------------------------------------------------------------------

    def C_FindObjectsInit(self, app: Application, handle: int, template: Sequence[tuple[int, AttrValue]]) -> None:
        session = self.session(app, handle)
        if _FIND in session.ops:
            raise OperationActive("a search is active")
        visible, matches, handle_for = self.visible, objects.matches, app.handle_for
        handles = [
            handle_for(o)
            for o in self.objects_of(session, template)
            if visible(session, o) and matches(o.attrs, template)
        ]
        handles.reverse()  # popped from the end: oldest first
        session.ops[_FIND] = Operation(_FIND, handles, 0)

    def C_FindObjects(self, app: Application, handle: int, max_count: int) -> list[int]:
        session = self.session(app, handle)
        op = session.ops.get(_FIND)
        if op is None:
            raise OperationNotInitialized("no search is active")
        pending: list[int] = op.context
        out: list[int] = []
        while pending and len(out) < max_count:
            h = pending.pop()
            obj = app.object(h)
            if obj is not None and self.visible(session, obj):
                out.append(h)
        return out

    def C_FindObjectsFinal(self, app: Application, handle: int) -> None:
        session = self.session(app, handle)
        if session.ops.pop(_FIND, None) is None:
            raise OperationNotInitialized("no search is active")
