"""PKCS#11 vocabulary only: constants, errors, attribute kinds, parameters, URIs.

Nothing here does I/O or holds state.
"""

from keygridd.pkcs11._constants import CKA, CKC, CKD, CKG, CKH, CKK, CKM, CKO, CKR, CKS, CKU, CKZ
from keygridd.pkcs11.attributes import AttrValue, Kind, kind_of
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.flags import MechanismFlag, SessionFlag, SlotFlag, TokenFlag

__all__ = [
    "CKA", "CKC", "CKD", "CKG", "CKH", "CKK", "CKM", "CKO", "CKR", "CKS", "CKU", "CKZ",
    "AttrValue", "Kind", "MechanismFlag", "PKCS11Error", "SessionFlag", "SlotFlag", "TokenFlag", "kind_of",
]  # fmt: skip
