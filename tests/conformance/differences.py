"""Where a provider's token answers differently from what the suite expects, and why: THE table.

The conformance suite was written against KeyGrid's own tokens (``memory`` and
``software``): their mechanisms and their defaults. The ``pkcs11`` provider
fronts another PKCS#11 module and passes its answers through unchanged, so
where that module's token differs (a default, a mechanism it does not offer, a
different but allowed CKR), a test would fail for a reason that is the
module's. Every entry below was checked against the module loaded directly,
without KeyGrid, and it answers the same there. What KeyGrid itself does
differently from the module on purpose is what the suite expects, and is
listed in the README ("Differences from SoftHSM2 used directly").

``conftest.pytest_collection_modifyitems`` applies the table per provider:

* ``OFFERED``: the mechanisms of the provider's slot 0. A test that needs a
  mechanism -- a ``mech`` parameter, or a ``mechanisms`` marker -- is not
  generated (it is deselected) for a provider that does not offer it. For
  KeyGrid's tokens that is the mechanism registry; for SoftHSM2 its
  C_GetMechanismList, frozen here and checked against the live slot by
  ``test_offered_mechanisms_are_the_slots_list``.
* ``DESELECTED``: tests that do not apply to a provider for another reason
  (pattern -> reason).
* ``EXPECTED_FAILURES``: tests that apply, where the token answers
  differently: pattern -> (the exact exception, reason). They run as strict
  xfail, so a change in the module's behaviour fails the run.
* ``UNCOVERED``: mechanisms the slot lists without a passing round trip in
  ``test_mechanism_flags_are_honoured``, and why: where else they are
  exercised, or why KeyGrid's wire cannot carry them.

A pattern is a test name with its parameters but without the provider and
door ids: ``test_rsa_oaep`` (any parameters), ``test_rsa_pss[sha1]``; ``*``
matches anything (``test_aes_gcm[*]``).
"""

from __future__ import annotations

import re

from keygridd.mechanisms import REGISTRY
from keygridd.pkcs11 import CKM
from keygridd.pkcs11.errors import (
    ArgumentsBad,
    AttributeValueInvalid,
    GeneralError,
    KeyIndigestible,
    MechanismInvalid,
    MechanismParamInvalid,
    OperationNotInitialized,
)

SOFTHSM = "pkcs11-softhsm"
KEYGRID_TOKENS = ("memory", "software-lmdb", "software-filesystem", "software-postgresql")

# C_GetMechanismList of a SoftHSM2 2.6.1 token (Debian's softhsm2, OpenSSL backend).
SOFTHSM_MECHANISMS: frozenset[int] = frozenset({
    CKM.RSA_PKCS_KEY_PAIR_GEN, CKM.RSA_PKCS, CKM.RSA_X_509, CKM.MD5_RSA_PKCS, CKM.SHA1_RSA_PKCS,
    CKM.RSA_PKCS_OAEP, CKM.RSA_PKCS_PSS, CKM.SHA1_RSA_PKCS_PSS, CKM.DSA_KEY_PAIR_GEN, CKM.DSA,
    CKM.DSA_SHA1, CKM.DSA_SHA224, CKM.DSA_SHA256, CKM.DSA_SHA384, CKM.DSA_SHA512, CKM.DH_PKCS_KEY_PAIR_GEN,
    CKM.DH_PKCS_DERIVE, CKM.SHA256_RSA_PKCS, CKM.SHA384_RSA_PKCS, CKM.SHA512_RSA_PKCS,
    CKM.SHA256_RSA_PKCS_PSS, CKM.SHA384_RSA_PKCS_PSS, CKM.SHA512_RSA_PKCS_PSS, CKM.SHA224_RSA_PKCS,
    CKM.SHA224_RSA_PKCS_PSS, CKM.DES_KEY_GEN, CKM.DES_ECB, CKM.DES_CBC, CKM.DES_CBC_PAD, CKM.DES2_KEY_GEN,
    CKM.DES3_KEY_GEN, CKM.DES3_ECB, CKM.DES3_CBC, CKM.DES3_CBC_PAD, CKM.DES3_CMAC, CKM.MD5, CKM.MD5_HMAC,
    CKM.SHA_1, CKM.SHA_1_HMAC, CKM.SHA256, CKM.SHA256_HMAC, CKM.SHA224, CKM.SHA224_HMAC, CKM.SHA384,
    CKM.SHA384_HMAC, CKM.SHA512, CKM.SHA512_HMAC, CKM.GENERIC_SECRET_KEY_GEN, CKM.EC_KEY_PAIR_GEN, CKM.ECDSA,
    CKM.ECDH1_DERIVE, CKM.EC_EDWARDS_KEY_PAIR_GEN, CKM.EDDSA, CKM.AES_KEY_GEN, CKM.AES_ECB, CKM.AES_CBC,
    CKM.AES_CBC_PAD, CKM.AES_CTR, CKM.AES_GCM, CKM.AES_CMAC, CKM.AES_KEY_WRAP, CKM.AES_KEY_WRAP_PAD,
    CKM.DES_ECB_ENCRYPT_DATA, CKM.DES_CBC_ENCRYPT_DATA, CKM.DES3_ECB_ENCRYPT_DATA, CKM.DES3_CBC_ENCRYPT_DATA,
    CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_CBC_ENCRYPT_DATA, CKM.DSA_PARAMETER_GEN, CKM.DH_PKCS_PARAMETER_GEN,
})  # fmt: skip

OFFERED: dict[str, frozenset[int]] = {
    **{provider: frozenset(REGISTRY) for provider in KEYGRID_TOKENS},
    SOFTHSM: SOFTHSM_MECHANISMS,
}

# Tests that need a mechanism say so and are deselected through OFFERED; this is for other reasons.
DESELECTED: dict[str, dict[str, str]] = {}

_POINTER_PARAMS = (
    "its parameter (CK_KEY_DERIVATION_STRING_DATA, CK_*_CBC_ENCRYPT_DATA_PARAMS) points to the data: KeyGrid's "
    "wire carries the structures of keygridd.pkcs11.params.PARAM_TYPES and raw bytes for other mechanisms, and a "
    "pointer means nothing in the module's process, so the worker refuses it with CKR_MECHANISM_PARAM_INVALID "
    "(test_a_parameter_holding_a_pointer_is_refused)"
)
_WRAP_ONLY = "SoftHSM2 flags it CKF_WRAP without CKF_UNWRAP (it wraps with it but does not unwrap)"
_NO_SINGLE_DES = (
    "SoftHSM2 2.6.1 lists single DES but answers every use with CKR_MECHANISM_INVALID (single DES is in "
    "OpenSSL 3's legacy provider, which its OpenSSL backend does not load)"
)
_OAEP = "SoftHSM2 2.6.1 does CKM_RSA_PKCS_OAEP only with CKM_SHA_1, CKG_MGF1_SHA1 and no label (else CKR_ARGUMENTS_BAD)"
_PSS_MGF = "SoftHSM2 requires the MGF1 hash of RSA PSS to be the message hash (here MGF1-SHA512): CKR_ARGUMENTS_BAD"
_GCM_TAG = (
    "SoftHSM2 answers a GCM tag that does not verify with CKR_GENERAL_ERROR (KeyGrid: CKR_ENCRYPTED_DATA_INVALID)"
)
_CLASS = (
    "SoftHSM2 answers a CKA_CLASS that contradicts the mechanism with CKR_ATTRIBUTE_VALUE_INVALID "
    "(KeyGrid: CKR_TEMPLATE_INCONSISTENT)"
)

EXPECTED_FAILURES: dict[str, dict[str, tuple[type[BaseException], str]]] = {
    SOFTHSM: {
        # Token defaults (v2.40 leaves them to the token; KeyGrid's tokens take the safe side).
        "test_generated_key_pair_origin": (
            AssertionError,
            "SoftHSM2 defaults CKA_SENSITIVE of a generated private key to CK_FALSE (so CKA_ALWAYS_SENSITIVE "
            "is false); KeyGrid's tokens to CK_TRUE",
        ),
        "test_create_read_and_destroy": (
            AssertionError,
            "SoftHSM2 defaults CKA_PRIVATE of a data object to CK_TRUE; KeyGrid's tokens to CK_FALSE",
        ),
        # Sizes and values SoftHSM2 accepts and KeyGrid's tokens refuse.
        "test_rsa_private_components_are_sensitive": (
            AssertionError,
            "SoftHSM2 generates RSA-512 keys (512..16384 bits); KeyGrid's tokens answer CKR_KEY_SIZE_RANGE below 1024",
        ),
        "test_import_with_wrong_components": (
            AssertionError,
            "SoftHSM2 accepts a 20-byte CKA_VALUE for a CKK_AES key (KeyGrid: CKR_ATTRIBUTE_VALUE_INVALID)",
        ),
        "test_key_wrap_of_a_key_of_unwrappable_length": (
            AssertionError,
            "SoftHSM2 wraps a 20-byte key with CKM_AES_KEY_WRAP by zero-padding it to 24 bytes "
            "(KeyGrid: CKR_KEY_SIZE_RANGE, RFC 3394 takes multiples of 8 bytes)",
        ),
        "test_digest_key_of_a_private_key_is_indigestible": (
            AssertionError,
            "SoftHSM2's C_DigestKey digests the private value of an EC key (KeyGrid: CKR_KEY_INDIGESTIBLE)",
        ),
        # Checks SoftHSM2 leaves to the operation itself.
        "test_wrong_key_type_is_key_type_inconsistent": (
            AssertionError,
            "SoftHSM2's C_SignInit/C_VerifyInit accept a key of the wrong type for CKM_ECDSA, CKM_RSA_PKCS, "
            "CKM_EDDSA and CKM_SHA256_RSA_PKCS; the C_Sign that follows fails with CKR_GENERAL_ERROR",
        ),
        "test_mechanism_and_key_checks_at_init": (
            AssertionError,
            "SoftHSM2's C_SignInit accepts CKM_SHA256_RSA_PKCS with an EC key (C_Sign: CKR_GENERAL_ERROR)",
        ),
        "test_encrypt_decrypt_multipart": (
            AssertionError,
            "SoftHSM2 lets C_Encrypt finish what C_EncryptUpdate started (KeyGrid: CKR_OPERATION_ACTIVE)",
        ),
        "test_always_authenticate_key_needs_context_login": (
            OperationNotInitialized,
            "SoftHSM2 ends the signing operation when C_Sign fails with CKR_USER_NOT_LOGGED_IN (v2.40: an error "
            "of C_Sign ends it), so the CKU_CONTEXT_SPECIFIC login after it finds no operation; KeyGrid's tokens "
            "keep the operation for that login",
        ),
        "test_digest[MD5]": (
            KeyIndigestible,
            "SoftHSM2's C_DigestKey digests a sensitive or non-extractable key under SHA-1/SHA-2 only "
            "(CKM_MD5: CKR_KEY_INDIGESTIBLE, and the digest operation stays active)",
        ),
        "test_logout_ends_operations_on_private_keys": (
            AssertionError,
            "SoftHSM2 lets a signing operation go on after C_Logout (v2.40 C_Logout allows either)",
        ),
        # Other CKR codes for the same failure.
        "test_class_contradicting_the_mechanism_is_template_inconsistent": (AttributeValueInvalid, _CLASS),
        "test_derive_class_contradicting_the_mechanism": (AttributeValueInvalid, _CLASS),
        "test_template_errors": (
            AttributeValueInvalid,
            "SoftHSM2 answers a CKO_SECRET_KEY of CKK_RSA with CKR_ATTRIBUTE_VALUE_INVALID "
            "(KeyGrid: CKR_TEMPLATE_INCONSISTENT)",
        ),
        "test_bad_mechanism_parameters": (
            MechanismInvalid,
            "SoftHSM2 answers bad parameters with CKR_MECHANISM_INVALID (CKM_AES_CBC with an 8-byte IV) or "
            "CKR_ARGUMENTS_BAD, and takes some (a parameter for CKM_AES_ECB or CKM_ECDSA, a PSS sLen above the "
            "maximum); KeyGrid: CKR_MECHANISM_PARAM_INVALID",
        ),
        "test_rsa_pkcs_sign_and_encrypt": (
            GeneralError,
            "SoftHSM2 answers CKM_RSA_PKCS encryption of more than k-11 bytes with CKR_GENERAL_ERROR "
            "(KeyGrid: CKR_DATA_LEN_RANGE)",
        ),
        "test_aes_gcm[*]": (GeneralError, _GCM_TAG),
        "test_decrypt_error_ends_the_operation": (GeneralError, _GCM_TAG),
        # Parameters SoftHSM2 does not take.
        "test_rsa_oaep": (ArgumentsBad, _OAEP),
        "test_imported_rsa_key_works_and_is_not_local": (ArgumentsBad, f"{_OAEP}; here SHA-256"),
        "test_rsa_wraps_a_secret_key": (ArgumentsBad, f"{_OAEP}; here SHA-256 with a label"),
        "test_rsa_pss[sha1]": (ArgumentsBad, _PSS_MGF),
        "test_rsa_pss[sha224]": (ArgumentsBad, _PSS_MGF),
        "test_rsa_pss[sha256]": (ArgumentsBad, _PSS_MGF),
        "test_rsa_pss[sha384]": (ArgumentsBad, _PSS_MGF),
        "test_ecdh_derive_matches_cryptography": (
            MechanismParamInvalid,
            "SoftHSM2 derives with CKD_NULL only (here CKD_SHA256_KDF)",
        ),
        # Mechanisms SoftHSM2 flags or serves differently.
        "test_aes_key_wrap[AES_KEY_WRAP]": (
            MechanismInvalid,
            "SoftHSM2 does CKM_AES_KEY_WRAP in C_WrapKey/C_UnwrapKey only, as its flags say (no CKF_ENCRYPT); "
            "KeyGrid's tokens also encrypt with it",
        ),
        "test_mechanism_flags_are_honoured[AES_CBC]": (AssertionError, _WRAP_ONLY),
        "test_mechanism_flags_are_honoured[DES3_CBC]": (AssertionError, _WRAP_ONLY),
        "test_mechanism_flags_are_honoured[DES_ECB]": (AssertionError, f"{_WRAP_ONLY}; {_NO_SINGLE_DES}"),
        "test_mechanism_flags_are_honoured[DES_CBC]": (AssertionError, f"{_WRAP_ONLY}; {_NO_SINGLE_DES}"),
        "test_mechanism_flags_are_honoured[DES_CBC_PAD]": (AssertionError, f"{_WRAP_ONLY}; {_NO_SINGLE_DES}"),
        "test_mechanism_list_and_info": (
            AssertionError,
            "the test expects KeyGrid's mechanisms (CKM_SHA3_256) and RSA key sizes (1024..4096); SoftHSM2 "
            "2.6.1 has no SHA-3 and generates RSA keys of 512..16384 bits",
        ),
    },
}

UNCOVERED: dict[str, dict[int, str]] = {
    SOFTHSM: {
        CKM.AES_ECB_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.AES_CBC_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.DES_ECB_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.DES_CBC_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.DES3_ECB_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.DES3_CBC_ENCRYPT_DATA: _POINTER_PARAMS,
        CKM.AES_CBC: f"{_WRAP_ONLY}; its encryption is exercised by test_aes_modes[AES_CBC-*]",
        CKM.DES3_CBC: f"{_WRAP_ONLY}; its encryption is exercised by test_des3_modes[DES3_CBC]",
        CKM.DES_ECB: _NO_SINGLE_DES,
        CKM.DES_CBC: _NO_SINGLE_DES,
        CKM.DES_CBC_PAD: _NO_SINGLE_DES,
    },
}


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` (``test_x[params]``, or ``test_x``) is one the pattern names."""
    if "[" not in pattern:
        name = name.split("[", 1)[0]
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name) is not None


def deselected(provider: str, name: str) -> str | None:
    """Why the test is not generated for the provider, or None."""
    return next((why for pattern, why in DESELECTED.get(provider, {}).items() if matches(pattern, name)), None)


def expected_failure(provider: str, name: str) -> tuple[type[BaseException], str] | None:
    """(exception, reason) of a test that fails for the provider, or None."""
    entries = EXPECTED_FAILURES.get(provider, {})
    return next((entry for pattern, entry in entries.items() if matches(pattern, name)), None)


def mechanism_name(mech: int) -> str:
    return CKM(mech).name if mech in CKM._value2member_map_ else hex(mech)


def not_offered(provider: str, needed: set[int]) -> list[str]:
    """The names of the ``needed`` mechanisms the provider does not offer."""
    offered = OFFERED.get(provider)
    return [] if offered is None else [mechanism_name(m) for m in sorted(needed - offered)]
