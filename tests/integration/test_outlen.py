"""The output-buffer convention on the wire (PKCS#11 v2.40 Base 5.2).

``out_len`` -1 is C's NULL buffer (a length query), a number is the caller's
buffer size: both leave the operation active when the output does not fit,
and the daemon answers CKR_BUFFER_TOO_SMALL with the length needed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKM, CKR, CKU
from keygridd.pkcs11.params import GcmParams, Mechanism

P256 = bytes.fromhex("06082a8648ce3d030107")


def open_user(c: Client, daemon: Any) -> int:
    s: int = c.C_OpenSession(0, 6)
    c.C_Login(s, CKU.USER, daemon.user_pin)
    return s


def test_sign_length_query_and_short_buffer(daemon: Any) -> None:
    with Client(daemon.socket) as c:
        s = open_user(c, daemon)
        pub, priv = c.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256}, {})
        c.C_SignInit(s, Mechanism(CKM.ECDSA_SHA256), priv)
        assert c.call_raw("C_Sign", s, b"data", -1) == (CKR.OK, [None, 64])
        assert c.call_raw("C_Sign", s, b"data", 10) == (CKR.BUFFER_TOO_SMALL, [None, 64])
        rv, (signature, length) = c.call_raw("C_Sign", s, b"data", 64)
        assert rv == CKR.OK and length == 64 == len(signature)
        assert c.call_raw("C_Sign", s, b"data", 64)[0] == CKR.OPERATION_NOT_INITIALIZED
        c.C_VerifyInit(s, Mechanism(CKM.ECDSA_SHA256), pub)
        c.C_Verify(s, b"data", signature)


def test_short_buffer_keeps_the_computed_output(daemon: Any) -> None:
    """A GCM encryption retried after CKR_BUFFER_TOO_SMALL returns the same ciphertext."""
    with Client(daemon.socket) as c:
        s = open_user(c, daemon)
        key = c.C_GenerateKey(s, Mechanism(CKM.AES_KEY_GEN), {CKA.VALUE_LEN: 16})
        iv = os.urandom(12)
        c.C_EncryptInit(s, Mechanism(CKM.AES_GCM, GcmParams(iv=iv)), key)
        rv, (data, bound) = c.call_raw("C_Encrypt", s, b"x" * 100, -1)
        assert rv == CKR.OK and data is None and bound >= 116
        assert c.call_raw("C_Encrypt", s, b"x" * 100, 5) == (CKR.BUFFER_TOO_SMALL, [None, 116])
        rv, (ciphertext, length) = c.call_raw("C_Encrypt", s, b"x" * 100, 116)
        assert rv == CKR.OK and length == 116
        c.C_DecryptInit(s, Mechanism(CKM.AES_GCM, GcmParams(iv=iv)), key)
        assert c.C_Decrypt(s, ciphertext) == b"x" * 100


def test_get_attribute_value_return_codes(daemon: Any) -> None:
    with Client(daemon.socket) as c:
        s = open_user(c, daemon)
        key = c.C_GenerateKey(s, Mechanism(CKM.AES_KEY_GEN), {CKA.VALUE_LEN: 16, CKA.LABEL: b"k"})
        assert c.call_raw("C_GetAttributeValue", s, key, [CKA.LABEL, CKA.VALUE]) == (
            CKR.ATTRIBUTE_SENSITIVE,
            [b"k", None],
        )
        assert c.call_raw("C_GetAttributeValue", s, key, [CKA.LABEL, CKA.MODULUS]) == (
            CKR.ATTRIBUTE_TYPE_INVALID,
            [b"k", None],
        )
        assert c.call_raw("C_GetAttributeValue", s, key, [CKA.VALUE_LEN]) == (CKR.OK, [16])


def test_length_query_after_a_short_buffer_keeps_the_operation(daemon: Any) -> None:
    """pkcs11-tool --test's sequence: short buffer, then NULL, then a big enough buffer."""
    with Client(daemon.socket) as c:
        s = c.C_OpenSession(0, 6)
        c.C_DigestInit(s, Mechanism(CKM.SHA256))
        assert c.call_raw("C_Digest", s, b"data", 1) == (CKR.BUFFER_TOO_SMALL, [None, 32])
        assert c.call_raw("C_Digest", s, b"data", -1) == (CKR.OK, [None, 32])
        rv, (digest, length) = c.call_raw("C_Digest", s, b"data", 32)
        assert rv == CKR.OK and length == 32 and digest == hashlib.sha256(b"data").digest()


def test_pipelined_calls_are_answered_in_order_with_one_write(daemon: Any) -> None:
    """C_SignInit and C_Sign sent together: one round trip, the same answers as two."""
    with Client(daemon.socket) as c:
        s = open_user(c, daemon)
        pub, priv = c.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), {CKA.EC_PARAMS: P256}, {})
        mech = Mechanism(CKM.ECDSA_SHA256)
        for _ in range(3):
            none, signature = c.pipeline(("C_SignInit", [s, mech, priv]), ("C_Sign", [s, b"data", None]))
            assert none is None and len(signature) == 64
            c.C_VerifyInit(s, mech, pub)
            c.C_Verify(s, b"data", signature)
        # A failing first call is the one reported; the second still ran (and failed for its reason).
        try:
            c.pipeline(("C_SignInit", [s, mech, 999_999]), ("C_Sign", [s, b"data", None]))
        except Exception as exc:
            assert getattr(exc, "rv", None) == CKR.KEY_HANDLE_INVALID
        else:
            raise AssertionError("the pipeline should have failed")
        assert c.call_raw("C_Sign", s, b"data", None)[0] == CKR.OPERATION_NOT_INITIALIZED
