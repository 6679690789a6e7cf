"""Mechanism parameter structures, one frozen dataclass per CK_*_PARAMS type.

These are the parameter *types* of PKCS#11 v2.40 Current Mechanisms (and v3.0
for CK_EDDSA_PARAMS). A mechanism's parameter is one of these, raw bytes
(an IV, or any parameter without pointers, passed through unchanged), or None.
Which mechanisms take which type is ``PARAM_TYPES`` below; mechanisms not
listed take raw bytes, so any mechanism a provider offers can cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from keygridd.pkcs11._constants import CKD, CKG, CKM, CKZ


class ParamType(IntEnum):
    """Wire tag of a structured parameter (docs/protocol.md, "Mechanisms")."""

    GCM = 1
    OAEP = 2
    PSS = 3
    ECDH1 = 4
    CTR = 5
    EDDSA = 6
    ULONG = 7


@dataclass(frozen=True, slots=True)
class GcmParams:
    """CK_GCM_PARAMS (Current Mechanisms 2.12.3)."""

    iv: bytes
    aad: bytes = b""
    tag_bits: int = 128
    iv_bits: int = 0


@dataclass(frozen=True, slots=True)
class OaepParams:
    """CK_RSA_PKCS_OAEP_PARAMS (Current Mechanisms 2.1.8)."""

    hash_alg: int = CKM.SHA_1
    mgf: int = CKG.MGF1_SHA1
    source: int = CKZ.DATA_SPECIFIED
    source_data: bytes = b""


@dataclass(frozen=True, slots=True)
class PssParams:
    """CK_RSA_PKCS_PSS_PARAMS (Current Mechanisms 2.1.10)."""

    hash_alg: int
    mgf: int
    s_len: int


@dataclass(frozen=True, slots=True)
class Ecdh1Params:
    """CK_ECDH1_DERIVE_PARAMS (Current Mechanisms 2.3.15)."""

    kdf: int = CKD.NULL
    shared_data: bytes = b""
    public_data: bytes = b""


@dataclass(frozen=True, slots=True)
class CtrParams:
    """CK_AES_CTR_PARAMS (Current Mechanisms 2.10.3): counter bits and the 16-byte block."""

    counter_bits: int
    cb: bytes


@dataclass(frozen=True, slots=True)
class EddsaParams:
    """CK_EDDSA_PARAMS (PKCS#11 v3.0 Current Mechanisms 2.3.14)."""

    ph_flag: bool = False
    context_data: bytes = b""


@dataclass(frozen=True, slots=True)
class UlongParams:
    """A parameter that is a single CK_ULONG (CK_MAC_GENERAL_PARAMS and the like)."""

    value: int


Param = GcmParams | OaepParams | PssParams | Ecdh1Params | CtrParams | EddsaParams | UlongParams | bytes | None


@dataclass(frozen=True, slots=True)
class Mechanism:
    """CK_MECHANISM: a mechanism number and its parameter."""

    mechanism: int
    param: Param = None


_HMAC_GENERAL = [
    CKM.MD5_HMAC_GENERAL,
    CKM.SHA_1_HMAC_GENERAL,
    CKM.SHA224_HMAC_GENERAL,
    CKM.SHA256_HMAC_GENERAL,
    CKM.SHA384_HMAC_GENERAL,
    CKM.SHA512_HMAC_GENERAL,
    CKM.SHA3_224_HMAC_GENERAL,
    CKM.SHA3_256_HMAC_GENERAL,
    CKM.SHA3_384_HMAC_GENERAL,
    CKM.SHA3_512_HMAC_GENERAL,
    CKM.AES_MAC_GENERAL,
]

_PSS = [
    CKM.RSA_PKCS_PSS,
    CKM.SHA1_RSA_PKCS_PSS,
    CKM.SHA224_RSA_PKCS_PSS,
    CKM.SHA256_RSA_PKCS_PSS,
    CKM.SHA384_RSA_PKCS_PSS,
    CKM.SHA512_RSA_PKCS_PSS,
    CKM.SHA3_224_RSA_PKCS_PSS,
    CKM.SHA3_256_RSA_PKCS_PSS,
    CKM.SHA3_384_RSA_PKCS_PSS,
    CKM.SHA3_512_RSA_PKCS_PSS,
]

# Mechanism number -> structured parameter type. THE table: the C shim's copy is generated from it.
PARAM_TYPES: dict[int, ParamType] = {
    CKM.AES_GCM: ParamType.GCM,
    CKM.RSA_PKCS_OAEP: ParamType.OAEP,
    **{m: ParamType.PSS for m in _PSS},
    CKM.ECDH1_DERIVE: ParamType.ECDH1,
    CKM.ECDH1_COFACTOR_DERIVE: ParamType.ECDH1,
    CKM.AES_CTR: ParamType.CTR,
    CKM.EDDSA: ParamType.EDDSA,
    **{m: ParamType.ULONG for m in _HMAC_GENERAL},
}

PARAM_CLASSES: dict[ParamType, type] = {
    ParamType.GCM: GcmParams,
    ParamType.OAEP: OaepParams,
    ParamType.PSS: PssParams,
    ParamType.ECDH1: Ecdh1Params,
    ParamType.CTR: CtrParams,
    ParamType.EDDSA: EddsaParams,
    ParamType.ULONG: UlongParams,
}
