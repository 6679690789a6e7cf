"""The attribute codec table: how each CKA_* value is typed.

PKCS#11 attribute values are byte strings whose layout depends on the
attribute (v2.40 Base 4.2, table 10 onwards). KeyGrid carries them typed:

* ``BOOL``       CK_BBOOL            -> Python ``bool``
* ``ULONG``      CK_ULONG            -> ``int`` (0 .. 2**64-1)
* ``BYTES``      byte arrays, UTF-8 strings, big integers, DER, CK_DATE -> ``bytes``
* ``MECHANISMS`` CK_MECHANISM_TYPE[] -> ``tuple[int, ...]``
* ``TEMPLATE``   CK_ATTRIBUTE[]      -> ``tuple[tuple[int, value], ...]``

Attributes not listed are ``BYTES``, so vendor attributes pass unchanged.
This is THE table: the protocol codec and the C shim (via its generated header)
both read it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Union

from keygridd.pkcs11._constants import CKA


class Kind(IntEnum):
    BYTES = 0
    BOOL = 1
    ULONG = 2
    MECHANISMS = 3
    TEMPLATE = 4


AttrValue = Union[bool, int, bytes, tuple[int, ...], tuple[tuple[int, "AttrValue"], ...]]  # noqa: UP007 - recursive alias needs Union

_BOOL = (
    CKA.TOKEN, CKA.PRIVATE, CKA.TRUSTED, CKA.SENSITIVE, CKA.ENCRYPT, CKA.DECRYPT, CKA.WRAP,
    CKA.UNWRAP, CKA.SIGN, CKA.SIGN_RECOVER, CKA.VERIFY, CKA.VERIFY_RECOVER, CKA.DERIVE,
    CKA.EXTRACTABLE, CKA.LOCAL, CKA.NEVER_EXTRACTABLE, CKA.ALWAYS_SENSITIVE, CKA.MODIFIABLE,
    CKA.COPYABLE, CKA.DESTROYABLE, CKA.SECONDARY_AUTH, CKA.ALWAYS_AUTHENTICATE,
    CKA.WRAP_WITH_TRUSTED, CKA.OTP_USER_FRIENDLY_MODE, CKA.RESET_ON_INIT, CKA.HAS_RESET,
    CKA.COLOR,
)  # fmt: skip

_ULONG = (
    CKA.CLASS, CKA.CERTIFICATE_TYPE, CKA.CERTIFICATE_CATEGORY, CKA.JAVA_MIDP_SECURITY_DOMAIN,
    CKA.NAME_HASH_ALGORITHM, CKA.KEY_TYPE, CKA.MODULUS_BITS, CKA.PRIME_BITS, CKA.SUB_PRIME_BITS,
    CKA.VALUE_BITS, CKA.VALUE_LEN, CKA.KEY_GEN_MECHANISM, CKA.AUTH_PIN_FLAGS, CKA.OTP_FORMAT,
    CKA.OTP_LENGTH, CKA.OTP_TIME_INTERVAL, CKA.OTP_CHALLENGE_REQUIREMENT,
    CKA.OTP_TIME_REQUIREMENT, CKA.OTP_COUNTER_REQUIREMENT, CKA.OTP_PIN_REQUIREMENT,
    CKA.OTP_SERVICE_LOGO_TYPE, CKA.HW_FEATURE_TYPE, CKA.PIXEL_X, CKA.PIXEL_Y, CKA.RESOLUTION,
    CKA.CHAR_ROWS, CKA.CHAR_COLUMNS, CKA.BITS_PER_PIXEL, CKA.MECHANISM_TYPE, CKA.PROFILE_ID,
)  # fmt: skip

KINDS: dict[int, Kind] = {
    **{a: Kind.BOOL for a in _BOOL},
    **{a: Kind.ULONG for a in _ULONG},
    CKA.ALLOWED_MECHANISMS: Kind.MECHANISMS,
    CKA.WRAP_TEMPLATE: Kind.TEMPLATE,
    CKA.UNWRAP_TEMPLATE: Kind.TEMPLATE,
    CKA.DERIVE_TEMPLATE: Kind.TEMPLATE,
}

ULONG_MAX = 2**64 - 1


def kind_of(attr: int) -> Kind:
    """The value kind of attribute type ``attr`` (BYTES when not listed)."""
    return KINDS.get(attr, Kind.BYTES)


def valid_value(attr: int, value: object) -> bool:
    """True when ``value`` has the Python type the table gives ``attr``."""
    kind = KINDS.get(attr, Kind.BYTES)
    if kind is Kind.BYTES:
        return isinstance(value, bytes)
    if kind is Kind.BOOL:
        return isinstance(value, bool)
    if kind is Kind.ULONG:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ULONG_MAX
    if kind is Kind.MECHANISMS:
        return isinstance(value, tuple) and all(
            isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= ULONG_MAX for m in value
        )
    return isinstance(value, tuple) and all(
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int) and valid_value(pair[0], pair[1])
        for pair in value
    )
