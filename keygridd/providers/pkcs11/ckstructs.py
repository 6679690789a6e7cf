"""The C side of ``ckapi``: pkcs11.h v2.40 structures in ctypes, and packing of values into them.

Layouts follow the system header (p11-kit's ``pkcs11.h``) on Linux: CK_ULONG
is ``unsigned long`` and structures are not packed, so ctypes' default
alignment is the module's. ``CK_FUNCTION_LIST`` is CK_VERSION plus the 68
function pointers of v2.40 in spec order (Base 5.1, the header's
``struct ck_function_list``); each pointer's prototype is spelled with one
letter per argument: ``u`` CK_ULONG, ``p`` a pointer, ``b`` CK_BBOOL.

The info structures name their fields after the keys of the daemon's info
maps (``keygridd.core.sessions``), so ``info_map`` converts any of them:
blank-padded strings decoded and right-stripped, CK_VERSION as
``[major, minor]``, CK_ULONG as int.

Packing copies each value into a ctypes buffer appended to the caller's
``keep`` list, which the caller holds until the module call returns.

A mechanism parameter KeyGrid does not model (``params.PARAM_TYPES``) arrives
as raw bytes and goes to the module as they are, except for the mechanisms of
``POINTER_PARAMS``: their parameter structures hold pointers, which in bytes
from a client are addresses of another process (the module would read
whatever is there, or crash the worker). Those are refused with
CKR_MECHANISM_PARAM_INVALID.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping, Sequence
from ctypes import Structure, addressof, c_ubyte, c_ulong, c_void_p, sizeof
from typing import Any, cast

from keygridd.pkcs11._constants import CKM
from keygridd.pkcs11.attributes import KINDS, AttrValue, Kind
from keygridd.pkcs11.errors import AttributeValueInvalid, HostMemory, MechanismParamInvalid
from keygridd.pkcs11.params import (
    CtrParams,
    Ecdh1Params,
    EddsaParams,
    GcmParams,
    Mechanism,
    OaepParams,
    Param,
    PssParams,
    UlongParams,
)

UNAVAILABLE = 2**64 - 1  # CK_UNAVAILABLE_INFORMATION
ULONG_SIZE = sizeof(c_ulong)
MAX_BUFFER = 1 << 26  # the largest output or attribute buffer the worker allocates (CKR_HOST_MEMORY above)


class CK_VERSION(Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_INFO(Structure):
    _fields_ = [
        ("cryptoki_version", CK_VERSION),
        ("manufacturer_id", c_ubyte * 32),
        ("flags", c_ulong),
        ("library_description", c_ubyte * 32),
        ("library_version", CK_VERSION),
    ]


class CK_SLOT_INFO(Structure):
    _fields_ = [
        ("slot_description", c_ubyte * 64),
        ("manufacturer_id", c_ubyte * 32),
        ("flags", c_ulong),
        ("hardware_version", CK_VERSION),
        ("firmware_version", CK_VERSION),
    ]


class CK_TOKEN_INFO(Structure):
    _fields_ = [
        ("label", c_ubyte * 32),
        ("manufacturer_id", c_ubyte * 32),
        ("model", c_ubyte * 16),
        ("serial_number", c_ubyte * 16),
        ("flags", c_ulong),
        ("max_session_count", c_ulong),
        ("session_count", c_ulong),
        ("max_rw_session_count", c_ulong),
        ("rw_session_count", c_ulong),
        ("max_pin_len", c_ulong),
        ("min_pin_len", c_ulong),
        ("total_public_memory", c_ulong),
        ("free_public_memory", c_ulong),
        ("total_private_memory", c_ulong),
        ("free_private_memory", c_ulong),
        ("hardware_version", CK_VERSION),
        ("firmware_version", CK_VERSION),
        ("utc_time", c_ubyte * 16),
    ]


class CK_SESSION_INFO(Structure):
    _fields_ = [("slot_id", c_ulong), ("state", c_ulong), ("flags", c_ulong), ("device_error", c_ulong)]


class CK_MECHANISM_INFO(Structure):
    _fields_ = [("min_key_size", c_ulong), ("max_key_size", c_ulong), ("flags", c_ulong)]


class CK_ATTRIBUTE(Structure):
    _fields_ = [("type", c_ulong), ("pValue", c_void_p), ("ulValueLen", c_ulong)]


class CK_MECHANISM(Structure):
    _fields_ = [("mechanism", c_ulong), ("pParameter", c_void_p), ("ulParameterLen", c_ulong)]


class CK_C_INITIALIZE_ARGS(Structure):
    _fields_ = [
        ("CreateMutex", c_void_p),
        ("DestroyMutex", c_void_p),
        ("LockMutex", c_void_p),
        ("UnlockMutex", c_void_p),
        ("flags", c_ulong),
        ("pReserved", c_void_p),
    ]


class CK_GCM_PARAMS(Structure):
    _fields_ = [
        ("pIv", c_void_p),
        ("ulIvLen", c_ulong),
        ("ulIvBits", c_ulong),
        ("pAAD", c_void_p),
        ("ulAADLen", c_ulong),
        ("ulTagBits", c_ulong),
    ]


class CK_RSA_PKCS_OAEP_PARAMS(Structure):
    _fields_ = [
        ("hashAlg", c_ulong),
        ("mgf", c_ulong),
        ("source", c_ulong),
        ("pSourceData", c_void_p),
        ("ulSourceDataLen", c_ulong),
    ]


class CK_RSA_PKCS_PSS_PARAMS(Structure):
    _fields_ = [("hashAlg", c_ulong), ("mgf", c_ulong), ("sLen", c_ulong)]


class CK_ECDH1_DERIVE_PARAMS(Structure):
    _fields_ = [
        ("kdf", c_ulong),
        ("ulSharedDataLen", c_ulong),
        ("pSharedData", c_void_p),
        ("ulPublicDataLen", c_ulong),
        ("pPublicData", c_void_p),
    ]


class CK_AES_CTR_PARAMS(Structure):
    _fields_ = [("ulCounterBits", c_ulong), ("cb", c_ubyte * 16)]


class CK_EDDSA_PARAMS(Structure):
    """PKCS#11 v3.0 Current Mechanisms 2.3.14 (not in the v2.40 header)."""

    _fields_ = [("phFlag", c_ubyte), ("ulContextDataLen", c_ulong), ("pContextData", c_void_p)]


_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("C_Initialize", "p"), ("C_Finalize", "p"), ("C_GetInfo", "p"), ("C_GetFunctionList", "p"),
    ("C_GetSlotList", "bpp"), ("C_GetSlotInfo", "up"), ("C_GetTokenInfo", "up"),
    ("C_GetMechanismList", "upp"), ("C_GetMechanismInfo", "uup"), ("C_InitToken", "upup"),
    ("C_InitPIN", "upu"), ("C_SetPIN", "upupu"), ("C_OpenSession", "uuppp"), ("C_CloseSession", "u"),
    ("C_CloseAllSessions", "u"), ("C_GetSessionInfo", "up"), ("C_GetOperationState", "upp"),
    ("C_SetOperationState", "upuuu"), ("C_Login", "uupu"), ("C_Logout", "u"),
    ("C_CreateObject", "upup"), ("C_CopyObject", "uupup"), ("C_DestroyObject", "uu"),
    ("C_GetObjectSize", "uup"), ("C_GetAttributeValue", "uupu"), ("C_SetAttributeValue", "uupu"),
    ("C_FindObjectsInit", "upu"), ("C_FindObjects", "upup"), ("C_FindObjectsFinal", "u"),
    ("C_EncryptInit", "upu"), ("C_Encrypt", "upupp"), ("C_EncryptUpdate", "upupp"),
    ("C_EncryptFinal", "upp"), ("C_DecryptInit", "upu"), ("C_Decrypt", "upupp"),
    ("C_DecryptUpdate", "upupp"), ("C_DecryptFinal", "upp"), ("C_DigestInit", "up"),
    ("C_Digest", "upupp"), ("C_DigestUpdate", "upu"), ("C_DigestKey", "uu"), ("C_DigestFinal", "upp"),
    ("C_SignInit", "upu"), ("C_Sign", "upupp"), ("C_SignUpdate", "upu"), ("C_SignFinal", "upp"),
    ("C_SignRecoverInit", "upu"), ("C_SignRecover", "upupp"), ("C_VerifyInit", "upu"),
    ("C_Verify", "upupu"), ("C_VerifyUpdate", "upu"), ("C_VerifyFinal", "upu"),
    ("C_VerifyRecoverInit", "upu"), ("C_VerifyRecover", "upupp"), ("C_DigestEncryptUpdate", "upupp"),
    ("C_DecryptDigestUpdate", "upupp"), ("C_SignEncryptUpdate", "upupp"),
    ("C_DecryptVerifyUpdate", "upupp"), ("C_GenerateKey", "uppup"), ("C_GenerateKeyPair", "uppupupp"),
    ("C_WrapKey", "upuupp"), ("C_UnwrapKey", "upupupup"), ("C_DeriveKey", "upupup"),
    ("C_SeedRandom", "upu"), ("C_GenerateRandom", "upu"), ("C_GetFunctionStatus", "u"),
    ("C_CancelFunction", "u"), ("C_WaitForSlotEvent", "upp"),
)  # fmt: skip

FUNCTION_NAMES: tuple[str, ...] = tuple(name for name, _ in _SIGNATURES)
assert len(FUNCTION_NAMES) == 68, "CK_FUNCTION_LIST v2.40 has 68 functions"

_C_TYPES: dict[str, type[Any]] = {"u": c_ulong, "p": c_void_p, "b": c_ubyte}


class CK_FUNCTION_LIST(Structure):
    _fields_ = [("version", CK_VERSION)] + [
        (name, ctypes.CFUNCTYPE(c_ulong, *(_C_TYPES[letter] for letter in letters))) for name, letters in _SIGNATURES
    ]


def text(raw: bytes) -> str:
    """A blank-padded PKCS#11 string as the daemon's info maps carry it."""
    return raw.decode("utf-8", "replace").rstrip(" ")


def info_map(info: Structure) -> dict[str, Any]:
    """Any of the CK_*_INFO structures above as the daemon's info map."""
    out: dict[str, Any] = {}
    for field in info._fields_:
        name = field[0]
        value = getattr(info, name)
        if isinstance(value, CK_VERSION):
            out[name] = [value.major, value.minor]
        elif isinstance(value, ctypes.Array):
            out[name] = text(bytes(value))
        else:
            out[name] = value
    return out


def buffer(size: int, keep: list[Any] | None = None) -> Any:
    """A zeroed buffer of ``size`` bytes (at least one, so never NULL); CKR_HOST_MEMORY above MAX_BUFFER."""
    if size > MAX_BUFFER:
        raise HostMemory(f"a buffer of {size} bytes is above the worker's limit")
    out = ctypes.create_string_buffer(max(size, 1))
    if keep is not None:
        keep.append(out)
    return out


def _copy(data: bytes, keep: list[Any]) -> int | None:
    """The address of a copy of ``data``; None (NULL_PTR) for empty data."""
    if not data:
        return None
    out = ctypes.create_string_buffer(data, len(data))
    keep.append(out)
    return addressof(out)


# --- templates (v2.40 Base 4.2: CK_ATTRIBUTE values) ------------------------------------------------------


def _pack_value(attr: int, value: AttrValue, keep: list[Any]) -> tuple[int, int]:
    """(address, length) of ``value`` in its C form for attribute ``attr``."""
    kind = KINDS.get(attr, Kind.BYTES)
    data: Any
    if kind is Kind.BYTES and isinstance(value, bytes):
        data, size = ctypes.create_string_buffer(value, max(len(value), 1)), len(value)
    elif kind is Kind.BOOL and isinstance(value, bool):
        data, size = c_ubyte(value), 1
    elif kind is Kind.ULONG and isinstance(value, int) and not isinstance(value, bool):
        data, size = c_ulong(value), ULONG_SIZE
    elif kind is Kind.MECHANISMS and isinstance(value, tuple):
        numbers = cast(tuple[int, ...], value)
        data, size = (c_ulong * max(len(numbers), 1))(*numbers), ULONG_SIZE * len(numbers)
    elif kind is Kind.TEMPLATE and isinstance(value, tuple):
        data, size = pack_template(value, keep), sizeof(CK_ATTRIBUTE) * len(value)  # type: ignore[arg-type]
    else:
        raise AttributeValueInvalid(f"attribute {attr:#x}: expected a {kind.name.lower()} value")
    keep.append(data)
    return addressof(data), size


def pack_template(template: Sequence[tuple[int, AttrValue]] | Mapping[int, AttrValue], keep: list[Any]) -> Any:
    """A CK_ATTRIBUTE array holding ``template`` (pairs, or a mapping); its buffers go to ``keep``."""
    pairs = list(template.items()) if isinstance(template, Mapping) else template
    array = (CK_ATTRIBUTE * len(pairs))()
    for item, (attr, value) in zip(array, pairs, strict=True):
        item.type = attr
        item.pValue, item.ulValueLen = _pack_value(attr, value, keep)
    keep.append(array)
    return array


def unpack_value(attr: int, address: int | None, size: int) -> AttrValue:
    """A value the module wrote, typed for ``attr`` by the attribute table."""
    raw = ctypes.string_at(address, size) if address and size else b""
    kind = KINDS.get(attr, Kind.BYTES)
    if kind is Kind.BOOL:
        return any(raw)  # CK_BBOOL: any non-zero byte is CK_TRUE
    if kind is Kind.ULONG:
        return int.from_bytes(raw[:ULONG_SIZE], sys.byteorder)
    if kind is Kind.MECHANISMS:
        return tuple(int.from_bytes(raw[i : i + ULONG_SIZE], sys.byteorder) for i in range(0, size - size % 8, 8))
    return raw


# --- mechanisms (CK_MECHANISM and the parameter structures of Current Mechanisms) ---------------------


def _pack_param(param: Param, keep: list[Any]) -> Any:
    if isinstance(param, GcmParams):
        iv, aad = _copy(param.iv, keep), _copy(param.aad, keep)
        return CK_GCM_PARAMS(iv, len(param.iv), param.iv_bits, aad, len(param.aad), param.tag_bits)
    if isinstance(param, OaepParams):
        source = _copy(param.source_data, keep)
        return CK_RSA_PKCS_OAEP_PARAMS(param.hash_alg, param.mgf, param.source, source, len(param.source_data))
    if isinstance(param, PssParams):
        return CK_RSA_PKCS_PSS_PARAMS(param.hash_alg, param.mgf, param.s_len)
    if isinstance(param, Ecdh1Params):
        shared, public = _copy(param.shared_data, keep), _copy(param.public_data, keep)
        return CK_ECDH1_DERIVE_PARAMS(param.kdf, len(param.shared_data), shared, len(param.public_data), public)
    if isinstance(param, CtrParams):
        if len(param.cb) != 16:
            raise MechanismParamInvalid("CK_AES_CTR_PARAMS: cb must be 16 bytes")
        return CK_AES_CTR_PARAMS(param.counter_bits, (c_ubyte * 16)(*param.cb))
    if isinstance(param, EddsaParams):
        context = _copy(param.context_data, keep)
        return CK_EDDSA_PARAMS(param.ph_flag, len(param.context_data), context)
    if isinstance(param, UlongParams):
        return c_ulong(param.value)
    raise MechanismParamInvalid(f"parameter of type {type(param).__name__} cannot be passed to a module")


# Mechanisms whose parameter structure (v2.40 Current Mechanisms) holds a pointer and that params.py does not
# model: CK_KEY_DERIVATION_STRING_DATA, CK_*_CBC_ENCRYPT_DATA_PARAMS, CK_CCM_PARAMS, CK_PBE_PARAMS,
# CK_PKCS5_PBKD2_PARAMS, CK_X9_42_*_DERIVE_PARAMS, CK_ECMQV_DERIVE_PARAMS, the SSL3/TLS derive, PRF and KDF
# parameters, CK_KEY_WRAP_SET_OAEP_PARAMS, CK_RC5_CBC_PARAMS, CK_ECDH_AES_KEY_WRAP_PARAMS,
# CK_RSA_AES_KEY_WRAP_PARAMS, CK_GOSTR3410_DERIVE_PARAMS, CK_KEA_DERIVE_PARAMS, CK_CMS_SIG_PARAMS and
# CK_DSA_PARAMETER_GEN_PARAM.
POINTER_PARAMS: frozenset[int] = frozenset({
    CKM.DES_ECB_ENCRYPT_DATA, CKM.DES_CBC_ENCRYPT_DATA, CKM.DES3_ECB_ENCRYPT_DATA, CKM.DES3_CBC_ENCRYPT_DATA,
    CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_CBC_ENCRYPT_DATA, CKM.CAMELLIA_ECB_ENCRYPT_DATA,
    CKM.CAMELLIA_CBC_ENCRYPT_DATA, CKM.ARIA_ECB_ENCRYPT_DATA, CKM.ARIA_CBC_ENCRYPT_DATA, CKM.SEED_ECB_ENCRYPT_DATA,
    CKM.SEED_CBC_ENCRYPT_DATA, CKM.CONCATENATE_BASE_AND_DATA, CKM.CONCATENATE_DATA_AND_BASE,
    CKM.XOR_BASE_AND_DATA, CKM.AES_CCM, CKM.X9_42_DH_DERIVE, CKM.X9_42_DH_HYBRID_DERIVE, CKM.X9_42_MQV_DERIVE,
    CKM.ECMQV_DERIVE, CKM.PKCS5_PBKD2, CKM.PBA_SHA1_WITH_SHA1_HMAC, CKM.PBE_MD2_DES_CBC, CKM.PBE_MD5_DES_CBC,
    CKM.PBE_MD5_CAST_CBC, CKM.PBE_MD5_CAST3_CBC, CKM.PBE_MD5_CAST128_CBC, CKM.PBE_SHA1_CAST128_CBC,
    CKM.PBE_SHA1_RC4_128, CKM.PBE_SHA1_RC4_40, CKM.PBE_SHA1_DES3_EDE_CBC, CKM.PBE_SHA1_DES2_EDE_CBC,
    CKM.PBE_SHA1_RC2_128_CBC, CKM.PBE_SHA1_RC2_40_CBC, CKM.SSL3_MASTER_KEY_DERIVE, CKM.SSL3_KEY_AND_MAC_DERIVE,
    CKM.SSL3_MASTER_KEY_DERIVE_DH, CKM.TLS_MASTER_KEY_DERIVE, CKM.TLS_KEY_AND_MAC_DERIVE,
    CKM.TLS_MASTER_KEY_DERIVE_DH, CKM.TLS_PRF, CKM.TLS12_MASTER_KEY_DERIVE, CKM.TLS12_KEY_AND_MAC_DERIVE,
    CKM.TLS12_MASTER_KEY_DERIVE_DH, CKM.TLS12_KEY_SAFE_DERIVE, CKM.TLS_KDF, CKM.TLS12_KDF,
    CKM.KEY_WRAP_SET_OAEP, CKM.RC5_CBC, CKM.RC5_CBC_PAD, CKM.ECDH_AES_KEY_WRAP, CKM.RSA_AES_KEY_WRAP,
    CKM.GOSTR3410_DERIVE, CKM.KEA_KEY_DERIVE, CKM.CMS_SIG, CKM.DSA_PROBABLISTIC_PARAMETER_GEN,
})  # fmt: skip


def pack_mechanism(mechanism: Mechanism, keep: list[Any]) -> CK_MECHANISM:
    """A CK_MECHANISM for ``mechanism``: no parameter is NULL_PTR, bytes pass unchanged, dataclasses become structs."""
    param = mechanism.param
    if param is None:
        return CK_MECHANISM(mechanism.mechanism, None, 0)
    if isinstance(param, bytes):
        if param and mechanism.mechanism in POINTER_PARAMS:
            raise MechanismParamInvalid(
                f"mechanism {mechanism.mechanism:#x}: its parameter structure holds pointers, "
                "which cannot be passed to a module in another process"
            )
        return CK_MECHANISM(mechanism.mechanism, _copy(param, keep), len(param))
    struct = _pack_param(param, keep)
    keep.append(struct)
    return CK_MECHANISM(mechanism.mechanism, addressof(struct), sizeof(struct))
