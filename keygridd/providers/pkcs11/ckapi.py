"""A ctypes binding of one PKCS#11 module's CK_FUNCTION_LIST, called with KeyGrid's wire values.

It runs inside the module worker process (``worker.py``), never in the daemon:
vendor modules crash and hang, and only a process boundary contains that.

Rules:

* Values in and out are the wire forms of ``keygridd.protocol.calls`` after
  ``codec.decode_args``: templates are ``(CKA, value)`` pairs typed by
  ``keygridd.pkcs11.attributes``, mechanisms are ``params.Mechanism``. Results
  are what the call table says, except that the calls creating objects return
  ``[handle, meta]`` (C_GenerateKeyPair ``[[public, meta], [private, meta]]``):
  ``meta`` holds the values of ``META_TYPES`` of the new object, None where
  unavailable, fetched in the same call.
* Handles and slot ids are the module's own numbers; nothing here maps them.
* A CK_RV other than CKR_OK raises ``error_for(rv)`` unchanged. Results the
  spec returns with an error travel as the exception's ``result``:
  C_GetAttributeValue's values (None where unavailable, v2.40 Base 5.7) and
  CKR_BUFFER_TOO_SMALL's ``[None, needed]``.
* ``outlen`` (v2.40 Base 5.2, variable-length output): None = no limit (a
  buffer big enough in practice, one retry at the length the module reports,
  since CKR_BUFFER_TOO_SMALL leaves the operation active); -1 = C's NULL
  buffer, a length query; n = the caller's buffer of n bytes.
* C_Initialize asks for CKF_OS_LOCKING_OK (Base 5.4); a module answering
  CKR_CANT_LOCK is initialised with NULL and ``threads_ok`` is False: one
  thread at a time may call it. ``Module`` itself keeps no per-call state.
* C_WaitForSlotEvent is served with CKF_DONT_BLOCK only (a blocking wait
  would hold a worker lane forever). Functions the module's list leaves NULL
  raise CKR_FUNCTION_NOT_SUPPORTED.
* Every buffer handed to the module stays referenced until the call returns.
  Error messages name functions, never values.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from ctypes import POINTER, addressof, byref, c_ulong, sizeof
from typing import Any

from keygridd.core.remote import META_TYPES  # what the daemon learns about every object it sees
from keygridd.pkcs11._constants import CKF_DONT_BLOCK, CKF_OS_LOCKING_OK, CKR
from keygridd.pkcs11.attributes import KINDS, AttrValue, Kind
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.errors import (
    ArgumentsBad,
    BufferTooSmall,
    FunctionNotSupported,
    GeneralError,
    HostMemory,
    error_for,
)
from keygridd.pkcs11.params import Mechanism
from keygridd.protocol.calls import CALLS
from keygridd.providers.pkcs11.ckstructs import (
    CK_ATTRIBUTE,
    CK_C_INITIALIZE_ARGS,
    CK_FUNCTION_LIST,
    CK_INFO,
    CK_MECHANISM_INFO,
    CK_SESSION_INFO,
    CK_SLOT_INFO,
    CK_TOKEN_INFO,
    FUNCTION_NAMES,
    MAX_BUFFER,
    UNAVAILABLE,
    buffer,
    info_map,
    pack_mechanism,
    pack_template,
    text,
    unpack_value,
)

# The calls that create an object: their result is [handle, meta].
CREATES = frozenset({"C_CreateObject", "C_CopyObject", "C_GenerateKey", "C_UnwrapKey", "C_DeriveKey"})

FIND_BATCH = 256  # handles per C_FindObjects in KG_FindAll
MAX_FIND = 1 << 16  # C_FindObjects' max_count is capped here (returning fewer is allowed)
_PARTIAL = (CKR.OK, CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID)
_RETRIES = 4  # lengths that keep changing between the two steps of a query

Meta = list[AttrValue | None]


def _check(name: str, rv: int) -> None:
    if rv != CKR.OK:
        raise error_for(rv)(f"{name}: the module's answer")


def _unsupported(name: str) -> Callable[..., Any]:
    def handler(*args: Any) -> Any:
        raise FunctionNotSupported(f"the module has no {name}")

    return handler


class Module:
    """One loaded and initialised PKCS#11 module; ``call(name, args)`` runs any function of the call table."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        get_list = self._lib.C_GetFunctionList
        get_list.restype = c_ulong
        get_list.argtypes = [POINTER(POINTER(CK_FUNCTION_LIST))]
        table = POINTER(CK_FUNCTION_LIST)()
        _check("C_GetFunctionList", get_list(byref(table)))
        if not table:
            raise GeneralError("C_GetFunctionList gave a NULL function list")
        functions = table.contents
        self.function_list: int = ctypes.addressof(functions)  # the module's CK_FUNCTION_LIST, for lanes.c
        self.version: tuple[int, int] = (functions.version.major, functions.version.minor)
        self._functions: dict[str, Any] = {}
        for name in FUNCTION_NAMES:
            fn = getattr(functions, name)
            self._functions[name] = fn if fn else None
        self.threads_ok = self._initialize()
        self._handlers = self._build_handlers()

    def _fn(self, name: str) -> Any:
        fn = self._functions[name]
        if fn is None:
            raise FunctionNotSupported(f"the module has no {name}")
        return fn

    def _initialize(self) -> bool:
        init = self._fn("C_Initialize")
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
        rv = init(byref(args))
        if rv == CKR.CANT_LOCK:
            _check("C_Initialize", init(None))
            return False
        _check("C_Initialize", rv)
        return True

    def finalize(self) -> None:
        """C_Finalize(NULL); errors are ignored (the process is ending)."""
        fn = self._functions["C_Finalize"]
        if fn is not None:
            fn(None)

    def call(self, name: str, args: Sequence[Any]) -> Any:
        """Run ``name`` with the call table's (decoded) arguments; raises the module's CKR as PKCS11Error."""
        handler = self._handlers.get(name)
        if handler is None:
            raise FunctionNotSupported(f"{name} is not served by the module worker")
        return handler(*args)

    def _build_handlers(self) -> dict[str, Callable[..., Any]]:
        special: dict[str, Callable[..., Any]] = {
            "C_GetInfo": self._get_info,
            "C_GetSlotList": self._get_slot_list,
            "C_GetSlotInfo": self._get_slot_info,
            "C_GetTokenInfo": self._get_token_info,
            "C_WaitForSlotEvent": self._wait_for_slot_event,
            "C_GetMechanismList": self._get_mechanism_list,
            "C_GetMechanismInfo": self._get_mechanism_info,
            "C_InitToken": self._init_token,
            "C_OpenSession": self._open_session,
            "C_GetSessionInfo": self._get_session_info,
            "C_GetOperationState": self._get_operation_state,
            "C_GetAttributeValue": self._get_attribute_value,
            "C_FindObjects": self._find_objects,
            "C_GenerateKeyPair": self._generate_key_pair,
            "C_GenerateRandom": self._generate_random,
        }
        handlers: dict[str, Callable[..., Any]] = {}
        for call in CALLS:
            if not call.name.startswith("C_"):
                continue
            fn = self._functions[call.name]
            if fn is None:
                handlers[call.name] = _unsupported(call.name)
            elif call.name in special:
                handlers[call.name] = special[call.name]
            else:
                types = tuple(arg.type for arg in call.args)
                handlers[call.name] = functools.partial(self._generic, call.name, types, call.result, fn)
        handlers["KG_FindAll"] = self.find_all
        handlers["KG_Meta"] = self.metas
        handlers["KG_FindToken"] = self.find_token
        return handlers

    # --- the uniform calls: arguments marshalled by the call table -----------------------------------

    def _generic(self, name: str, types: tuple[str, ...], result: str, fn: Any, *args: Any) -> Any:
        keep: list[Any] = []  # buffers the module reads during the call
        c_args: list[Any] = []
        out_len: int | None = None
        hint = 0
        for kind, value in zip(types, args, strict=True):
            if kind == "ulong":
                c_args.append(value)
            elif kind == "bytes":
                c_args += (value, len(value))
                hint = len(value)
            elif kind == "mechanism":
                c_args.append(byref(pack_mechanism(value, keep)))
            elif kind == "template":
                c_args += (pack_template(value, keep), len(value))
            elif kind == "outlen":
                out_len = value
            else:
                raise GeneralError(f"{name}: argument type {kind} is not marshalled")
        if result == "out":
            return self._output(name, fn, c_args, hint, out_len)
        if result == "ulong":
            handle = c_ulong(0)
            _check(name, fn(*c_args, byref(handle)))
            if name in CREATES:
                return [handle.value, self.meta(args[0], handle.value)]
            return handle.value
        _check(name, fn(*c_args))
        return None

    def _output(self, name: str, fn: Any, c_args: list[Any], hint: int, out_len: int | None) -> list[Any]:
        """The outlen convention (module docstring) around one output-returning function."""
        length = c_ulong(0)
        if out_len == -1:
            _check(name, fn(*c_args, None, byref(length)))
            return [None, length.value]
        size = max(hint + 256, 1024)
        if out_len is not None:
            size = min(size, out_len)
        out = buffer(size)
        length.value = size
        rv = fn(*c_args, out, byref(length))
        if rv == CKR.BUFFER_TOO_SMALL:
            needed = length.value
            if out_len is not None and needed > out_len:
                raise BufferTooSmall(name, result=[None, needed])
            if needed <= size:  # a module contradicting itself: pass its answer on, do not loop
                raise BufferTooSmall(name, result=[None, needed])
            out = buffer(needed)
            length.value = needed
            rv = fn(*c_args, out, byref(length))
            if rv == CKR.BUFFER_TOO_SMALL:
                raise BufferTooSmall(name, result=[None, length.value])
        _check(name, rv)
        n = min(length.value, len(out))
        return [ctypes.string_at(out, n), n]

    # --- general, slots and tokens (v2.40 Base 5.4, 5.5) ----------------------------------------------

    def _get_info(self) -> dict[str, Any]:
        info = CK_INFO()
        _check("C_GetInfo", self._fn("C_GetInfo")(byref(info)))
        return info_map(info)

    def _ulongs(self, name: str, *head: Any) -> list[int]:
        """A CK_ULONG list the spec's two-step way: count with NULL, then fetch (again if it grew)."""
        fn = self._fn(name)
        for _ in range(_RETRIES):
            count = c_ulong(0)
            _check(name, fn(*head, None, byref(count)))
            if count.value > MAX_FIND:
                raise HostMemory(f"{name}: {count.value} entries")
            items = (c_ulong * max(count.value, 1))()
            rv = fn(*head, items, byref(count))
            if rv != CKR.BUFFER_TOO_SMALL:
                _check(name, rv)
                return list(items[: count.value])
        raise GeneralError(f"{name}: the count kept changing")

    def _get_slot_list(self, token_present: bool) -> list[int]:
        return self._ulongs("C_GetSlotList", 1 if token_present else 0)

    def _get_slot_info(self, slot: int) -> dict[str, Any]:
        info = CK_SLOT_INFO()
        _check("C_GetSlotInfo", self._fn("C_GetSlotInfo")(slot, byref(info)))
        return info_map(info)

    def _get_token_info(self, slot: int) -> dict[str, Any]:
        info = CK_TOKEN_INFO()
        _check("C_GetTokenInfo", self._fn("C_GetTokenInfo")(slot, byref(info)))
        return info_map(info)

    def _wait_for_slot_event(self, flags: int) -> int:
        if not flags & CKF_DONT_BLOCK:
            raise FunctionNotSupported("C_WaitForSlotEvent is served with CKF_DONT_BLOCK only")
        slot = c_ulong(0)
        _check("C_WaitForSlotEvent", self._fn("C_WaitForSlotEvent")(flags, byref(slot), None))
        return slot.value

    def _get_mechanism_list(self, slot: int) -> list[int]:
        return self._ulongs("C_GetMechanismList", slot)

    def _get_mechanism_info(self, slot: int, mechanism: int) -> dict[str, Any]:
        info = CK_MECHANISM_INFO()
        _check("C_GetMechanismInfo", self._fn("C_GetMechanismInfo")(slot, mechanism, byref(info)))
        return info_map(info)

    def _init_token(self, slot: int, so_pin: bytes, label: bytes) -> None:
        if len(label) > 32:
            raise ArgumentsBad("C_InitToken: the label is at most 32 bytes")
        _check("C_InitToken", self._fn("C_InitToken")(slot, so_pin, len(so_pin), label.ljust(32, b" ")))

    # --- sessions (Base 5.6) ----------------------------------------------------------------------------

    def _open_session(self, slot: int, flags: int) -> int:
        handle = c_ulong(0)
        _check("C_OpenSession", self._fn("C_OpenSession")(slot, flags, None, None, byref(handle)))
        return handle.value

    def _get_session_info(self, session: int) -> dict[str, Any]:
        info = CK_SESSION_INFO()
        _check("C_GetSessionInfo", self._fn("C_GetSessionInfo")(session, byref(info)))
        return info_map(info)

    def _get_operation_state(self, session: int) -> bytes:
        fn = self._fn("C_GetOperationState")
        for _ in range(_RETRIES):
            length = c_ulong(0)
            _check("C_GetOperationState", fn(session, None, byref(length)))
            state = buffer(length.value)
            rv = fn(session, state, byref(length))
            if rv != CKR.BUFFER_TOO_SMALL:
                _check("C_GetOperationState", rv)
                return ctypes.string_at(state, min(length.value, len(state)))
        raise GeneralError("C_GetOperationState: the length kept changing")

    # --- objects (Base 5.7) -------------------------------------------------------------------------------

    def attribute_values(self, session: int, obj: int, types: Sequence[int]) -> tuple[list[AttrValue | None], int]:
        """C_GetAttributeValue the two-step way: ``(values, rv)`` with rv OK, _SENSITIVE or _TYPE_INVALID.

        The first call (every pValue NULL) gives the lengths, CK_UNAVAILABLE_INFORMATION
        where an attribute cannot be read; the second fetches the available ones. For
        CK_ATTRIBUTE-array attributes the second call gives the nested types and
        lengths and a third fetches their values. Other codes raise.
        """
        fn = self._fn("C_GetAttributeValue")
        count = len(types)
        for _ in range(_RETRIES):
            query = (CK_ATTRIBUTE * count)()
            for item, attr in zip(query, types, strict=True):
                item.type = attr
            status = fn(session, obj, query, count)
            if status not in _PARTIAL:
                raise error_for(status)("C_GetAttributeValue")
            values: list[AttrValue | None] = [None] * count
            wanted = [i for i in range(count) if query[i].ulValueLen != UNAVAILABLE]
            if not wanted:
                return values, status
            keep: list[Any] = []
            fetch = (CK_ATTRIBUTE * len(wanted))()
            nested: dict[int, Any] = {}
            for item, i in zip(fetch, wanted, strict=True):
                size = query[i].ulValueLen
                if size > MAX_BUFFER:
                    raise HostMemory(f"C_GetAttributeValue: attribute {types[i]:#x} of {size} bytes")
                item.type = types[i]
                item.ulValueLen = size
                if KINDS.get(types[i]) is Kind.TEMPLATE:
                    inner = (CK_ATTRIBUTE * (size // sizeof(CK_ATTRIBUTE)))()
                    nested[i] = inner
                    item.pValue = addressof(inner)
                else:
                    item.pValue = addressof(buffer(size, keep))
            rv = fn(session, obj, fetch, len(wanted))
            if rv == CKR.BUFFER_TOO_SMALL:
                continue
            if rv not in _PARTIAL:
                raise error_for(rv)("C_GetAttributeValue")
            if status == CKR.OK:
                status = rv
            for item, i in zip(fetch, wanted, strict=True):
                if item.ulValueLen != UNAVAILABLE and i not in nested:
                    values[i] = unpack_value(types[i], item.pValue, item.ulValueLen)
            if nested:
                self._nested_values(session, obj, types, nested, values)
            return values, status
        raise GeneralError("C_GetAttributeValue: the attribute lengths kept changing")

    def _nested_values(
        self, session: int, obj: int, types: Sequence[int], nested: dict[int, Any], values: list[AttrValue | None]
    ) -> None:
        """Fetch the values of CK_ATTRIBUTE-array attributes whose nested types and lengths are known."""
        keep: list[Any] = []
        outer = (CK_ATTRIBUTE * len(nested))()
        for item, (i, inner) in zip(outer, nested.items(), strict=True):
            item.type = types[i]
            item.pValue = addressof(inner)
            item.ulValueLen = sizeof(inner)
            for entry in inner:
                if entry.ulValueLen == UNAVAILABLE or entry.ulValueLen > MAX_BUFFER:
                    raise GeneralError(f"C_GetAttributeValue: a nested attribute of {types[i]:#x} has no length")
                entry.pValue = addressof(buffer(entry.ulValueLen, keep))
        rv = self._fn("C_GetAttributeValue")(session, obj, outer, len(nested))
        if rv not in _PARTIAL:
            raise error_for(rv)("C_GetAttributeValue")
        for item, (i, inner) in zip(outer, nested.items(), strict=True):
            if item.ulValueLen != UNAVAILABLE:
                values[i] = tuple(
                    (entry.type, unpack_value(entry.type, entry.pValue, entry.ulValueLen))
                    for entry in inner
                    if entry.ulValueLen != UNAVAILABLE and KINDS.get(entry.type) is not Kind.TEMPLATE
                )

    def _get_attribute_value(self, session: int, obj: int, types: Sequence[int]) -> list[AttrValue | None]:
        values, rv = self.attribute_values(session, obj, types)
        if rv != CKR.OK:
            raise error_for(rv)("C_GetAttributeValue", result=values)
        return values

    def meta(self, session: int, handle: int) -> Meta:
        """``META_TYPES`` of one object, None where unavailable; never raises a module error."""
        try:
            return self.attribute_values(session, handle, META_TYPES)[0]
        except PKCS11Error:
            return [None] * len(META_TYPES)

    def _find_objects(self, session: int, max_count: int) -> list[int]:
        size = min(max_count, MAX_FIND)
        found = (c_ulong * max(size, 1))()
        count = c_ulong(0)
        _check("C_FindObjects", self._fn("C_FindObjects")(session, found, size, byref(count)))
        return list(found[: min(count.value, size)])

    # --- keys and random numbers (Base 5.13, 5.14) -------------------------------------------------------

    def _generate_key_pair(
        self, session: int, mechanism: Mechanism, public: Sequence[Any], private: Sequence[Any]
    ) -> list[list[Any]]:
        keep: list[Any] = []
        mech = pack_mechanism(mechanism, keep)
        pub, priv = c_ulong(0), c_ulong(0)
        fn = self._fn("C_GenerateKeyPair")
        rv = fn(
            session,
            byref(mech),
            pack_template(public, keep),
            len(public),
            pack_template(private, keep),
            len(private),
            byref(pub),
            byref(priv),
        )
        _check("C_GenerateKeyPair", rv)
        return [[pub.value, self.meta(session, pub.value)], [priv.value, self.meta(session, priv.value)]]

    def _generate_random(self, session: int, length: int) -> bytes:
        out = buffer(length)
        _check("C_GenerateRandom", self._fn("C_GenerateRandom")(session, out, length))
        return ctypes.string_at(out, length)

    # --- extension calls: several module calls in one worker round trip -----------------------------------

    def find_all(
        self, session: int, template: Sequence[tuple[int, AttrValue]] | Mapping[int, AttrValue]
    ) -> list[list[Any]]:
        """KG_FindAll: C_FindObjectsInit, C_FindObjects until a short batch, C_FindObjectsFinal; with meta."""
        keep: list[Any] = []
        _check(
            "C_FindObjectsInit", self._fn("C_FindObjectsInit")(session, pack_template(template, keep), len(template))
        )
        handles: list[int] = []
        try:
            while True:
                batch = self._find_objects(session, FIND_BATCH)
                handles += batch
                if len(batch) < FIND_BATCH:
                    break
        finally:
            rv = self._fn("C_FindObjectsFinal")(session)
        _check("C_FindObjectsFinal", rv)
        return [[handle, self.meta(session, handle)] for handle in handles]

    def metas(self, session: int, handles: Sequence[int]) -> list[Meta | None]:
        """KG_Meta: the meta of each handle; None for a handle the module calls invalid."""
        out: list[Meta | None] = []
        for handle in handles:
            try:
                out.append(self.attribute_values(session, handle, META_TYPES)[0])
            except PKCS11Error as exc:
                if exc.rv != CKR.OBJECT_HANDLE_INVALID:
                    raise
                out.append(None)
        return out

    def find_token(self, label: str | None, serial: str | None) -> int | None:
        """KG_FindToken: the first slot whose present token has this label and serial number (each if given)."""
        for slot in self._get_slot_list(True):
            info = CK_TOKEN_INFO()
            if self._fn("C_GetTokenInfo")(slot, byref(info)) != CKR.OK:
                continue  # removed since the slot list was taken
            if label is not None and text(bytes(info.label)) != label:
                continue
            if serial is not None and text(bytes(info.serial_number)) != serial:
                continue
            return slot
        return None
