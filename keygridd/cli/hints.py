"""The errors the CLI reports itself and the one-line hint printed with each failure.

``CliError`` is a failure the CLI found (exit 1), ``UsageError`` a bad command
line (exit 2). PKCS#11 errors from the daemon are shown by their CKR name with
a hint from ``HINTS`` (one table, keyed by CKR).
"""

from __future__ import annotations

from keygridd.pkcs11 import CKR
from keygridd.pkcs11.errorbase import PKCS11Error

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure found by the CLI: printed as ``keygrid: <message>`` with an optional hint; exit 1."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CliError):
    """The command line is wrong; exit 2."""

    exit_code = EXIT_USAGE


HINTS: dict[int, str] = {
    CKR.PIN_INCORRECT: "check the PIN (--pin-file, KEYGRID_PIN or the prompt)",
    CKR.PIN_LOCKED: "the PIN is locked: the Security Officer must set a new user PIN",
    CKR.PIN_EXPIRED: "the PIN has expired: set a new one",
    CKR.PIN_LEN_RANGE: "the PIN is too short or too long for this token",
    CKR.PIN_INVALID: "the PIN has characters this token does not accept",
    CKR.USER_NOT_LOGGED_IN: "this needs the user PIN: use --pin-file, set KEYGRID_PIN, or run on a terminal",
    CKR.USER_PIN_NOT_INITIALIZED: "the user PIN is not set: run 'keygrid token init' (or C_InitPIN as SO)",
    CKR.USER_ALREADY_LOGGED_IN: "another login is active on this connection",
    CKR.USER_ANOTHER_ALREADY_LOGGED_IN: "the Security Officer is logged in on this token",
    CKR.TOKEN_NOT_PRESENT: "no token in this slot: check 'keygrid slots'",
    CKR.TOKEN_NOT_RECOGNIZED: "the token is not initialised: run 'keygrid token init'",
    CKR.SLOT_ID_INVALID: "no such slot (or not visible to you): check 'keygrid slots'",
    CKR.OBJECT_HANDLE_INVALID: "the object is gone: list keys again with 'keygrid keys list'",
    CKR.KEY_HANDLE_INVALID: "the key is gone: list keys again with 'keygrid keys list'",
    CKR.KEY_TYPE_INCONSISTENT: "this mechanism does not fit the key type: pick another --mechanism",
    CKR.KEY_FUNCTION_NOT_PERMITTED: "the key does not allow this operation (CKA_SIGN, CKA_DECRYPT, ...)",
    CKR.MECHANISM_INVALID: "the token does not offer this mechanism",
    CKR.MECHANISM_PARAM_INVALID: "the mechanism parameters are wrong for this key",
    CKR.SIGNATURE_INVALID: "the signature does not match the data",
    CKR.SIGNATURE_LEN_RANGE: "the signature has the wrong length for this key",
    CKR.DATA_LEN_RANGE: "the input is too long (or too short) for this key and mechanism",
    CKR.ENCRYPTED_DATA_INVALID: "the ciphertext is damaged or was made with another key",
    CKR.ENCRYPTED_DATA_LEN_RANGE: "the ciphertext has the wrong length",
    CKR.TEMPLATE_INCONSISTENT: "the token rejected the key attributes",
    CKR.ATTRIBUTE_VALUE_INVALID: "the token rejected an attribute value",
    CKR.SESSION_READ_ONLY: "the token is read-only",
    CKR.TOKEN_WRITE_PROTECTED: "the token is write-protected",
    CKR.DEVICE_ERROR: "the key store failed: see the keygridd log",
    CKR.DEVICE_REMOVED: "the token went away: see the keygridd log",
    CKR.FUNCTION_NOT_SUPPORTED: "this provider does not support that operation",
    CKR.GENERAL_ERROR: "keygridd failed: see its log",
}


def hint_for(error: PKCS11Error) -> str | None:
    """The one-line hint for ``error``, or None."""
    return HINTS.get(error.rv)


def ckr_name(error: PKCS11Error) -> str:
    """``CKR_PIN_INCORRECT`` for a PinIncorrect error (``CKR_0x80000001`` for unknown vendor codes)."""
    try:
        return str(CKR(error.rv))
    except ValueError:
        return f"CKR_{error.rv:#x}"
