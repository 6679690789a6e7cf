"""python-pkcs11 loading libkeygrid-pkcs11.so (``pkcs11.lib(path)``): the token by label,
key generation, sign/verify, AES-GCM, finding objects by label and reading attributes.

Each scenario runs in its own process (driver.py ``py11-*``); the results are
checked here, signatures again with ``cryptography``.
"""

from __future__ import annotations

import pytest
from consumer_kit import TOKEN_LABEL, USER_PIN, Consumers
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

pytestmark = pytest.mark.shim

CKO_PUBLIC_KEY, CKO_PRIVATE_KEY, CKK_EC = 2, 3, 3


def test_ec_keypair_sign_verify(consumer_daemon: Consumers) -> None:
    result = consumer_daemon.driver("py11-ec", USER_PIN)
    assert result["token"] == TOKEN_LABEL
    assert result["manufacturer"] == "KeyGrid"
    assert result["verified"] is True and result["tampered"] is False
    point = bytes.fromhex(result["ec_point"])
    assert point[:2] == b"\x04\x41"  # DER OCTET STRING around the 65-byte uncompressed point
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    raw = bytes.fromhex(result["signature"])
    assert len(raw) == 64
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, b"python-pkcs11 through KeyGrid", ec.ECDSA(hashes.SHA256()))


def test_rsa_keypair_sign_verify(consumer_daemon: Consumers) -> None:
    result = consumer_daemon.driver("py11-rsa", USER_PIN)
    assert result["verified"] is True
    modulus = int(result["modulus"], 16)
    assert modulus.bit_length() == 2048
    public = rsa.RSAPublicNumbers(int(result["public_exponent"], 16), modulus).public_key()
    public.verify(bytes.fromhex(result["signature"]), b"python-pkcs11 RSA through KeyGrid", padding.PKCS1v15(),
                  hashes.SHA256())  # fmt: skip


def test_aes_gcm_encrypt_decrypt(consumer_daemon: Consumers) -> None:
    result = consumer_daemon.driver("py11-aes-gcm", USER_PIN)
    assert len(bytes.fromhex(result["nonce"])) == 12
    assert result["ciphertext_len"] == result["plaintext_len"] + 16  # 128-bit tag appended
    assert result["roundtrip"] is True
    assert result["tampered"] != "accepted"
    assert result["value_len"] == 32
    assert result["sensitive"] is True


def test_find_objects_and_attributes(consumer_daemon: Consumers) -> None:
    result = consumer_daemon.driver("py11-find", USER_PIN)
    assert result["classes"] == [CKO_PUBLIC_KEY, CKO_PRIVATE_KEY]
    assert result["labels"] == ["py11-find", "py11-find"]
    assert result["id"] == "61"
    assert result["key_type"] == CKK_EC
    assert (result["sign"], result["sensitive"], result["extractable"]) == (True, True, False)
    assert (result["private"], result["token"]) == (True, True)
    assert result["value"] == "AttributeSensitive"
    assert result["missing"] == 0
