"""``ShimDoor``: the Python client's API, served through libkeygrid-pkcs11.so.

``ShimDoor`` has the methods of ``keygridd.client.sync.Client`` (``C_*``, same
argument order minus ``out_len``, same results) but every call goes through
the C shim with ctypes, so a suite written against the client runs again
through the shim. Failures raise ``keygridd.pkcs11.errors.error_for(rv)``;
``C_GetAttributeValue`` returns None for unavailable values without raising
(like the client, for CKR_ATTRIBUTE_SENSITIVE and _TYPE_INVALID).

The ``CK_*`` structures are the pkcs11 provider's (``keygridd.providers.pkcs11.ckstructs``),
re-exported here with ``load`` for the shim tests.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from ctypes import byref, c_ubyte, c_ulong, sizeof
from typing import Any

from keygridd.pkcs11 import CKR
from keygridd.pkcs11.attributes import AttrValue, Kind, kind_of
from keygridd.pkcs11.errors import error_for
from keygridd.pkcs11.params import (
    CtrParams,
    Ecdh1Params,
    EddsaParams,
    GcmParams,
    Mechanism,
    OaepParams,
    PssParams,
    UlongParams,
)
from keygridd.providers.pkcs11.ckstructs import (
    CK_AES_CTR_PARAMS,
    CK_ATTRIBUTE,
    CK_ECDH1_DERIVE_PARAMS,
    CK_EDDSA_PARAMS,
    CK_GCM_PARAMS,
    CK_INFO,
    CK_MECHANISM,
    CK_MECHANISM_INFO,
    CK_RSA_PKCS_OAEP_PARAMS,
    CK_RSA_PKCS_PSS_PARAMS,
    CK_SESSION_INFO,
    CK_SLOT_INFO,
    CK_TOKEN_INFO,
    CK_VERSION,
)

CK_ULONG = c_ulong
CK_BBOOL = c_ubyte
UNAVAILABLE = (1 << 64) - 1
PARTIAL_OK = {CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID}


def text(field: Any) -> str:
    """A blank-padded CK_UTF8CHAR field as the daemon's unpadded string."""
    return bytes(field).decode("utf-8").rstrip(" ")


def _struct_map(info: ctypes.Structure) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ftype in info._fields_:  # type: ignore[misc]
        value = getattr(info, name)
        if ftype is CK_VERSION:
            out[name] = [value.major, value.minor]
        elif isinstance(value, int):
            out[name] = value
        else:
            out[name] = text(value)
    return out


class _Keep:
    """Holds ctypes buffers alive for the duration of one call."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def buf(self, data: bytes) -> Any:
        b = ctypes.create_string_buffer(data, len(data)) if data else None
        self.items.append(b)
        return b

    def ptr(self, data: bytes) -> int | None:
        b = self.buf(data)
        return ctypes.addressof(b) if b is not None else None


def _c_value(keep: _Keep, attr: int, value: Any) -> tuple[int | None, int]:
    kind = kind_of(attr)
    if isinstance(value, bytes):  # raw C bytes whatever the kind: the shim checks their size
        raw = value
    elif kind is Kind.BOOL:
        raw = bytes([1 if value else 0])
    elif kind is Kind.ULONG:
        raw = bytes(CK_ULONG(int(value)))
    elif kind is Kind.MECHANISMS:
        raw = b"".join(bytes(CK_ULONG(m)) for m in value)
    elif kind is Kind.TEMPLATE:
        arr = template(keep, value)
        return (ctypes.addressof(arr) if arr is not None else None), sizeof(CK_ATTRIBUTE) * len(value)
    else:
        raw = bytes(value)
    return keep.ptr(raw), len(raw)


def template(keep: _Keep, items: Any) -> Any:
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    if not pairs:
        return None
    arr = (CK_ATTRIBUTE * len(pairs))()
    keep.items.append(arr)
    for i, (attr, value) in enumerate(pairs):
        ptr, length = _c_value(keep, int(attr), value)
        arr[i] = CK_ATTRIBUTE(int(attr), ptr, length)
    return arr


def mechanism(keep: _Keep, mech: Mechanism | int) -> CK_MECHANISM:
    if isinstance(mech, int):
        mech = Mechanism(int(mech))
    p = mech.param
    if p is None:
        return CK_MECHANISM(mech.mechanism, None, 0)
    if isinstance(p, bytes):
        return CK_MECHANISM(mech.mechanism, keep.ptr(p), len(p))
    st: ctypes.Structure
    if isinstance(p, GcmParams):
        st = CK_GCM_PARAMS(keep.ptr(p.iv), len(p.iv), p.iv_bits, keep.ptr(p.aad), len(p.aad), p.tag_bits)
    elif isinstance(p, OaepParams):
        st = CK_RSA_PKCS_OAEP_PARAMS(p.hash_alg, p.mgf, p.source, keep.ptr(p.source_data), len(p.source_data))
    elif isinstance(p, PssParams):
        st = CK_RSA_PKCS_PSS_PARAMS(p.hash_alg, p.mgf, p.s_len)
    elif isinstance(p, Ecdh1Params):
        st = CK_ECDH1_DERIVE_PARAMS(
            p.kdf, len(p.shared_data), keep.ptr(p.shared_data), len(p.public_data), keep.ptr(p.public_data)
        )
    elif isinstance(p, CtrParams):
        st = CK_AES_CTR_PARAMS(p.counter_bits, (c_ubyte * 16)(*p.cb))
    elif isinstance(p, EddsaParams):
        st = CK_EDDSA_PARAMS(1 if p.ph_flag else 0, len(p.context_data), keep.ptr(p.context_data))
    elif isinstance(p, UlongParams):
        st = CK_ULONG(p.value)  # type: ignore[assignment]
    else:
        raise TypeError(f"parameter {p!r}")
    keep.items.append(st)
    return CK_MECHANISM(mech.mechanism, ctypes.addressof(st), sizeof(st))


def _py_value(attr: int, raw: bytes, depth: int = 0) -> AttrValue:
    kind = kind_of(attr)
    if kind is Kind.BOOL:
        return raw != b"\x00"
    if kind is Kind.ULONG:
        return CK_ULONG.from_buffer_copy(raw).value
    if kind is Kind.MECHANISMS:
        n = len(raw) // sizeof(CK_ULONG)
        return tuple((CK_ULONG * n).from_buffer_copy(raw)) if n else ()
    if kind is Kind.TEMPLATE:
        raise AssertionError("templates are read by _read_template")
    return raw


class ShimDoor:
    """The Client API over the C shim.

    A PKCS#11 module is initialised once per process, so one ShimDoor is one
    application: a second ShimDoor before ``close()`` gets
    CKR_CRYPTOKI_ALREADY_INITIALIZED (use the Python client for a second,
    independent application).
    """

    def __init__(self, lib_path: str, socket_path: str | None = None) -> None:
        self._saved = os.environ.get("KEYGRID_SOCKET")
        if socket_path is not None:
            os.environ["KEYGRID_SOCKET"] = socket_path  # read by C_Initialize
        self.lib = ctypes.CDLL(lib_path)
        self._check(self.lib.C_Initialize(None))

    def close(self) -> None:
        self.lib.C_Finalize(None)
        if self._saved is None:
            os.environ.pop("KEYGRID_SOCKET", None)
        else:
            os.environ["KEYGRID_SOCKET"] = self._saved

    def __enter__(self) -> ShimDoor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------------

    def _fn(self, name: str) -> Any:
        fn = getattr(self.lib, name)
        fn.restype = CK_ULONG
        return fn

    def raw(self, name: str, *args: Any) -> int:
        """Call an entry point and return its CK_RV without raising."""
        return int(self._fn(name)(*args))

    @staticmethod
    def _check(rv: int, partial: bool = False) -> int:
        if rv != CKR.OK and not (partial and rv in PARTIAL_OK):
            raise error_for(rv)("through the shim")
        return rv

    def _call(self, name: str, *args: Any) -> int:
        return self._check(self._fn(name)(*args))

    def _out(self, name: str, *args: Any, hint: int = 1024) -> bytes:
        """A call ending in (pOut, pulOutLen): one round trip unless the buffer is short."""
        size = CK_ULONG(hint)
        buf = ctypes.create_string_buffer(hint)
        rv = self._fn(name)(*args, buf, byref(size))
        if rv == CKR.BUFFER_TOO_SMALL:
            buf = ctypes.create_string_buffer(size.value)
            rv = self._fn(name)(*args, buf, byref(size))
        self._check(rv)
        return buf.raw[: size.value]

    def _ulongs(self, name: str, *args: Any) -> list[int]:
        count = CK_ULONG(0)
        self._call(name, *args, None, byref(count))
        arr = (CK_ULONG * max(count.value, 1))()
        self._call(name, *args, arr, byref(count))
        return list(arr[: count.value])

    # --- general, slots, tokens --------------------------------------------------------------------

    def C_GetInfo(self) -> dict[str, Any]:
        info = CK_INFO()
        self._call("C_GetInfo", byref(info))
        return _struct_map(info)

    def C_GetSlotList(self, token_present: bool) -> list[int]:
        return self._ulongs("C_GetSlotList", CK_BBOOL(1 if token_present else 0))

    def C_GetSlotInfo(self, slot: int) -> dict[str, Any]:
        info = CK_SLOT_INFO()
        self._call("C_GetSlotInfo", CK_ULONG(slot), byref(info))
        return _struct_map(info)

    def C_GetTokenInfo(self, slot: int) -> dict[str, Any]:
        info = CK_TOKEN_INFO()
        self._call("C_GetTokenInfo", CK_ULONG(slot), byref(info))
        return _struct_map(info)

    def C_WaitForSlotEvent(self, flags: int) -> int:
        slot = CK_ULONG(0)
        self._call("C_WaitForSlotEvent", CK_ULONG(flags), byref(slot), None)
        return slot.value

    def C_GetMechanismList(self, slot: int) -> list[int]:
        return self._ulongs("C_GetMechanismList", CK_ULONG(slot))

    def C_GetMechanismInfo(self, slot: int, mech: int) -> dict[str, Any]:
        info = CK_MECHANISM_INFO()
        self._call("C_GetMechanismInfo", CK_ULONG(slot), CK_ULONG(mech), byref(info))
        return _struct_map(info)

    def C_InitToken(self, slot: int, so_pin: bytes, label: bytes) -> None:
        if len(label) > 32:
            raise error_for(CKR.ARGUMENTS_BAD)("the label is at most 32 bytes")
        self._call("C_InitToken", CK_ULONG(slot), so_pin, CK_ULONG(len(so_pin)), label.ljust(32, b" "))

    def C_InitPIN(self, session: int, pin: bytes) -> None:
        self._call("C_InitPIN", CK_ULONG(session), pin, CK_ULONG(len(pin)))

    def C_SetPIN(self, session: int, old_pin: bytes, new_pin: bytes) -> None:
        self._call("C_SetPIN", CK_ULONG(session), old_pin, CK_ULONG(len(old_pin)), new_pin, CK_ULONG(len(new_pin)))

    # --- sessions ----------------------------------------------------------------------------------

    def C_OpenSession(self, slot: int, flags: int) -> int:
        handle = CK_ULONG(0)
        self._call("C_OpenSession", CK_ULONG(slot), CK_ULONG(flags), None, None, byref(handle))
        return handle.value

    def C_CloseSession(self, session: int) -> None:
        self._call("C_CloseSession", CK_ULONG(session))

    def C_CloseAllSessions(self, slot: int) -> None:
        self._call("C_CloseAllSessions", CK_ULONG(slot))

    def C_GetSessionInfo(self, session: int) -> dict[str, Any]:
        info = CK_SESSION_INFO()
        self._call("C_GetSessionInfo", CK_ULONG(session), byref(info))
        return _struct_map(info)

    def C_GetOperationState(self, session: int) -> bytes:
        return self._out("C_GetOperationState", CK_ULONG(session))

    def C_SetOperationState(self, session: int, state: bytes, encryption_key: int, authentication_key: int) -> None:
        self._call(
            "C_SetOperationState",
            CK_ULONG(session),
            state,
            CK_ULONG(len(state)),
            CK_ULONG(encryption_key),
            CK_ULONG(authentication_key),
        )

    def C_Login(self, session: int, user_type: int, pin: bytes) -> None:
        self._call("C_Login", CK_ULONG(session), CK_ULONG(user_type), pin, CK_ULONG(len(pin)))

    def C_Logout(self, session: int) -> None:
        self._call("C_Logout", CK_ULONG(session))

    # --- objects -----------------------------------------------------------------------------------

    def _handle_call(self, name: str, *args: Any) -> int:
        handle = CK_ULONG(0)
        self._call(name, *args, byref(handle))
        return handle.value

    def C_CreateObject(self, session: int, tmpl: Any) -> int:
        keep = _Keep()
        arr = template(keep, tmpl)
        return self._handle_call("C_CreateObject", CK_ULONG(session), arr, CK_ULONG(len(arr) if arr else 0))

    def C_CopyObject(self, session: int, obj: int, tmpl: Any) -> int:
        keep = _Keep()
        arr = template(keep, tmpl)
        return self._handle_call(
            "C_CopyObject", CK_ULONG(session), CK_ULONG(obj), arr, CK_ULONG(len(arr) if arr else 0)
        )

    def C_DestroyObject(self, session: int, obj: int) -> None:
        self._call("C_DestroyObject", CK_ULONG(session), CK_ULONG(obj))

    def C_GetObjectSize(self, session: int, obj: int) -> int:
        return self._handle_call("C_GetObjectSize", CK_ULONG(session), CK_ULONG(obj))

    def C_GetAttributeValue(self, session: int, obj: int, types: Sequence[int]) -> list[Any]:
        """Lengths, then values; attribute arrays take a third pass for their elements' values."""
        n = len(types)
        arr = (CK_ATTRIBUTE * max(n, 1))()
        for i, t in enumerate(types):
            arr[i] = CK_ATTRIBUTE(int(t), None, 0)
        fn = self._fn("C_GetAttributeValue")

        def run() -> None:
            self._check(fn(CK_ULONG(session), CK_ULONG(obj), arr, CK_ULONG(n)), partial=True)

        run()
        keep = _Keep()
        nested: list[Any] = []
        for i in range(n):
            a = arr[i]
            if a.ulValueLen == UNAVAILABLE:
                continue
            if kind_of(a.type) is Kind.TEMPLATE:
                inner = (CK_ATTRIBUTE * max(a.ulValueLen // sizeof(CK_ATTRIBUTE), 1))()
                nested.append((i, inner, a.ulValueLen // sizeof(CK_ATTRIBUTE)))
                a.pValue = ctypes.addressof(inner)
            else:
                a.pValue = keep.ptr(bytes(max(a.ulValueLen, 1)))
        run()
        if nested:
            for _i, inner, count in nested:
                for j in range(count):
                    if inner[j].ulValueLen != UNAVAILABLE and kind_of(inner[j].type) is not Kind.TEMPLATE:
                        inner[j].pValue = keep.ptr(bytes(max(inner[j].ulValueLen, 1)))
            run()
        values: list[Any] = [self._read(arr[i]) for i in range(n)]
        for i, inner, count in nested:
            values[i] = tuple((inner[j].type, self._read(inner[j])) for j in range(count))
        return values

    @staticmethod
    def _read(a: CK_ATTRIBUTE) -> Any:
        if a.ulValueLen == UNAVAILABLE or a.pValue is None or kind_of(a.type) is Kind.TEMPLATE:
            return None
        return _py_value(a.type, ctypes.string_at(a.pValue, a.ulValueLen))

    def C_SetAttributeValue(self, session: int, obj: int, tmpl: Any) -> None:
        keep = _Keep()
        arr = template(keep, tmpl)
        self._call("C_SetAttributeValue", CK_ULONG(session), CK_ULONG(obj), arr, CK_ULONG(len(arr) if arr else 0))

    def C_FindObjectsInit(self, session: int, tmpl: Any) -> None:
        keep = _Keep()
        arr = template(keep, tmpl)
        self._call("C_FindObjectsInit", CK_ULONG(session), arr, CK_ULONG(len(arr) if arr else 0))

    def C_FindObjects(self, session: int, max_count: int) -> list[int]:
        arr = (CK_ULONG * max(max_count, 1))()
        count = CK_ULONG(0)
        self._call("C_FindObjects", CK_ULONG(session), arr, CK_ULONG(max_count), byref(count))
        return list(arr[: count.value])

    def C_FindObjectsFinal(self, session: int) -> None:
        self._call("C_FindObjectsFinal", CK_ULONG(session))

    # --- cryptographic functions -------------------------------------------------------------------

    def _init(self, name: str, session: int, mech: Any, key: int | None) -> None:
        keep = _Keep()
        m = mechanism(keep, mech)
        args = [CK_ULONG(session), byref(m)] + ([CK_ULONG(key)] if key is not None else [])
        self._call(name, *args)

    def _data(self, name: str, session: int, data: bytes) -> bytes:
        return self._out(name, CK_ULONG(session), data, CK_ULONG(len(data)), hint=len(data) + 1024)

    def _final(self, name: str, session: int) -> bytes:
        return self._out(name, CK_ULONG(session))

    def _update(self, name: str, session: int, data: bytes) -> None:
        self._call(name, CK_ULONG(session), data, CK_ULONG(len(data)))

    def C_EncryptInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_EncryptInit", session, mech, key)

    def C_Encrypt(self, session: int, data: bytes) -> bytes:
        return self._data("C_Encrypt", session, data)

    def C_EncryptUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_EncryptUpdate", session, data)

    def C_EncryptFinal(self, session: int) -> bytes:
        return self._final("C_EncryptFinal", session)

    def C_DecryptInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_DecryptInit", session, mech, key)

    def C_Decrypt(self, session: int, data: bytes) -> bytes:
        return self._data("C_Decrypt", session, data)

    def C_DecryptUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_DecryptUpdate", session, data)

    def C_DecryptFinal(self, session: int) -> bytes:
        return self._final("C_DecryptFinal", session)

    def C_DigestInit(self, session: int, mech: Any) -> None:
        self._init("C_DigestInit", session, mech, None)

    def C_Digest(self, session: int, data: bytes) -> bytes:
        return self._data("C_Digest", session, data)

    def C_DigestUpdate(self, session: int, data: bytes) -> None:
        self._update("C_DigestUpdate", session, data)

    def C_DigestKey(self, session: int, key: int) -> None:
        self._call("C_DigestKey", CK_ULONG(session), CK_ULONG(key))

    def C_DigestFinal(self, session: int) -> bytes:
        return self._final("C_DigestFinal", session)

    def C_SignInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_SignInit", session, mech, key)

    def C_Sign(self, session: int, data: bytes) -> bytes:
        return self._data("C_Sign", session, data)

    def C_SignUpdate(self, session: int, data: bytes) -> None:
        self._update("C_SignUpdate", session, data)

    def C_SignFinal(self, session: int) -> bytes:
        return self._final("C_SignFinal", session)

    def C_SignRecoverInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_SignRecoverInit", session, mech, key)

    def C_SignRecover(self, session: int, data: bytes) -> bytes:
        return self._data("C_SignRecover", session, data)

    def C_VerifyInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_VerifyInit", session, mech, key)

    def C_Verify(self, session: int, data: bytes, signature: bytes) -> None:
        self._call("C_Verify", CK_ULONG(session), data, CK_ULONG(len(data)), signature, CK_ULONG(len(signature)))

    def C_VerifyUpdate(self, session: int, data: bytes) -> None:
        self._update("C_VerifyUpdate", session, data)

    def C_VerifyFinal(self, session: int, signature: bytes) -> None:
        self._update("C_VerifyFinal", session, signature)

    def C_VerifyRecoverInit(self, session: int, mech: Any, key: int) -> None:
        self._init("C_VerifyRecoverInit", session, mech, key)

    def C_VerifyRecover(self, session: int, signature: bytes) -> bytes:
        return self._data("C_VerifyRecover", session, signature)

    def C_DigestEncryptUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_DigestEncryptUpdate", session, data)

    def C_DecryptDigestUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_DecryptDigestUpdate", session, data)

    def C_SignEncryptUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_SignEncryptUpdate", session, data)

    def C_DecryptVerifyUpdate(self, session: int, data: bytes) -> bytes:
        return self._data("C_DecryptVerifyUpdate", session, data)

    # --- keys and random ---------------------------------------------------------------------------

    def C_GenerateKey(self, session: int, mech: Any, tmpl: Any) -> int:
        keep = _Keep()
        m, arr = mechanism(keep, mech), template(keep, tmpl)
        return self._handle_call("C_GenerateKey", CK_ULONG(session), byref(m), arr, CK_ULONG(len(arr) if arr else 0))

    def C_GenerateKeyPair(
        self, session: int, mech: Any, public_template: Any, private_template: Any
    ) -> tuple[int, int]:
        keep = _Keep()
        m = mechanism(keep, mech)
        pub, priv = template(keep, public_template), template(keep, private_template)
        hpub, hpriv = CK_ULONG(0), CK_ULONG(0)
        self._call(
            "C_GenerateKeyPair",
            CK_ULONG(session),
            byref(m),
            pub,
            CK_ULONG(len(pub) if pub else 0),
            priv,
            CK_ULONG(len(priv) if priv else 0),
            byref(hpub),
            byref(hpriv),
        )
        return hpub.value, hpriv.value

    def C_WrapKey(self, session: int, mech: Any, wrapping_key: int, key: int) -> bytes:
        keep = _Keep()
        m = mechanism(keep, mech)
        return self._out("C_WrapKey", CK_ULONG(session), byref(m), CK_ULONG(wrapping_key), CK_ULONG(key))

    def C_UnwrapKey(self, session: int, mech: Any, unwrapping_key: int, wrapped_key: bytes, tmpl: Any) -> int:
        keep = _Keep()
        m, arr = mechanism(keep, mech), template(keep, tmpl)
        return self._handle_call(
            "C_UnwrapKey",
            CK_ULONG(session),
            byref(m),
            CK_ULONG(unwrapping_key),
            wrapped_key,
            CK_ULONG(len(wrapped_key)),
            arr,
            CK_ULONG(len(arr) if arr else 0),
        )

    def C_DeriveKey(self, session: int, mech: Any, base_key: int, tmpl: Any) -> int:
        keep = _Keep()
        m, arr = mechanism(keep, mech), template(keep, tmpl)
        return self._handle_call(
            "C_DeriveKey", CK_ULONG(session), byref(m), CK_ULONG(base_key), arr, CK_ULONG(len(arr) if arr else 0)
        )

    def C_SeedRandom(self, session: int, seed: bytes) -> None:
        self._call("C_SeedRandom", CK_ULONG(session), seed, CK_ULONG(len(seed)))

    def C_GenerateRandom(self, session: int, length: int) -> bytes:
        buf = ctypes.create_string_buffer(max(length, 1))
        self._call("C_GenerateRandom", CK_ULONG(session), buf, CK_ULONG(length))
        return buf.raw[:length]

    def C_GetFunctionStatus(self, session: int) -> None:
        self._call("C_GetFunctionStatus", CK_ULONG(session))

    def C_CancelFunction(self, session: int) -> None:
        self._call("C_CancelFunction", CK_ULONG(session))


def in_threads(work: Callable[[], None], count: int, timeout: float = 60.0) -> list[BaseException]:
    """Runs ``work`` in ``count`` threads at once; returns what they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


__all__ = ["CK_ATTRIBUTE", "CK_MECHANISM", "CK_TOKEN_INFO", "ShimDoor", "in_threads", "text"]
