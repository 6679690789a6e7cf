"""The attribute policy table (PKCS#11 v2.40 Base 4.4-4.9, footnotes of table 10).

For every object class (and key type) the attributes it may carry, each with
the spec's footnote flags:

1 ``REQ_CREATE``  must be given to C_CreateObject
2 ``NO_CREATE``   must not be given to C_CreateObject
3 ``REQ_GEN``     must be given to C_GenerateKey(Pair)
4 ``NO_GEN``      must not be given to C_GenerateKey(Pair)
5 ``REQ_UNWRAP``  must be given to C_UnwrapKey
6 ``NO_UNWRAP``   must not be given to C_UnwrapKey
7 ``SENSITIVE``   not revealed while CKA_SENSITIVE is true or CKA_EXTRACTABLE false
8 ``MODIFIABLE``  may change with C_SetAttributeValue / C_CopyObject
10 ``SO_TRUE``    only the SO may set it to true
11 ``STICKY_TRUE``  cannot change once true
12 ``STICKY_FALSE`` cannot change once false
``COPY``          may change in C_CopyObject only (CKA_TOKEN, CKA_PRIVATE, ...)

plus the default each attribute takes when a template omits it. The core's
object functions consult only this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntFlag

from keygridd.pkcs11 import CKA, CKK, CKO
from keygridd.pkcs11.attributes import AttrValue


class F(IntFlag):
    REQ_CREATE = 1 << 1
    NO_CREATE = 1 << 2
    REQ_GEN = 1 << 3
    NO_GEN = 1 << 4
    REQ_UNWRAP = 1 << 5
    NO_UNWRAP = 1 << 6
    SENSITIVE = 1 << 7
    MODIFIABLE = 1 << 8
    SO_TRUE = 1 << 10
    STICKY_TRUE = 1 << 11
    STICKY_FALSE = 1 << 12
    COPY = 1 << 13
    SET_BY_TOKEN = NO_CREATE | NO_GEN | NO_UNWRAP


@dataclass(frozen=True, slots=True)
class Rule:
    flags: F
    default: AttrValue | None = None  # None: absent unless given


M = F.MODIFIABLE
_STORAGE: dict[CKA, Rule] = {
    CKA.CLASS: Rule(F.REQ_CREATE),
    CKA.TOKEN: Rule(F.COPY, False),
    CKA.PRIVATE: Rule(F.COPY, False),
    CKA.MODIFIABLE: Rule(F.COPY | F.STICKY_FALSE, True),
    CKA.LABEL: Rule(M, b""),
    CKA.COPYABLE: Rule(F.COPY | F.STICKY_FALSE, True),
    CKA.DESTROYABLE: Rule(F.COPY | M, True),
    CKA.UNIQUE_ID: Rule(F.SET_BY_TOKEN),
}

_DATA: dict[CKA, Rule] = {
    CKA.APPLICATION: Rule(M, b""),
    CKA.OBJECT_ID: Rule(M, b""),
    CKA.VALUE: Rule(M, b""),
}

_CERTIFICATE: dict[CKA, Rule] = {
    CKA.CERTIFICATE_TYPE: Rule(F.REQ_CREATE),
    CKA.TRUSTED: Rule(F.SO_TRUE, False),
    CKA.CERTIFICATE_CATEGORY: Rule(M, 0),
    CKA.CHECK_VALUE: Rule(F(0)),
    CKA.START_DATE: Rule(M, b""),
    CKA.END_DATE: Rule(M, b""),
    CKA.PUBLIC_KEY_INFO: Rule(F(0), b""),
    # X.509 public key certificate (4.6.3)
    CKA.SUBJECT: Rule(F.REQ_CREATE),
    CKA.ID: Rule(M, b""),
    CKA.ISSUER: Rule(M, b""),
    CKA.SERIAL_NUMBER: Rule(M, b""),
    CKA.VALUE: Rule(F.REQ_CREATE),
    CKA.URL: Rule(F(0), b""),
    CKA.HASH_OF_SUBJECT_PUBLIC_KEY: Rule(F(0), b""),
    CKA.HASH_OF_ISSUER_PUBLIC_KEY: Rule(F(0), b""),
    CKA.JAVA_MIDP_SECURITY_DOMAIN: Rule(F(0), 0),
    CKA.NAME_HASH_ALGORITHM: Rule(F(0)),
}

_KEY: dict[CKA, Rule] = {
    CKA.KEY_TYPE: Rule(F.REQ_CREATE | F.REQ_UNWRAP),
    CKA.ID: Rule(M, b""),
    CKA.START_DATE: Rule(M, b""),
    CKA.END_DATE: Rule(M, b""),
    CKA.DERIVE: Rule(M, False),
    CKA.LOCAL: Rule(F.SET_BY_TOKEN),
    CKA.KEY_GEN_MECHANISM: Rule(F.SET_BY_TOKEN),
    CKA.ALLOWED_MECHANISMS: Rule(F(0), ()),
}

_PUBLIC: dict[CKA, Rule] = {
    CKA.SUBJECT: Rule(M, b""),
    CKA.ENCRYPT: Rule(M, True),
    CKA.VERIFY: Rule(M, True),
    CKA.VERIFY_RECOVER: Rule(M, True),
    CKA.WRAP: Rule(M, True),
    CKA.TRUSTED: Rule(F.SO_TRUE, False),
    CKA.WRAP_TEMPLATE: Rule(F(0), ()),
    CKA.PUBLIC_KEY_INFO: Rule(F(0)),
}

_PRIVATE: dict[CKA, Rule] = {
    CKA.SUBJECT: Rule(M, b""),
    CKA.SENSITIVE: Rule(M | F.STICKY_TRUE, True),
    CKA.DECRYPT: Rule(M, True),
    CKA.SIGN: Rule(M, True),
    CKA.SIGN_RECOVER: Rule(M, True),
    CKA.UNWRAP: Rule(M, True),
    CKA.EXTRACTABLE: Rule(M | F.STICKY_FALSE, False),
    CKA.ALWAYS_SENSITIVE: Rule(F.SET_BY_TOKEN),
    CKA.NEVER_EXTRACTABLE: Rule(F.SET_BY_TOKEN),
    CKA.WRAP_WITH_TRUSTED: Rule(M | F.STICKY_TRUE, False),
    CKA.UNWRAP_TEMPLATE: Rule(F(0), ()),
    CKA.ALWAYS_AUTHENTICATE: Rule(F(0), False),
    CKA.PUBLIC_KEY_INFO: Rule(F(0)),
}

_SECRET: dict[CKA, Rule] = {
    CKA.SENSITIVE: Rule(M | F.STICKY_TRUE, True),
    CKA.ENCRYPT: Rule(M, True),
    CKA.DECRYPT: Rule(M, True),
    CKA.SIGN: Rule(M, True),
    CKA.VERIFY: Rule(M, True),
    CKA.WRAP: Rule(M, True),
    CKA.UNWRAP: Rule(M, True),
    CKA.EXTRACTABLE: Rule(M | F.STICKY_FALSE, False),
    CKA.ALWAYS_SENSITIVE: Rule(F.SET_BY_TOKEN),
    CKA.NEVER_EXTRACTABLE: Rule(F.SET_BY_TOKEN),
    CKA.CHECK_VALUE: Rule(F(0)),
    CKA.WRAP_WITH_TRUSTED: Rule(M | F.STICKY_TRUE, False),
    CKA.TRUSTED: Rule(F.SO_TRUE, False),
    CKA.WRAP_TEMPLATE: Rule(F(0), ()),
    CKA.UNWRAP_TEMPLATE: Rule(F(0), ()),
}

_MATERIAL = F.REQ_CREATE | F.NO_GEN | F.NO_UNWRAP
_SECRET_MATERIAL = _MATERIAL | F.SENSITIVE

_RSA_PUBLIC = {
    CKA.MODULUS: Rule(F.REQ_CREATE | F.NO_GEN),
    CKA.MODULUS_BITS: Rule(F.NO_CREATE | F.REQ_GEN),
    CKA.PUBLIC_EXPONENT: Rule(F.REQ_CREATE),
}
_RSA_PRIVATE = {
    CKA.MODULUS: Rule(_MATERIAL),
    CKA.PUBLIC_EXPONENT: Rule(F.NO_GEN | F.NO_UNWRAP),
    CKA.PRIVATE_EXPONENT: Rule(_SECRET_MATERIAL),
    CKA.PRIME_1: Rule(F.NO_GEN | F.NO_UNWRAP | F.SENSITIVE),
    CKA.PRIME_2: Rule(F.NO_GEN | F.NO_UNWRAP | F.SENSITIVE),
    CKA.EXPONENT_1: Rule(F.NO_GEN | F.NO_UNWRAP | F.SENSITIVE),
    CKA.EXPONENT_2: Rule(F.NO_GEN | F.NO_UNWRAP | F.SENSITIVE),
    CKA.COEFFICIENT: Rule(F.NO_GEN | F.NO_UNWRAP | F.SENSITIVE),
}
_EC_PUBLIC = {CKA.EC_PARAMS: Rule(F.REQ_CREATE | F.REQ_GEN), CKA.EC_POINT: Rule(F.REQ_CREATE | F.NO_GEN)}
_EC_PRIVATE = {CKA.EC_PARAMS: Rule(_MATERIAL), CKA.VALUE: Rule(_SECRET_MATERIAL)}
_SECRET_VALUE = {
    CKA.VALUE: Rule(_SECRET_MATERIAL),
    CKA.VALUE_LEN: Rule(F.NO_CREATE | F(0)),
}

_KEY_TYPES: dict[tuple[int, int], dict[CKA, Rule]] = {
    (CKO.PUBLIC_KEY, CKK.RSA): _RSA_PUBLIC,
    (CKO.PRIVATE_KEY, CKK.RSA): _RSA_PRIVATE,
    (CKO.PUBLIC_KEY, CKK.EC): _EC_PUBLIC,
    (CKO.PRIVATE_KEY, CKK.EC): _EC_PRIVATE,
    (CKO.PUBLIC_KEY, CKK.EC_EDWARDS): _EC_PUBLIC,
    (CKO.PRIVATE_KEY, CKK.EC_EDWARDS): _EC_PRIVATE,
}
for _kt in (
    CKK.AES,
    CKK.GENERIC_SECRET,
    CKK.SHA_1_HMAC,
    CKK.SHA224_HMAC,
    CKK.SHA256_HMAC,
    CKK.SHA384_HMAC,
    CKK.SHA512_HMAC,
    CKK.SHA3_224_HMAC,
    CKK.SHA3_256_HMAC,
    CKK.SHA3_384_HMAC,
    CKK.SHA3_512_HMAC,
):
    _KEY_TYPES[(CKO.SECRET_KEY, _kt)] = _SECRET_VALUE

_CLASSES: dict[int, dict[CKA, Rule]] = {
    CKO.DATA: {**_STORAGE, **_DATA},
    CKO.CERTIFICATE: {**_STORAGE, **_CERTIFICATE},
    CKO.PUBLIC_KEY: {**_STORAGE, **_KEY, **_PUBLIC},
    CKO.PRIVATE_KEY: {**_STORAGE, **_KEY, **_PRIVATE},
    CKO.SECRET_KEY: {**_STORAGE, **_KEY, **_SECRET},
}

# Private and secret keys default to private objects; the rest to public ones.
_PRIVATE_BY_DEFAULT = {CKO.PRIVATE_KEY, CKO.SECRET_KEY}

_cache: dict[tuple[int, int | None], dict[int, Rule]] = {}


def known_class(cls: int) -> bool:
    return cls in _CLASSES


def known_key_type(cls: int, key_type: int) -> bool:
    return (cls, key_type) in _KEY_TYPES


def rules(cls: int, key_type: int | None) -> Mapping[int, Rule]:
    """Every attribute an object of this class (and key type) carries, with its rule."""
    key = (cls, key_type)
    cached = _cache.get(key)
    if cached is None:
        found: dict[int, Rule] = {int(a): r for a, r in _CLASSES.get(cls, _STORAGE).items()}
        if key_type is not None:
            found.update({int(a): r for a, r in _KEY_TYPES.get((cls, key_type), {}).items()})
        if cls in _PRIVATE_BY_DEFAULT:
            found[CKA.PRIVATE] = Rule(F.COPY, True)
        _cache[key] = cached = found
    return cached


_sensitive: dict[tuple[int, int | None], frozenset[int]] = {}


def is_sensitive_attribute(cls: int, key_type: int | None, attr: int) -> bool:
    key = (cls, key_type)
    found = _sensitive.get(key)
    if found is None:
        found = _sensitive[key] = frozenset(a for a, rule in rules(cls, key_type).items() if rule.flags & F.SENSITIVE)
    return attr in found
