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


def _c(name: str, args: str, result: str, doc: str, lock: Lock = Lock.SESSION) -> Call:
    parsed = tuple(Arg(*a.split(":")) for a in args.split()) if args else ()
    return Call(name, parsed, result, doc, lock)


N, S, A = Lock.NONE, Lock.SESSION, Lock.APP

CALLS: tuple[Call, ...] = (
    _c("hello", "request:map", "map", "Handshake; must be the first request of a connection.", N),
    _c("C_GetInfo", "", "map", "CK_INFO as a map.", N),
    _c("C_GetSlotList", "token_present:bool", "[ulong]", "Slot ids this peer may use.", N),
    _c("C_GetSlotInfo", "slot:ulong", "map", "CK_SLOT_INFO as a map.", N),
    _c("C_GetTokenInfo", "slot:ulong", "map", "CK_TOKEN_INFO as a map.", N),
    _c("C_WaitForSlotEvent", "flags:ulong", "ulong", "Only CKF_DONT_BLOCK is served: CKR_NO_EVENT.", N),
    _c("C_GetMechanismList", "slot:ulong", "[ulong]", "Mechanisms of the slot's token.", N),
    _c("C_GetMechanismInfo", "slot:ulong mechanism:ulong", "map", "CK_MECHANISM_INFO as a map.", N),
    _c(
        "C_InitToken",
        "slot:ulong so_pin:bytes label:bytes",
        "nil",
        "Initialise the token (label blank-padded to 32).",
        A,
    ),
    _c("C_InitPIN", "session:ulong pin:bytes", "nil", "SO sets the user PIN.", A),
    _c("C_SetPIN", "session:ulong old_pin:bytes new_pin:bytes", "nil", "Change the PIN of the logged-in user.", A),
    _c("C_OpenSession", "slot:ulong flags:ulong", "ulong", "Open a session; returns its handle.", A),
    _c("C_CloseSession", "session:ulong", "nil", "Close a session and its operations.", A),
    _c("C_CloseAllSessions", "slot:ulong", "nil", "Close every session of this application on the slot.", A),
    _c("C_GetSessionInfo", "session:ulong", "map", "CK_SESSION_INFO as a map.", S),
    _c("C_GetOperationState", "session:ulong", "bytes", "Not served: CKR_FUNCTION_NOT_SUPPORTED.", S),
    _c(
        "C_SetOperationState",
        "session:ulong state:bytes encryption_key:ulong authentication_key:ulong",
        "nil",
        "Not served: CKR_FUNCTION_NOT_SUPPORTED.",
    ),
    _c("C_Login", "session:ulong user_type:ulong pin:bytes", "nil", "Log the application in to the token.", A),
    _c("C_Logout", "session:ulong", "nil", "Log the application out of the token.", A),
    _c("C_CreateObject", "session:ulong template:template", "ulong", "Create an object; returns its handle."),
    _c("C_CopyObject", "session:ulong object:ulong template:template", "ulong", "Copy an object with changes."),
    _c("C_DestroyObject", "session:ulong object:ulong", "nil", "Destroy an object."),
    _c("C_GetObjectSize", "session:ulong object:ulong", "ulong", "Approximate size in bytes."),
    _c(
        "C_GetAttributeValue",
        "session:ulong object:ulong types:types",
        "[value|nil]",
        "One value per type, nil where unavailable; CKR_ATTRIBUTE_SENSITIVE or _TYPE_INVALID"
        " come with the partial result.",
    ),
    _c("C_SetAttributeValue", "session:ulong object:ulong template:template", "nil", "Modify attributes."),
    _c("C_FindObjectsInit", "session:ulong template:template", "nil", "Start a search."),
    _c("C_FindObjects", "session:ulong max_count:ulong", "[ulong]", "Next handles of the search."),
    _c("C_FindObjectsFinal", "session:ulong", "nil", "End the search."),
    _c("C_EncryptInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start encryption."),
    _c("C_Encrypt", "session:ulong data:bytes out_len:outlen", "out", "Single-part encryption."),
    _c("C_EncryptUpdate", "session:ulong data:bytes out_len:outlen", "out", "Continue a multi-part encryption."),
    _c("C_EncryptFinal", "session:ulong out_len:outlen", "out", "Finish a multi-part encryption."),
    _c("C_DecryptInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start decryption."),
    _c("C_Decrypt", "session:ulong data:bytes out_len:outlen", "out", "Single-part decryption."),
    _c("C_DecryptUpdate", "session:ulong data:bytes out_len:outlen", "out", "Continue a multi-part decryption."),
    _c("C_DecryptFinal", "session:ulong out_len:outlen", "out", "Finish a multi-part decryption."),
    _c("C_DigestInit", "session:ulong mechanism:mechanism", "nil", "Start a digest."),
    _c("C_Digest", "session:ulong data:bytes out_len:outlen", "out", "Single-part digest."),
    _c("C_DigestUpdate", "session:ulong data:bytes", "nil", "Continue a digest."),
    _c("C_DigestKey", "session:ulong key:ulong", "nil", "Digest a secret key's value."),
    _c("C_DigestFinal", "session:ulong out_len:outlen", "out", "Finish a digest."),
    _c("C_SignInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start a signature or MAC."),
    _c("C_Sign", "session:ulong data:bytes out_len:outlen", "out", "Single-part signature."),
    _c("C_SignUpdate", "session:ulong data:bytes", "nil", "Continue a multi-part signature."),
    _c("C_SignFinal", "session:ulong out_len:outlen", "out", "Finish a multi-part signature."),
    _c("C_SignRecoverInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start sign-recover."),
    _c("C_SignRecover", "session:ulong data:bytes out_len:outlen", "out", "Sign with recovery."),
    _c("C_VerifyInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start verification."),
    _c("C_Verify", "session:ulong data:bytes signature:bytes", "nil", "Single-part verification."),
    _c("C_VerifyUpdate", "session:ulong data:bytes", "nil", "Continue a multi-part verification."),
    _c("C_VerifyFinal", "session:ulong signature:bytes", "nil", "Finish a multi-part verification."),
    _c("C_VerifyRecoverInit", "session:ulong mechanism:mechanism key:ulong", "nil", "Start verify-recover."),
    _c("C_VerifyRecover", "session:ulong signature:bytes out_len:outlen", "out", "Verify with recovery."),
    _c("C_DigestEncryptUpdate", "session:ulong data:bytes out_len:outlen", "out", "Dual function."),
    _c("C_DecryptDigestUpdate", "session:ulong data:bytes out_len:outlen", "out", "Dual function."),
    _c("C_SignEncryptUpdate", "session:ulong data:bytes out_len:outlen", "out", "Dual function."),
    _c("C_DecryptVerifyUpdate", "session:ulong data:bytes out_len:outlen", "out", "Dual function."),
    _c("C_GenerateKey", "session:ulong mechanism:mechanism template:template", "ulong", "Generate a secret key."),
    _c(
        "C_GenerateKeyPair",
        "session:ulong mechanism:mechanism public_template:template private_template:template",
        "[ulong, ulong]",
        "Generate a key pair; returns [public, private].",
    ),
    _c(
        "C_WrapKey",
        "session:ulong mechanism:mechanism wrapping_key:ulong key:ulong out_len:outlen",
        "out",
        "Wrap (encrypt) a key.",
    ),
    _c(
        "C_UnwrapKey",
        "session:ulong mechanism:mechanism unwrapping_key:ulong wrapped_key:bytes template:template",
        "ulong",
        "Unwrap a key into a new object.",
    ),
    _c(
        "C_DeriveKey",
        "session:ulong mechanism:mechanism base_key:ulong template:template",
        "ulong",
        "Derive a key into a new object.",
    ),
    _c("C_SeedRandom", "session:ulong seed:bytes", "nil", "Mix seed material (accepted, not needed)."),
    _c("C_GenerateRandom", "session:ulong length:ulong", "bytes", "Random bytes from the OS CSPRNG."),
    _c("C_GetFunctionStatus", "session:ulong", "nil", "Legacy: CKR_FUNCTION_NOT_PARALLEL."),
    _c("C_CancelFunction", "session:ulong", "nil", "Legacy: CKR_FUNCTION_NOT_PARALLEL."),
    _c("KG_Ping", "", "nil", "Does nothing; measures a round trip.", N),
    _c("KG_Status", "", "map", "Daemon version, uptime and the slots this peer sees.", N),
    _c(
        "KG_Sign",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Sign with the private key a PKCS#11 URI names, in one round trip.",
        N,
    ),
    _c(
        "KG_Verify",
        "uri:str mechanism:mechanism data:bytes signature:bytes pin:bytes?",
        "nil",
        "Verify with the public (or private) key a URI names.",
        N,
    ),
    _c(
        "KG_Encrypt",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Encrypt with the key a URI names.",
        N,
    ),
    _c(
        "KG_Decrypt",
        "uri:str mechanism:mechanism data:bytes pin:bytes?",
        "bytes",
        "Decrypt with the key a URI names.",
        N,
    ),
    _c("KG_GetPublicKey", "uri:str pin:bytes?", "bytes", "DER SubjectPublicKeyInfo of the key a URI names.", N),
)

BY_NAME: dict[str, Call] = {call.name: call for call in CALLS}

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
FEATURES: tuple[str, ...] = ("app-join", "outlen", "kg-uri")
