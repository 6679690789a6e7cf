"""Key management (PKCS#11 v2.40 Base 4.7-4.9 and 5.13-5.14): generation, import, wrap/unwrap, derive.

Generated keys carry CKA_LOCAL, CKA_KEY_GEN_MECHANISM, CKA_ALWAYS_SENSITIVE and
CKA_NEVER_EXTRACTABLE as Base 4.8-4.9 define them; imported, unwrapped and
derived keys are not local; sensitive components are never revealed; usage
attributes, CKA_ALLOWED_MECHANISMS, key types, mechanism parameters and
templates are enforced with the codes the spec names for each function.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from keygridd.pkcs11 import CKA, CKD, CKG, CKK, CKM, CKO, CKR
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.params import CtrParams, Ecdh1Params, GcmParams, Mechanism, OaepParams, PssParams
from tests.conformance.conftest import ckr
from tests.conformance.helpers import (
    ED25519,
    P256,
    P384,
    P521,
    SECP256K1,
    aes_template,
    ec_import,
    ec_public,
    ec_templates,
    octet_string,
    raw_point,
    read_attr,
    read_attrs,
    rsa_import,
    rsa_templates,
    secret_import,
    secret_template,
)

DATA = b"key management conformance data"
UNAVAILABLE = 2**64 - 1  # CK_UNAVAILABLE_INFORMATION
EC_GEN = Mechanism(CKM.EC_KEY_PAIR_GEN)
AES_GEN = Mechanism(CKM.AES_KEY_GEN)
ECB = Mechanism(CKM.AES_ECB)
ECDSA = Mechanism(CKM.ECDSA)
DIGEST = hashlib.sha256(DATA).digest()


def _encrypt(p11: Any, session: int, key: int, block: bytes, mech: Mechanism = ECB) -> bytes:
    p11.C_EncryptInit(session, mech, key)
    return bytes(p11.C_Encrypt(session, block))


def _same_aes_key(p11: Any, session: int, a: int, b: int) -> bool:
    block = os.urandom(16)
    return _encrypt(p11, session, a, block) == _encrypt(p11, session, b, block)


def _ec_sign_verifies(p11: Any, session: int, priv: int, pub: int) -> None:
    p11.C_SignInit(session, ECDSA, priv)
    signature = p11.C_Sign(session, DIGEST)
    p11.C_VerifyInit(session, ECDSA, pub)
    p11.C_Verify(session, DIGEST, signature)


# --- generation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sensitive", "extractable"), [(True, False), (True, True), (False, True), (False, False)])
def test_generated_secret_key_origin(p11: Any, session: int, sensitive: bool, extractable: bool) -> None:
    key = p11.C_GenerateKey(session, AES_GEN, aes_template(32, sensitive=sensitive, extractable=extractable))
    local, mech, always, never, value_len = read_attrs(
        p11, session, key, CKA.LOCAL, CKA.KEY_GEN_MECHANISM, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE, CKA.VALUE_LEN
    )
    assert (local, mech, value_len) == (True, CKM.AES_KEY_GEN, 32)
    assert (always, never) == (sensitive, not extractable)
    value = read_attr(p11, session, key, CKA.VALUE)
    if sensitive or not extractable:
        assert value is None
    else:
        assert isinstance(value, bytes) and len(value) == 32


def test_generated_key_pair_origin(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256))
    for handle in (pub, priv):
        assert read_attrs(p11, session, handle, CKA.LOCAL, CKA.KEY_GEN_MECHANISM) == [True, CKM.EC_KEY_PAIR_GEN]
    assert read_attrs(p11, session, priv, CKA.SENSITIVE, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE) == [
        True, True, True,
    ]  # fmt: skip
    assert read_attr(p11, session, priv, CKA.VALUE) is None
    assert read_attr(p11, session, pub, CKA.EC_PARAMS) == P256.params
    _ec_sign_verifies(p11, session, priv, pub)
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, sensitive=False, extractable=True))
    assert read_attrs(p11, session, priv, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE) == [False, False]
    assert isinstance(read_attr(p11, session, priv, CKA.VALUE), bytes)


def test_rsa_private_components_are_sensitive(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(1024))
    hidden = (CKA.PRIVATE_EXPONENT, CKA.PRIME_1, CKA.PRIME_2, CKA.EXPONENT_1, CKA.EXPONENT_2, CKA.COEFFICIENT)
    assert read_attrs(p11, session, priv, *hidden) == [None] * len(hidden)
    modulus, exponent = read_attrs(p11, session, priv, CKA.MODULUS, CKA.PUBLIC_EXPONENT)
    assert modulus == read_attr(p11, session, pub, CKA.MODULUS) and exponent == b"\x01\x00\x01"
    with ckr(CKR.KEY_SIZE_RANGE):
        p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(512))


def test_secp256k1_and_p521_generation(p11: Any, session: int) -> None:
    for curve in (SECP256K1, P521):
        pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(curve))
        key = ec_public(p11, session, pub, curve)
        assert key.curve.name == curve.curve.name  # type: ignore[union-attr]
        _ec_sign_verifies(p11, session, priv, pub)


# --- template rules at generation --------------------------------------------------------------------------


def test_missing_generation_attributes_are_template_incomplete(p11: Any, session: int) -> None:
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_GenerateKeyPair(session, EC_GEN, {CKA.TOKEN: False}, {CKA.TOKEN: False})
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), {CKA.PUBLIC_EXPONENT: b"\x01\x00\x01"}, {})
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_GenerateKey(session, AES_GEN, secret_template(CKK.AES))


def test_token_set_attributes_are_read_only(p11: Any, session: int) -> None:
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_GenerateKey(session, AES_GEN, aes_template(16, value=bytes(16)))
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_GenerateKey(session, AES_GEN, aes_template(16, local=False))
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, public={CKA.EC_POINT: b"\x04\x01\x00"}))
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, always_sensitive=True))


def test_class_contradicting_the_mechanism_is_template_inconsistent(p11: Any, session: int) -> None:
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_GenerateKey(session, AES_GEN, {**aes_template(16), CKA.CLASS: CKO.PRIVATE_KEY})
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_GenerateKey(session, AES_GEN, aes_template(16) | {CKA.KEY_TYPE: CKK.GENERIC_SECRET})
    pub, priv = ec_templates(P256)
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_GenerateKeyPair(session, EC_GEN, {**pub, CKA.CLASS: CKO.SECRET_KEY}, priv)
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_GenerateKeyPair(session, EC_GEN, pub, {**priv, CKA.CLASS: CKO.PUBLIC_KEY})
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_GenerateKeyPair(session, EC_GEN, pub, {**priv, CKA.KEY_TYPE: CKK.RSA})


# --- import ------------------------------------------------------------------------------------------------


def test_imported_rsa_key_works_and_is_not_local(p11: Any, session: int) -> None:
    local = rsa.generate_private_key(65537, 2048)
    for crt in (True, False):
        pub_t, priv_t = rsa_import(local, crt=crt)
        pub, priv = p11.C_CreateObject(session, pub_t), p11.C_CreateObject(session, priv_t)
        for handle in (pub, priv):
            assert read_attrs(p11, session, handle, CKA.LOCAL, CKA.KEY_GEN_MECHANISM) == [False, UNAVAILABLE]
        assert read_attrs(p11, session, priv, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE) == [False, False]
        assert read_attr(p11, session, pub, CKA.MODULUS_BITS) == 2048
        assert read_attr(p11, session, priv, CKA.PRIVATE_EXPONENT) is None
        pss = PssParams(CKM.SHA256, CKG.MGF1_SHA256, 32)
        p11.C_SignInit(session, Mechanism(CKM.SHA256_RSA_PKCS_PSS, pss), priv)
        signature = p11.C_Sign(session, DATA)
        local.public_key().verify(signature, DATA, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        p11.C_VerifyInit(session, Mechanism(CKM.SHA256_RSA_PKCS_PSS, pss), pub)
        p11.C_Verify(session, DATA, signature)
        oaep = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA256, CKG.MGF1_SHA256))
        p11.C_DecryptInit(session, oaep, priv)
        pad = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
        assert p11.C_Decrypt(session, local.public_key().encrypt(DATA, pad)) == DATA


@pytest.mark.mechanisms(CKM.ECDSA_SHA384)
def test_imported_ec_key_works_and_is_not_local(p11: Any, session: int) -> None:
    local = ec.generate_private_key(ec.SECP384R1())
    pub_t, priv_t = ec_import(local, P384)
    pub, priv = p11.C_CreateObject(session, pub_t), p11.C_CreateObject(session, priv_t)
    assert read_attr(p11, session, priv, CKA.LOCAL) is False
    assert read_attr(p11, session, priv, CKA.VALUE) is None
    p11.C_SignInit(session, Mechanism(CKM.ECDSA_SHA384), priv)
    signature = p11.C_Sign(session, DATA)
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    local.public_key().verify(utils.encode_dss_signature(r, s), DATA, ec.ECDSA(hashes.SHA384()))
    der = local.sign(DATA, ec.ECDSA(hashes.SHA384()))
    r, s = utils.decode_dss_signature(der)
    p11.C_VerifyInit(session, Mechanism(CKM.ECDSA_SHA384), pub)
    p11.C_Verify(session, DATA, r.to_bytes(48, "big") + s.to_bytes(48, "big"))


def test_imported_aes_key_works_and_is_not_local(p11: Any, session: int) -> None:
    value = os.urandom(24)
    key = p11.C_CreateObject(session, secret_import(CKK.AES, value))
    local, always, never, value_len = read_attrs(
        p11, session, key, CKA.LOCAL, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE, CKA.VALUE_LEN
    )
    assert (local, always, never, value_len) == (False, False, False, 24)
    assert read_attr(p11, session, key, CKA.VALUE) is None
    iv = os.urandom(12)
    assert _encrypt(p11, session, key, DATA, Mechanism(CKM.AES_GCM, GcmParams(iv))) == AESGCM(value).encrypt(
        iv, DATA, None
    )
    readable = p11.C_CreateObject(session, secret_import(CKK.AES, value, sensitive=False, extractable=True))
    assert read_attr(p11, session, readable, CKA.VALUE) == value


def test_import_with_wrong_components(p11: Any, session: int) -> None:
    with ckr(CKR.ATTRIBUTE_VALUE_INVALID):
        p11.C_CreateObject(session, secret_import(CKK.AES, bytes(20)))
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_CreateObject(session, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.TOKEN: False})
    with ckr(CKR.ATTRIBUTE_READ_ONLY):
        p11.C_CreateObject(session, secret_import(CKK.AES, bytes(16), local=True))


# --- usage rules -------------------------------------------------------------------------------------------


def test_usage_attributes_are_enforced(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, sign=False, public={CKA.VERIFY: False}))
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_SignInit(session, ECDSA, priv)
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_VerifyInit(session, ECDSA, pub)
    key = p11.C_GenerateKey(session, AES_GEN, aes_template(16, encrypt=False, decrypt=False, derive=False))
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_EncryptInit(session, ECB, key)
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_DecryptInit(session, ECB, key)
    _, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256))  # CKA_DERIVE defaults to false
    params = Ecdh1Params(public_data=raw_point(p11, session, pub))
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_DeriveKey(session, Mechanism(CKM.ECDH1_DERIVE, params), priv, secret_template(CKK.GENERIC_SECRET))
    # The operation was not started: a new init succeeds.
    p11.C_SignInit(session, ECDSA, priv)
    p11.C_Sign(session, DIGEST)


@pytest.mark.mechanisms(CKM.AES_KEY_WRAP_KWP)
def test_allowed_mechanisms_restrict(p11: Any, session: int) -> None:
    key = p11.C_GenerateKey(session, AES_GEN, aes_template(16, allowed_mechanisms=(CKM.AES_GCM, CKM.AES_CTR)))
    assert read_attr(p11, session, key, CKA.ALLOWED_MECHANISMS) == (CKM.AES_GCM, CKM.AES_CTR)
    with ckr(CKR.MECHANISM_INVALID):
        p11.C_EncryptInit(session, ECB, key)
    with ckr(CKR.MECHANISM_INVALID):
        p11.C_SignInit(session, Mechanism(CKM.SHA256_HMAC), key)
    _encrypt(p11, session, key, DATA, Mechanism(CKM.AES_GCM, GcmParams(bytes(12))))
    _encrypt(p11, session, key, DATA, Mechanism(CKM.AES_CTR, CtrParams(64, bytes(16))))
    kek = p11.C_GenerateKey(session, AES_GEN, aes_template(16, allowed_mechanisms=(CKM.AES_KEY_WRAP,)))
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(16, extractable=True))
    with ckr(CKR.MECHANISM_INVALID):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP_KWP), kek, target)
    p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, target)


def test_wrong_key_type_is_key_type_inconsistent(p11: Any, session: int) -> None:
    ec_pub, ec_priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256))
    aes = p11.C_GenerateKey(session, AES_GEN, aes_template(16))
    cases = [
        (p11.C_SignInit, Mechanism(CKM.ECDSA), aes),
        (p11.C_SignInit, Mechanism(CKM.RSA_PKCS), ec_priv),
        (p11.C_SignInit, Mechanism(CKM.SHA256_HMAC), ec_priv),
        (p11.C_SignInit, Mechanism(CKM.EDDSA), ec_priv),
        (p11.C_VerifyInit, Mechanism(CKM.SHA256_RSA_PKCS), ec_pub),
        (p11.C_EncryptInit, Mechanism(CKM.AES_CBC, bytes(16)), ec_pub),
        (p11.C_EncryptInit, Mechanism(CKM.RSA_PKCS), aes),
    ]
    for init, mech, key in cases:
        with ckr(CKR.KEY_TYPE_INCONSISTENT):
            init(session, mech, key)


def test_bad_mechanism_parameters(p11: Any, session: int) -> None:
    aes = p11.C_GenerateKey(session, AES_GEN, aes_template(16))
    _, ec_priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, derive=True))
    _, rsa_priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(1024))
    cases = [
        (p11.C_EncryptInit, Mechanism(CKM.AES_CBC, bytes(8)), aes),
        (p11.C_EncryptInit, Mechanism(CKM.AES_CBC), aes),
        (p11.C_EncryptInit, Mechanism(CKM.AES_GCM, GcmParams(bytes(12), b"", 20)), aes),
        (p11.C_EncryptInit, Mechanism(CKM.AES_CTR, CtrParams(0, bytes(16))), aes),
        (p11.C_EncryptInit, Mechanism(CKM.AES_ECB, bytes(16)), aes),
        (p11.C_SignInit, Mechanism(CKM.ECDSA, b"\x01"), ec_priv),
        (p11.C_SignInit, Mechanism(CKM.RSA_PKCS_PSS), rsa_priv),
        (p11.C_SignInit, Mechanism(CKM.SHA256_RSA_PKCS_PSS, PssParams(CKM.SHA_1, CKG.MGF1_SHA1, 20)), rsa_priv),
        (p11.C_SignInit, Mechanism(CKM.RSA_PKCS_PSS, PssParams(CKM.SHA256, CKG.MGF1_SHA256, 1000)), rsa_priv),
        (p11.C_SignInit, Mechanism(CKM.RSA_PKCS_PSS, PssParams(CKM.SHA256, 0x77, 32)), rsa_priv),
        (p11.C_DecryptInit, Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.AES_ECB, CKG.MGF1_SHA1)), rsa_priv),
    ]
    for init, mech, key in cases:
        with ckr(CKR.MECHANISM_PARAM_INVALID):
            init(session, mech, key)
    bad_point = Mechanism(CKM.ECDH1_DERIVE, Ecdh1Params(public_data=b"\x04" + bytes(64)))
    with ckr(CKR.MECHANISM_PARAM_INVALID):
        p11.C_DeriveKey(session, bad_point, ec_priv, secret_template(CKK.GENERIC_SECRET))


# --- wrap and unwrap ---------------------------------------------------------------------------------------


@pytest.mark.mechanisms(CKM.AES_KEY_WRAP_KWP)
def test_wrap_rules(p11: Any, session: int) -> None:
    kek = p11.C_GenerateKey(session, AES_GEN, aes_template(32))
    locked = p11.C_GenerateKey(session, AES_GEN, aes_template(16))  # CKA_EXTRACTABLE defaults to false
    with ckr(CKR.KEY_UNEXTRACTABLE):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, locked)
    _, ec_locked = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256))
    with ckr(CKR.KEY_UNEXTRACTABLE):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP_KWP), kek, ec_locked)
    no_wrap = p11.C_GenerateKey(session, AES_GEN, aes_template(32, wrap=False, unwrap=False))
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(16, extractable=True))
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), no_wrap, target)
    wrapped = p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, target)
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_UnwrapKey(session, Mechanism(CKM.AES_KEY_WRAP), no_wrap, wrapped, secret_template(CKK.AES))
    copy = p11.C_UnwrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, wrapped, secret_template(CKK.AES))
    assert _same_aes_key(p11, session, copy, target)
    assert read_attrs(p11, session, copy, CKA.LOCAL, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE) == [
        False, False, False,
    ]  # fmt: skip
    assert read_attr(p11, session, copy, CKA.VALUE) is None


@pytest.mark.mechanisms(CKM.AES_KEY_WRAP_KWP)
def test_unwrap_of_garbage(p11: Any, session: int) -> None:
    kek = p11.C_GenerateKey(session, AES_GEN, aes_template(32))
    template = secret_template(CKK.AES)
    for mech, garbage, code in [
        (CKM.AES_KEY_WRAP, os.urandom(24), CKR.WRAPPED_KEY_INVALID),
        (CKM.AES_KEY_WRAP, os.urandom(20), CKR.WRAPPED_KEY_LEN_RANGE),
        (CKM.AES_KEY_WRAP_KWP, os.urandom(32), CKR.WRAPPED_KEY_INVALID),
        (CKM.AES_KEY_WRAP_PAD, os.urandom(40), CKR.WRAPPED_KEY_INVALID),
    ]:
        with ckr(code):
            p11.C_UnwrapKey(session, Mechanism(mech), kek, garbage, template)
    _, priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(1024))
    oaep = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams())
    with ckr(CKR.WRAPPED_KEY_INVALID):
        p11.C_UnwrapKey(session, oaep, priv, os.urandom(127).rjust(128, b"\x00"), template)
    with ckr(CKR.WRAPPED_KEY_LEN_RANGE):
        p11.C_UnwrapKey(session, oaep, priv, os.urandom(100), template)
    # Well-wrapped bytes that are not a PKCS#8 private key.
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(32, extractable=True))
    wrapped = p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, target)
    with ckr(CKR.WRAPPED_KEY_INVALID):
        p11.C_UnwrapKey(
            session, Mechanism(CKM.AES_KEY_WRAP), kek, wrapped, {CKA.CLASS: CKO.PRIVATE_KEY, CKA.KEY_TYPE: CKK.EC}
        )


def test_rsa_wraps_a_secret_key(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(2048))
    value = os.urandom(32)
    target = p11.C_CreateObject(session, secret_import(CKK.AES, value, extractable=True))
    public = rsa.RSAPublicNumbers(
        int.from_bytes(read_attr(p11, session, pub, CKA.PUBLIC_EXPONENT), "big"),
        int.from_bytes(read_attr(p11, session, pub, CKA.MODULUS), "big"),
    ).public_key()
    for mech in (Mechanism(CKM.RSA_PKCS), Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA_1, CKG.MGF1_SHA1))):
        wrapped = p11.C_WrapKey(session, mech, pub, target)
        assert len(wrapped) == 256
        copy = p11.C_UnwrapKey(
            session, mech, priv, wrapped, secret_template(CKK.AES, sensitive=False, extractable=True)
        )
        assert read_attr(p11, session, copy, CKA.VALUE) == value
    # The token unwraps what cryptography wraps.
    pad = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"kek label")
    oaep = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA256, CKG.MGF1_SHA256, source_data=b"kek label"))
    copy = p11.C_UnwrapKey(session, oaep, priv, public.encrypt(value, pad), secret_template(CKK.AES))
    assert _same_aes_key(p11, session, copy, target)


@pytest.mark.mechanisms(CKM.AES_KEY_WRAP_KWP)
def test_private_key_wrap_round_trip(p11: Any, session: int) -> None:
    value = os.urandom(32)
    kek = p11.C_CreateObject(session, secret_import(CKK.AES, value))
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, extractable=True))
    wrapped = p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP_KWP), kek, priv)
    pkcs8 = keywrap.aes_key_unwrap_with_padding(value, wrapped)
    local = serialization.load_der_private_key(pkcs8, None)
    assert isinstance(local, ec.EllipticCurvePrivateKey)
    assert local.public_key() == ec_public(p11, session, pub, P256)
    template = {CKA.CLASS: CKO.PRIVATE_KEY, CKA.KEY_TYPE: CKK.EC, CKA.TOKEN: False}
    copy = p11.C_UnwrapKey(session, Mechanism(CKM.AES_KEY_WRAP_KWP), kek, wrapped, template)
    assert read_attrs(p11, session, copy, CKA.LOCAL, CKA.ALWAYS_SENSITIVE, CKA.SENSITIVE) == [False, False, True]
    assert read_attr(p11, session, copy, CKA.EC_PARAMS) == P256.params
    _ec_sign_verifies(p11, session, copy, pub)
    # An Ed25519 key wrapped outside the token is unwrapped and signs.
    ed = ed25519.Ed25519PrivateKey.generate()
    der = ed.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    template = {CKA.CLASS: CKO.PRIVATE_KEY, CKA.KEY_TYPE: CKK.EC_EDWARDS, CKA.TOKEN: False}
    ed_copy = p11.C_UnwrapKey(
        session, Mechanism(CKM.AES_KEY_WRAP_KWP), kek, keywrap.aes_key_wrap_with_padding(value, der), template
    )
    assert read_attr(p11, session, ed_copy, CKA.EC_PARAMS) == ED25519.params
    p11.C_SignInit(session, Mechanism(CKM.EDDSA), ed_copy)
    ed.public_key().verify(p11.C_Sign(session, DATA), DATA)


def test_wrapping_key_of_the_wrong_type(p11: Any, session: int) -> None:
    ec_pub, ec_priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, public={CKA.WRAP: True}))
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(16, extractable=True))
    with ckr(CKR.WRAPPING_KEY_TYPE_INCONSISTENT):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), ec_pub, target)
    with ckr(CKR.UNWRAPPING_KEY_TYPE_INCONSISTENT):
        p11.C_UnwrapKey(session, Mechanism(CKM.AES_KEY_WRAP), ec_priv, bytes(24), secret_template(CKK.AES))


def test_key_wrap_of_a_key_of_unwrappable_length(p11: Any, session: int) -> None:
    kek = p11.C_GenerateKey(session, AES_GEN, aes_template(16))
    odd = p11.C_CreateObject(session, secret_import(CKK.GENERIC_SECRET, os.urandom(20), extractable=True))
    with ckr(CKR.KEY_SIZE_RANGE):
        p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, odd)


# --- derive ------------------------------------------------------------------------------------------------


def test_ecdh_derive_matches_cryptography(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, derive=True))
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    z = peer.exchange(ec.ECDH(), ec_public(p11, session, pub, P256))
    readable = {"sensitive": False, "extractable": True}
    for public_data in (peer_point, octet_string(peer_point)):
        mech = Mechanism(CKM.ECDH1_DERIVE, Ecdh1Params(public_data=public_data))
        key = p11.C_DeriveKey(session, mech, priv, secret_template(CKK.GENERIC_SECRET, **readable))
        assert read_attr(p11, session, key, CKA.VALUE) == z
    kdf = Mechanism(CKM.ECDH1_DERIVE, Ecdh1Params(CKD.SHA256_KDF, b"shared info", peer_point))
    key = p11.C_DeriveKey(session, kdf, priv, secret_template(CKK.AES, value_len=16, **readable))
    expected = X963KDF(hashes.SHA256(), 16, b"shared info").derive(z)
    assert read_attr(p11, session, key, CKA.VALUE) == expected
    with ckr(CKR.TEMPLATE_INCOMPLETE):
        p11.C_DeriveKey(session, kdf, priv, secret_template(CKK.GENERIC_SECRET))


@pytest.mark.mechanisms(CKM.ECDH1_COFACTOR_DERIVE)
def test_ecdh_both_sides_derive_the_same_aes_key(p11: Any, session: int) -> None:
    pub_a, priv_a = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, derive=True))
    pub_b, priv_b = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, derive=True))
    template = secret_template(CKK.AES, value_len=32)
    for mech in (CKM.ECDH1_DERIVE, CKM.ECDH1_COFACTOR_DERIVE):
        a = p11.C_DeriveKey(
            session, Mechanism(mech, Ecdh1Params(public_data=raw_point(p11, session, pub_b))), priv_a, template
        )
        b = p11.C_DeriveKey(
            session, Mechanism(mech, Ecdh1Params(public_data=raw_point(p11, session, pub_a))), priv_b, template
        )
        assert _same_aes_key(p11, session, a, b)
        # Derived keys are not local; sensitivity follows the base key (Base 4.9).
        assert read_attrs(p11, session, a, CKA.LOCAL, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE, CKA.VALUE) == [
            False, True, True, None,
        ]  # fmt: skip


def test_unwrap_template_does_not_silently_override_the_caller(p11: Any, session: int) -> None:
    kek = p11.C_GenerateKey(session, AES_GEN, aes_template(16, unwrap_template=((CKA.LABEL, b"from template"),)))
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(16, extractable=True))
    wrapped = p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, target)
    try:
        copy = p11.C_UnwrapKey(
            session, Mechanism(CKM.AES_KEY_WRAP), kek, wrapped, secret_template(CKK.AES, label=b"from caller")
        )
    except PKCS11Error as exc:
        assert exc.rv == CKR.TEMPLATE_INCONSISTENT
    else:
        assert read_attr(p11, session, copy, CKA.LABEL) == b"from caller"


def test_unwrap_template_cannot_forge_token_set_attributes(p11: Any, session: int) -> None:
    forged = ((CKA.LOCAL, True), (CKA.ALWAYS_SENSITIVE, True), (CKA.NEVER_EXTRACTABLE, True))
    try:
        kek = p11.C_GenerateKey(session, AES_GEN, aes_template(16, unwrap_template=forged))
    except PKCS11Error:
        return  # refusing such a template up front is conforming too
    target = p11.C_GenerateKey(session, AES_GEN, aes_template(16, extractable=True))
    wrapped = p11.C_WrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, target)
    try:
        copy = p11.C_UnwrapKey(session, Mechanism(CKM.AES_KEY_WRAP), kek, wrapped, secret_template(CKK.AES))
    except PKCS11Error:
        return
    assert read_attrs(p11, session, copy, CKA.LOCAL, CKA.ALWAYS_SENSITIVE, CKA.NEVER_EXTRACTABLE) == [
        False, False, False,
    ]  # fmt: skip


def test_derive_class_contradicting_the_mechanism(p11: Any, session: int) -> None:
    pub, priv = p11.C_GenerateKeyPair(session, EC_GEN, *ec_templates(P256, derive=True))
    mech = Mechanism(CKM.ECDH1_DERIVE, Ecdh1Params(public_data=raw_point(p11, session, pub)))
    with ckr(CKR.TEMPLATE_INCONSISTENT):
        p11.C_DeriveKey(session, mech, priv, {CKA.CLASS: CKO.PRIVATE_KEY, CKA.KEY_TYPE: CKK.EC, CKA.TOKEN: False})
