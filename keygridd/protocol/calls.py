"""THE call table: every method of the wire protocol, its arguments and result.

One entry per PKCS#11 function (same name) plus the handshake and a few
``KG_*`` convenience calls for local applications. The server's argument
checks, the Python client, the C shim's generated header and
``docs/protocol.md`` all derive from this table; a test fails when the
document disagrees.

Argument types (the codec in ``codec.py`` enforces them):

``ulong``     integer 0 .. 2**64-1          ``bool``      boolean
``bytes``     binary                          ``bytes?``    binary or nil
``str``       UTF-8 string                    ``map``       string-keyed map
``template``  array of [CKA, value] pairs, each value typed by the attribute table
``types``     array of CKA numbers            ``mechanism`` [CKM, parameter]
``outlen``    nil (no limit: return the output), -1 (C's NULL buffer: length query)
              or the caller's buffer size in bytes
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Lock(Enum):
    """How calls of one application are ordered relative to each other."""

    NONE = "none"  # runs concurrently with anything
    SESSION = "session"  # serialised per session handle (the first argument)
    APP = "app"  # serialised against every other call of the application


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Arg, ...]
    result: str
    doc: str
    lock: Lock = Lock.SESSION
    errors: tuple[str, ...] = ()

    @property
    def all_errors(self) -> tuple[str, ...]:
        """The codes this call may return: its own, then those every call of its kind may."""
        common: tuple[str, ...] = ()
        if self.args and self.args[0].name == "session":
            common = SESSION_ERRORS
        elif self.args and self.args[0].name == "slot":
            common = SLOT_ERRORS
        own = tuple(e for e in self.errors if e not in common)
        return own + tuple(e for e in common + COMMON_ERRORS if e not in own)


# Codes any call may return: a bad argument, a failing backend, an internal bug.
COMMON_ERRORS = ("CKR_ARGUMENTS_BAD", "CKR_DEVICE_ERROR", "CKR_GENERAL_ERROR")
SESSION_ERRORS = ("CKR_SESSION_HANDLE_INVALID",)
SLOT_ERRORS = ("CKR_SLOT_ID_INVALID", "CKR_TOKEN_NOT_PRESENT")

_OUT = "CKR_BUFFER_TOO_SMALL CKR_OPERATION_NOT_INITIALIZED"
_INIT = (
    "CKR_OPERATION_ACTIVE CKR_KEY_HANDLE_INVALID CKR_KEY_FUNCTION_NOT_PERMITTED CKR_KEY_TYPE_INCONSISTENT"
    " CKR_KEY_SIZE_RANGE CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID"
)
_TEMPLATE = (
    "CKR_TEMPLATE_INCOMPLETE CKR_TEMPLATE_INCONSISTENT CKR_ATTRIBUTE_TYPE_INVALID CKR_ATTRIBUTE_VALUE_INVALID"
    " CKR_ATTRIBUTE_READ_ONLY CKR_SESSION_READ_ONLY CKR_USER_NOT_LOGGED_IN"
)
_URI = "CKR_SLOT_ID_INVALID CKR_KEY_HANDLE_INVALID CKR_PIN_INCORRECT CKR_PIN_LOCKED"


def _c(name: str, args: str, result: str, doc: str, lock: Lock = Lock.SESSION, errors: str = "") -> Call:
    parsed = tuple(Arg(*a.split(":")) for a in args.split()) if args else ()
    return Call(name, parsed, result, doc, lock, tuple(errors.split()))


N, S, A = Lock.NONE, Lock.SESSION, Lock.APP

CALLS: tuple[Call, ...] = (
    _c("hello", "request:map", "map", "Handshake; must be the first request of a connection.", N),
    _c("C_GetInfo", "", "map", "CK_INFO as a map.", N),
    _c("C_GetSlotList", "token_present:bool", "[ulong]", "Slot ids this peer may use.", N),
    _c("C_GetSlotInfo", "slot:ulong", "map", "CK_SLOT_INFO as a map.", N),
    _c("C_GetTokenInfo", "slot:ulong", "map", "CK_TOKEN_INFO as a map.", N),
    _c(
        "C_WaitForSlotEvent",
        "flags:ulong",
        "ulong",
        "Only CKF_DONT_BLOCK is served: CKR_NO_EVENT.",
        N,
        errors="CKR_NO_EVENT CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c("C_GetMechanismList", "slot:ulong", "[ulong]", "Mechanisms of the slot's token.", N),
    _c(
        "C_GetMechanismInfo",
        "slot:ulong mechanism:ulong",
        "map",
        "CK_MECHANISM_INFO as a map.",
        N,
        errors="CKR_MECHANISM_INVALID",
    ),
    _c(
        "C_InitToken",
        "slot:ulong so_pin:bytes label:bytes",
        "nil",
        "Initialise the token (label blank-padded to 32).",
        A,
        errors="CKR_PIN_INCORRECT CKR_PIN_LOCKED CKR_PIN_LEN_RANGE CKR_SESSION_EXISTS",
    ),
    _c(
        "C_InitPIN",
        "session:ulong pin:bytes",
        "nil",
        "SO sets the user PIN.",
        A,
        errors="CKR_USER_NOT_LOGGED_IN CKR_SESSION_READ_ONLY CKR_PIN_LEN_RANGE",
    ),
    _c(
        "C_SetPIN",
        "session:ulong old_pin:bytes new_pin:bytes",
        "nil",
        "Change the PIN of the logged-in user.",
        A,
        errors="CKR_PIN_INCORRECT CKR_PIN_LOCKED CKR_PIN_LEN_RANGE CKR_SESSION_READ_ONLY",
    ),
    _c(
        "C_OpenSession",
        "slot:ulong flags:ulong",
        "ulong",
        "Open a session; returns its handle.",
        A,
        errors="CKR_SESSION_PARALLEL_NOT_SUPPORTED CKR_TOKEN_NOT_RECOGNIZED CKR_SESSION_READ_WRITE_SO_EXISTS",
    ),
    _c("C_CloseSession", "session:ulong", "nil", "Close a session and its operations.", A),
    _c("C_CloseAllSessions", "slot:ulong", "nil", "Close every session of this application on the slot.", A),
    _c("C_GetSessionInfo", "session:ulong", "map", "CK_SESSION_INFO as a map.", S),
    _c(
        "C_GetOperationState",
        "session:ulong",
        "bytes",
        "Not served: CKR_FUNCTION_NOT_SUPPORTED.",
        S,
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_SetOperationState",
        "session:ulong state:bytes encryption_key:ulong authentication_key:ulong",
        "nil",
        "Not served: CKR_FUNCTION_NOT_SUPPORTED.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_Login",
        "session:ulong user_type:ulong pin:bytes",
        "nil",
        "Log the application in to the token.",
        A,
        errors="CKR_PIN_INCORRECT CKR_PIN_LOCKED CKR_USER_TYPE_INVALID CKR_USER_ALREADY_LOGGED_IN CKR_USER_ANOTHER_ALREADY_LOGGED_IN CKR_USER_PIN_NOT_INITIALIZED CKR_SESSION_READ_ONLY_EXISTS CKR_OPERATION_NOT_INITIALIZED",
    ),
    _c("C_Logout", "session:ulong", "nil", "Log the application out of the token.", A, errors="CKR_USER_NOT_LOGGED_IN"),
    _c(
        "C_CreateObject",
        "session:ulong template:template",
        "ulong",
        "Create an object; returns its handle.",
        errors=_TEMPLATE,
    ),
    _c(
        "C_CopyObject",
        "session:ulong object:ulong template:template",
        "ulong",
        "Copy an object with changes.",
        errors="CKR_OBJECT_HANDLE_INVALID CKR_ACTION_PROHIBITED " + _TEMPLATE,
    ),
    _c(
        "C_DestroyObject",
        "session:ulong object:ulong",
        "nil",
        "Destroy an object.",
        errors="CKR_OBJECT_HANDLE_INVALID CKR_ACTION_PROHIBITED CKR_SESSION_READ_ONLY",
    ),
    _c(
        "C_GetObjectSize",
        "session:ulong object:ulong",
        "ulong",
        "Approximate size in bytes.",
        errors="CKR_OBJECT_HANDLE_INVALID",
    ),
    _c(
        "C_GetAttributeValue",
        "session:ulong object:ulong types:types",
        "[value|nil]",
        "One value per type, nil where unavailable; CKR_ATTRIBUTE_SENSITIVE or _TYPE_INVALID"
        " come with the partial result.",
        errors="CKR_OBJECT_HANDLE_INVALID CKR_ATTRIBUTE_SENSITIVE CKR_ATTRIBUTE_TYPE_INVALID",
    ),
    _c(
        "C_SetAttributeValue",
        "session:ulong object:ulong template:template",
        "nil",
        "Modify attributes.",
        errors="CKR_OBJECT_HANDLE_INVALID CKR_ACTION_PROHIBITED CKR_ATTRIBUTE_READ_ONLY CKR_ATTRIBUTE_TYPE_INVALID CKR_ATTRIBUTE_VALUE_INVALID CKR_SESSION_READ_ONLY",
    ),
    _c(
        "C_FindObjectsInit",
        "session:ulong template:template",
        "nil",
        "Start a search.",
        errors="CKR_OPERATION_ACTIVE CKR_ATTRIBUTE_VALUE_INVALID",
    ),
    _c(
        "C_FindObjects",
        "session:ulong max_count:ulong",
        "[ulong]",
        "Next handles of the search.",
        errors="CKR_OPERATION_NOT_INITIALIZED",
    ),
    _c("C_FindObjectsFinal", "session:ulong", "nil", "End the search.", errors="CKR_OPERATION_NOT_INITIALIZED"),
    _c("C_EncryptInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start encryption.", errors=_INIT),
    _c(
        "C_Encrypt",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Single-part encryption.",
        errors=_OUT + " CKR_OPERATION_ACTIVE CKR_DATA_LEN_RANGE CKR_USER_NOT_LOGGED_IN",
    ),
    _c(
        "C_EncryptUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Continue a multi-part encryption.",
        errors=_OUT + " CKR_DATA_LEN_RANGE",
    ),
    _c(
        "C_EncryptFinal",
        "session:ulong out_len:outlen",
        "out",
        "Finish a multi-part encryption.",
        errors=_OUT + " CKR_DATA_LEN_RANGE",
    ),
    _c("C_DecryptInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start decryption.", errors=_INIT),
    _c(
        "C_Decrypt",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Single-part decryption.",
        errors=_OUT
        + " CKR_OPERATION_ACTIVE CKR_ENCRYPTED_DATA_INVALID CKR_ENCRYPTED_DATA_LEN_RANGE CKR_USER_NOT_LOGGED_IN",
    ),
    _c(
        "C_DecryptUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Continue a multi-part decryption.",
        errors=_OUT + " CKR_ENCRYPTED_DATA_INVALID CKR_ENCRYPTED_DATA_LEN_RANGE",
    ),
    _c(
        "C_DecryptFinal",
        "session:ulong out_len:outlen",
        "out",
        "Finish a multi-part decryption.",
        errors=_OUT + " CKR_ENCRYPTED_DATA_INVALID CKR_ENCRYPTED_DATA_LEN_RANGE",
    ),
    _c(
        "C_DigestInit",
        "session:ulong mechanism:mechanism",
        "nil",
        "Start a digest.",
        errors="CKR_OPERATION_ACTIVE CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID",
    ),
    _c(
        "C_Digest",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Single-part digest.",
        errors=_OUT + " CKR_OPERATION_ACTIVE",
    ),
    _c(
        "C_DigestUpdate",
        "session:ulong data:bytes",
        "nil",
        "Continue a digest.",
        errors="CKR_OPERATION_NOT_INITIALIZED",
    ),
    _c(
        "C_DigestKey",
        "session:ulong key:ulong",
        "nil",
        "Digest a secret key's value.",
        errors="CKR_OPERATION_NOT_INITIALIZED CKR_KEY_HANDLE_INVALID CKR_KEY_INDIGESTIBLE",
    ),
    _c("C_DigestFinal", "session:ulong out_len:outlen", "out", "Finish a digest.", errors=_OUT),
    _c("C_SignInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start a signature or MAC.", errors=_INIT),
    _c(
        "C_Sign",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Single-part signature.",
        errors=_OUT + " CKR_OPERATION_ACTIVE CKR_DATA_LEN_RANGE CKR_USER_NOT_LOGGED_IN",
    ),
    _c(
        "C_SignUpdate",
        "session:ulong data:bytes",
        "nil",
        "Continue a multi-part signature.",
        errors="CKR_OPERATION_NOT_INITIALIZED",
    ),
    _c("C_SignFinal", "session:ulong out_len:outlen", "out", "Finish a multi-part signature.", errors=_OUT),
    _c(
        "C_SignRecoverInit",
        "session:ulong mechanism:mechanism key:ulong",
        "nil",
        "Start sign-recover.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_SignRecover",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Sign with recovery.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c("C_VerifyInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start verification.", errors=_INIT),
    _c(
        "C_Verify",
        "session:ulong data:bytes signature:bytes",
        "nil",
        "Single-part verification.",
        errors="CKR_OPERATION_NOT_INITIALIZED CKR_OPERATION_ACTIVE CKR_SIGNATURE_INVALID CKR_SIGNATURE_LEN_RANGE",
    ),
    _c(
        "C_VerifyUpdate",
        "session:ulong data:bytes",
        "nil",
        "Continue a multi-part verification.",
        errors="CKR_OPERATION_NOT_INITIALIZED",
    ),
    _c(
        "C_VerifyFinal",
        "session:ulong signature:bytes",
        "nil",
        "Finish a multi-part verification.",
        errors="CKR_OPERATION_NOT_INITIALIZED CKR_SIGNATURE_INVALID CKR_SIGNATURE_LEN_RANGE",
    ),
    _c(
        "C_VerifyRecoverInit",
        "session:ulong mechanism:mechanism key:ulong",
        "nil",
        "Start verify-recover.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_VerifyRecover",
        "session:ulong signature:bytes out_len:outlen",
        "out",
        "Verify with recovery.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_DigestEncryptUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Dual function.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_DecryptDigestUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Dual function.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_SignEncryptUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Dual function.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_DecryptVerifyUpdate",
        "session:ulong data:bytes out_len:outlen",
        "out",
        "Dual function.",
        errors="CKR_FUNCTION_NOT_SUPPORTED",
    ),
    _c(
        "C_GenerateKey",
        "session:ulong mechanism:mechanism template:template",
        "ulong",
        "Generate a secret key.",
        errors="CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID CKR_KEY_SIZE_RANGE " + _TEMPLATE,
    ),
    _c(
        "C_GenerateKeyPair",
        "session:ulong mechanism:mechanism public_template:template private_template:template",
        "[ulong, ulong]",
        "Generate a key pair; returns [public, private].",
        errors="CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID CKR_KEY_SIZE_RANGE CKR_CURVE_NOT_SUPPORTED "
        + _TEMPLATE,
    ),
    _c(
        "C_WrapKey",
        "session:ulong mechanism:mechanism wrapping_key:ulong key:ulong out_len:outlen",
        "out",
        "Wrap (encrypt) a key.",
        errors="CKR_WRAPPING_KEY_HANDLE_INVALID CKR_KEY_HANDLE_INVALID CKR_KEY_UNEXTRACTABLE CKR_KEY_NOT_WRAPPABLE CKR_KEY_FUNCTION_NOT_PERMITTED CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID CKR_BUFFER_TOO_SMALL",
    ),
    _c(
        "C_UnwrapKey",
        "session:ulong mechanism:mechanism unwrapping_key:ulong wrapped_key:bytes template:template",
        "ulong",
        "Unwrap a key into a new object.",
        errors="CKR_UNWRAPPING_KEY_HANDLE_INVALID CKR_WRAPPED_KEY_INVALID CKR_WRAPPED_KEY_LEN_RANGE CKR_KEY_FUNCTION_NOT_PERMITTED CKR_MECHANISM_INVALID "
        + _TEMPLATE,
    ),
    _c(
        "C_DeriveKey",
        "session:ulong mechanism:mechanism base_key:ulong template:template",
        "ulong",
        "Derive a key into a new object.",
        errors="CKR_KEY_HANDLE_INVALID CKR_KEY_FUNCTION_NOT_PERMITTED CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID "
        + _TEMPLATE,
    ),
    _c("C_SeedRandom", "session:ulong seed:bytes", "nil", "Mix seed material (accepted, not needed)."),
    _c("C_GenerateRandom", "session:ulong length:ulong", "bytes", "Random bytes from the OS CSPRNG."),
    _c(
        "C_GetFunctionStatus",
        "session:ulong",
        "nil",
        "Legacy: CKR_FUNCTION_NOT_PARALLEL.",
        errors="CKR_FUNCTION_NOT_PARALLEL",
    ),
    _c(
        "C_CancelFunction",
        "session:ulong",
        "nil",
        "Legacy: CKR_FUNCTION_NOT_PARALLEL.",
        errors="CKR_FUNCTION_NOT_PARALLEL",
    ),
    _c("KG_Ping", "", "nil", "Does nothing; measures a round trip.", N),
    _c("KG_Status", "", "map", "Daemon version, uptime and the slots this peer sees.", N),
    _c(
        "KG_Sign",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Sign with the private key a PKCS#11 URI names, in one round trip.",
        N,
        errors=_URI
        + " CKR_KEY_FUNCTION_NOT_PERMITTED CKR_KEY_TYPE_INCONSISTENT CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID",
    ),
    _c(
        "KG_Verify",
        "uri:str mechanism:mechanism data:bytes signature:bytes pin:bytes?",
        "nil",
        "Verify with the public (or private) key a URI names.",
        N,
        errors=_URI + " CKR_SIGNATURE_INVALID CKR_SIGNATURE_LEN_RANGE CKR_MECHANISM_INVALID",
    ),
    _c(
        "KG_Encrypt",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Encrypt with the key a URI names.",
        N,
        errors=_URI + " CKR_DATA_LEN_RANGE CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID",
    ),
    _c(
        "KG_Decrypt",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Decrypt with the key a URI names.",
        N,
        errors=_URI + " CKR_ENCRYPTED_DATA_INVALID CKR_MECHANISM_INVALID CKR_MECHANISM_PARAM_INVALID",
    ),
    _c(
        "KG_GetPublicKey",
        "uri:str pin:bytes?",
        "bytes",
        "DER SubjectPublicKeyInfo of the key a URI names.",
        N,
        errors=_URI,
    ),
)

BY_NAME: dict[str, Call] = {call.name: call for call in CALLS}

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
FEATURES: tuple[str, ...] = ("app-join", "outlen", "kg-uri")
