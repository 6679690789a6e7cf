"""PKCS#11 errors: the exception classes and the CKR <-> exception table.

``error_for(rv)`` gives the exception class for any CK_RV (vendor codes get a
dynamically made subclass so the number survives the round trip).
"""

from __future__ import annotations

from keygridd.pkcs11._errors import *  # noqa: F403 - the generated classes are this module's API
from keygridd.pkcs11._errors import ERRORS
from keygridd.pkcs11.errorbase import PKCS11Error

_vendor: dict[int, type[PKCS11Error]] = {}


def error_for(rv: int) -> type[PKCS11Error]:
    """The exception class raised for ``rv`` (never for CKR_OK)."""
    cls = ERRORS.get(rv)
    if cls is not None:
        return cls
    cls = _vendor.get(rv)
    if cls is None:
        cls = type(f"VendorError_{rv:#x}", (PKCS11Error,), {"rv": rv})
        _vendor[rv] = cls
    return cls


def raise_for(rv: int, message: str = "") -> None:
    """Raise the exception for ``rv`` unless it is CKR_OK."""
    if rv != 0:
        raise error_for(rv)(message)


__all__ = ["ERRORS", "PKCS11Error", "error_for", "raise_for"]
