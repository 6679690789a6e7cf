"""The root of the PKCS#11 error hierarchy.

Inside KeyGrid every failure that PKCS#11 names is raised as a subclass of
``PKCS11Error`` (one per CKR code, in ``_errors.py``); the dispatcher turns it
into a ``CK_RV`` exactly once. Messages must never contain PINs or key bytes.
"""

from __future__ import annotations

from typing import ClassVar


class PKCS11Error(Exception):
    """A PKCS#11 failure carrying its CK_RV."""

    rv: ClassVar[int] = 0x5  # CKR_GENERAL_ERROR unless a subclass says otherwise

    def __init__(self, message: str = "", result: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result  # a partial result the spec returns with this code (C_GetAttributeValue)

    def __str__(self) -> str:
        from keygridd.pkcs11._constants import CKR

        try:
            name = str(CKR(self.rv))
        except ValueError:
            name = f"CKR_{self.rv:#x}"
        return f"{name}: {self.message}" if self.message else name
