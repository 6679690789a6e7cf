"""Operation state machines (PKCS#11 v2.40 Base 5.9-5.12, and 5.2 for errors).

An operation is active from its Init until a single-part call or Final
succeeds, or any call of it fails; a second Init while active is
CKR_OPERATION_ACTIVE; a call without Init is CKR_OPERATION_NOT_INITIALIZED.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from keygridd.pkcs11 import CKA, CKM, CKR, CKU
from keygridd.pkcs11.params import GcmParams, Mechanism
from tests.conformance.conftest import ckr

P256 = bytes.fromhex("06082a8648ce3d030107")
RSA_1024 = ({CKA.MODULUS_BITS: 1024, CKA.PUBLIC_EXPONENT: b"\x01\x00\x01"}, {CKA.SIGN: True})
SIGN = Mechanism(CKM.SHA256_RSA_PKCS)


@pytest.fixture
def ec_pair(p11: Any, session: int) -> tuple[int, int]:
    pub, priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256}, {CKA.SIGN: True})
    return pub, priv


@pytest.fixture
def rsa_pair(p11: Any, session: int) -> tuple[int, int]:
    """A signing pair whose mechanisms every provider offers (SHA-2 with RSA PKCS #1 v1.5)."""
    pub, priv = p11.C_GenerateKeyPair(session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *RSA_1024)
    return pub, priv


@pytest.fixture
def aes_key(p11: Any, session: int) -> int:
    key: int = p11.C_GenerateKey(session, Mechanism(CKM.AES_KEY_GEN), {CKA.VALUE_LEN: 32})
    return key


def test_sign_ends_after_success(p11: Any, session: int, rsa_pair: tuple[int, int]) -> None:
    pub, priv = rsa_pair
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Sign(session, b"x")
    p11.C_SignInit(session, SIGN, priv)
    with ckr(CKR.OPERATION_ACTIVE):
        p11.C_SignInit(session, SIGN, priv)
    signature = p11.C_Sign(session, b"message")
    assert len(signature) == 128
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Sign(session, b"message")
    p11.C_VerifyInit(session, SIGN, pub)
    p11.C_Verify(session, b"message", signature)


def test_verify_failure_ends_the_operation(p11: Any, session: int, rsa_pair: tuple[int, int]) -> None:
    pub, priv = rsa_pair
    p11.C_SignInit(session, SIGN, priv)
    signature = p11.C_Sign(session, b"message")
    p11.C_VerifyInit(session, SIGN, pub)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(session, b"other message", signature)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Verify(session, b"message", signature)
    p11.C_VerifyInit(session, SIGN, pub)
    p11.C_VerifyUpdate(session, b"mess")
    p11.C_VerifyUpdate(session, b"age")
    p11.C_VerifyFinal(session, signature)


def test_multipart_sign_matches_single_part(p11: Any, session: int, rsa_pair: tuple[int, int]) -> None:
    pub, priv = rsa_pair
    p11.C_SignInit(session, Mechanism(CKM.SHA384_RSA_PKCS), priv)
    for chunk in (b"a", b"bc", b"def"):
        p11.C_SignUpdate(session, chunk)
    signature = p11.C_SignFinal(session)
    p11.C_VerifyInit(session, Mechanism(CKM.SHA384_RSA_PKCS), pub)
    p11.C_Verify(session, b"abcdef", signature)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_SignFinal(session)


def test_single_part_mechanism_refuses_update(p11: Any, session: int, ec_pair: tuple[int, int]) -> None:
    _, priv = ec_pair
    p11.C_SignInit(session, Mechanism(CKM.ECDSA), priv)
    with pytest.raises(Exception) as info:
        p11.C_SignUpdate(session, b"x" * 32)
    assert getattr(info.value, "rv", None) is not None
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_SignFinal(session)  # the failed update ended the operation


def test_mechanism_and_key_checks_at_init(p11: Any, session: int, ec_pair: tuple[int, int], aes_key: int) -> None:
    pub, priv = ec_pair
    with ckr(CKR.KEY_HANDLE_INVALID):
        p11.C_SignInit(session, Mechanism(CKM.ECDSA), 999_999)
    with ckr(CKR.KEY_FUNCTION_NOT_PERMITTED):
        p11.C_SignInit(session, Mechanism(CKM.ECDSA), pub)  # a public key cannot sign
    with ckr(CKR.KEY_TYPE_INCONSISTENT):
        p11.C_SignInit(session, Mechanism(CKM.SHA256_RSA_PKCS), priv)
    with ckr(CKR.MECHANISM_INVALID):
        p11.C_SignInit(session, Mechanism(0x7FFF_0000), priv)
    with ckr(CKR.MECHANISM_PARAM_INVALID):
        p11.C_EncryptInit(session, Mechanism(CKM.AES_GCM, b"not a GCM structure"), aes_key)
    # A failed Init leaves no operation behind.
    p11.C_SignInit(session, Mechanism(CKM.ECDSA), priv)
    p11.C_Sign(session, hashlib.sha256(b"ok").digest())


def test_encrypt_decrypt_multipart(p11: Any, session: int, aes_key: int) -> None:
    iv = os.urandom(16)
    p11.C_EncryptInit(session, Mechanism(CKM.AES_CBC_PAD, iv), aes_key)
    parts = [p11.C_EncryptUpdate(session, chunk) for chunk in (b"x" * 10, b"y" * 20, b"z" * 3)]
    parts.append(p11.C_EncryptFinal(session))
    ciphertext = b"".join(parts)
    assert len(ciphertext) == 48
    p11.C_DecryptInit(session, Mechanism(CKM.AES_CBC_PAD, iv), aes_key)
    assert p11.C_Decrypt(session, ciphertext) == b"x" * 10 + b"y" * 20 + b"z" * 3
    p11.C_EncryptInit(session, Mechanism(CKM.AES_CBC_PAD, iv), aes_key)
    p11.C_EncryptUpdate(session, b"a")
    with ckr(CKR.OPERATION_ACTIVE):
        p11.C_Encrypt(session, b"a")  # a multi-part operation cannot finish single-part


def test_decrypt_error_ends_the_operation(p11: Any, session: int, aes_key: int) -> None:
    iv = os.urandom(12)
    p11.C_EncryptInit(session, Mechanism(CKM.AES_GCM, GcmParams(iv=iv, aad=b"hdr")), aes_key)
    ciphertext = p11.C_Encrypt(session, b"secret data")
    p11.C_DecryptInit(session, Mechanism(CKM.AES_GCM, GcmParams(iv=iv, aad=b"other")), aes_key)
    with ckr(CKR.ENCRYPTED_DATA_INVALID):
        p11.C_Decrypt(session, ciphertext)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Decrypt(session, ciphertext)
    p11.C_DecryptInit(session, Mechanism(CKM.AES_GCM, GcmParams(iv=iv, aad=b"hdr")), aes_key)
    assert p11.C_Decrypt(session, ciphertext) == b"secret data"


def test_digest(p11: Any, public_session: int) -> None:
    s = public_session
    p11.C_DigestInit(s, Mechanism(CKM.SHA256))
    assert p11.C_Digest(s, b"abc") == hashlib.sha256(b"abc").digest()
    p11.C_DigestInit(s, Mechanism(CKM.SHA512))
    p11.C_DigestUpdate(s, b"a")
    p11.C_DigestUpdate(s, b"bc")
    assert p11.C_DigestFinal(s) == hashlib.sha512(b"abc").digest()
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_DigestFinal(s)


def test_operations_are_per_session(p11: Any, session: int, rsa_pair: tuple[int, int], daemon: Any) -> None:
    _, priv = rsa_pair
    second = p11.C_OpenSession(0, 6)
    p11.C_SignInit(session, SIGN, priv)
    p11.C_SignInit(second, SIGN, priv)
    assert len(p11.C_Sign(second, b"2")) == 128
    assert len(p11.C_Sign(session, b"1")) == 128


def test_logout_ends_operations_on_private_keys(p11: Any, session: int, rsa_pair: tuple[int, int], daemon: Any) -> None:
    _, priv = rsa_pair
    p11.C_SignInit(session, SIGN, priv)
    p11.C_Logout(session)
    with ckr(CKR.OPERATION_NOT_INITIALIZED):
        p11.C_Sign(session, b"x")
    p11.C_Login(session, CKU.USER, daemon.user_pin)


def test_always_authenticate_key_needs_context_login(p11: Any, session: int, daemon: Any) -> None:
    pub, priv = p11.C_GenerateKeyPair(
        session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), RSA_1024[0], {CKA.ALWAYS_AUTHENTICATE: True}
    )
    p11.C_SignInit(session, SIGN, priv)
    with ckr(CKR.USER_NOT_LOGGED_IN):
        p11.C_Sign(session, b"x")
    with ckr(CKR.PIN_INCORRECT):
        p11.C_Login(session, CKU.CONTEXT_SPECIFIC, b"wrong pin")
    p11.C_Login(session, CKU.CONTEXT_SPECIFIC, daemon.user_pin)
    signature = p11.C_Sign(session, b"x")
    p11.C_VerifyInit(session, SIGN, pub)
    p11.C_Verify(session, b"x", signature)
