"""Mechanisms a fronted module offers and KeyGrid's own tokens do not: 3DES, CMAC, DSA, DH, MD5.

PKCS#11 v2.40 Current Mechanisms 2.2 (DSA), 2.5 (Diffie-Hellman), 2.10-2.11
(CMAC), 2.39 (3DES), 2.48 (MD5). A provider's slot that lists them (SoftHSM2)
must serve them through KeyGrid's wire like any other: each test needs its
mechanisms (a ``mech`` parameter or the ``mechanisms`` marker) and is generated
only for providers that offer them. Outputs are checked against
``cryptography`` and plain modular arithmetic from public values read through
C_GetAttributeValue or from keys imported with known values. Mechanisms
whose parameter structure holds a pointer cannot cross into the module's
process and are refused, without harm to the module.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives.asymmetric import dsa, padding, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from keygridd.pkcs11 import CKA, CKK, CKM, CKR
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import DOORS, ckr
from tests.conformance.helpers import (
    DH_1024,
    DSA_1024,
    Kit,
    check_mac,
    dh_templates,
    open_kit,
    read_attr,
    rsa_public,
    secret_template,
)

DATA = b"KeyGrid conformance: legacy mechanisms through a fronted module."
IV8 = bytes(range(8))
DES3_MODES = {CKM.DES3_ECB: modes.ECB, CKM.DES3_CBC: lambda: modes.CBC(IV8), CKM.DES3_CBC_PAD: lambda: modes.CBC(IV8)}
DSA_HASHES: dict[int, hashes.HashAlgorithm] = {
    CKM.DSA_SHA1: hashes.SHA1(), CKM.DSA_SHA224: hashes.SHA224(), CKM.DSA_SHA256: hashes.SHA256(),
    CKM.DSA_SHA384: hashes.SHA384(), CKM.DSA_SHA512: hashes.SHA512(),
}  # fmt: skip


def _name(mech: int) -> str:
    return CKM(mech).name


@pytest.fixture(scope="module", params=sorted(DOORS))
def kit(request: pytest.FixtureRequest, daemon: Any) -> Iterator[Kit]:
    with open_kit(DOORS[request.param], daemon) as made:
        yield made


# --- 3DES and CMAC ----------------------------------------------------------------------------------------


def _des3_encrypt(mech: int, key: bytes, data: bytes) -> bytes:
    if mech == CKM.DES3_CBC_PAD:
        pad = 8 - len(data) % 8
        data += bytes([pad]) * pad
    encryptor = Cipher(TripleDES(key), DES3_MODES[mech]()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


@pytest.mark.parametrize("mech", sorted(DES3_MODES), ids=_name)
def test_des3_modes(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    key, value = kit.secret(CKK.DES3, 24)
    data = DATA[:45] if mech == CKM.DES3_CBC_PAD else DATA[:48]
    expected = _des3_encrypt(mech, value, data)
    m = Mechanism(mech, None if mech == CKM.DES3_ECB else IV8)
    p11.C_EncryptInit(s, m, key)
    assert p11.C_Encrypt(s, data) == expected
    p11.C_DecryptInit(s, m, key)
    assert p11.C_Decrypt(s, expected) == data
    p11.C_EncryptInit(s, m, key)
    parts = [p11.C_EncryptUpdate(s, data[:13]), p11.C_EncryptUpdate(s, data[13:]), p11.C_EncryptFinal(s)]
    assert b"".join(parts) == expected
    p11.C_DecryptInit(s, m, key)
    parts = [p11.C_DecryptUpdate(s, expected[:5]), p11.C_DecryptUpdate(s, expected[5:]), p11.C_DecryptFinal(s)]
    assert b"".join(parts) == data


@pytest.mark.parametrize("mech", [CKM.AES_CMAC, CKM.DES3_CMAC], ids=_name)
def test_cmac(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    key_type, cipher = (CKK.AES, algorithms.AES) if mech == CKM.AES_CMAC else (CKK.DES3, TripleDES)
    key, value = kit.secret(key_type, 24)
    local = cmac.CMAC(cipher(value))
    local.update(DATA)
    expected = local.finalize()
    check_mac(p11, s, Mechanism(mech), key, DATA, expected)
    p11.C_VerifyInit(s, Mechanism(mech), key)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, DATA, bytes(len(expected)))


# --- DSA and Diffie-Hellman --------------------------------------------------------------------------------


def _dsa_public(kit: Kit, pub: int) -> dsa.DSAPublicKey:
    p, q, g = DSA_1024
    y = int.from_bytes(read_attr(kit.p11, kit.session, pub, CKA.VALUE), "big")
    return dsa.DSAPublicNumbers(y, dsa.DSAParameterNumbers(p, q, g)).public_key()


@pytest.mark.parametrize("mech", [CKM.DSA, *DSA_HASHES], ids=_name)
def test_dsa(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.dsa()
    key = _dsa_public(kit, pub)
    # CKM_DSA signs a digest; the others hash the data themselves.
    data, algorithm = (
        (hashlib.sha1(DATA).digest(), utils.Prehashed(hashes.SHA1())) if mech == CKM.DSA else (DATA, DSA_HASHES[mech])
    )
    p11.C_SignInit(s, Mechanism(mech), priv)
    signature = p11.C_Sign(s, data)
    assert len(signature) == 40, "DSA signatures are r || s"
    r, sv = int.from_bytes(signature[:20], "big"), int.from_bytes(signature[20:], "big")
    key.verify(utils.encode_dss_signature(r, sv), data, algorithm)
    p11.C_VerifyInit(s, Mechanism(mech), pub)
    p11.C_Verify(s, data, signature)
    p11.C_VerifyInit(s, Mechanism(mech), pub)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, data, signature[:-1] + bytes([signature[-1] ^ 1]))


@pytest.mark.mechanisms(CKM.DH_PKCS_KEY_PAIR_GEN, CKM.DH_PKCS_DERIVE)
def test_dh_derive_matches_a_local_peer(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    prime, generator = DH_1024
    pub, priv = kit.once(
        "dh", lambda: p11.C_GenerateKeyPair(s, Mechanism(CKM.DH_PKCS_KEY_PAIR_GEN), *dh_templates(derive=True))
    )
    token_y = int.from_bytes(read_attr(p11, s, pub, CKA.VALUE), "big")
    assert 1 < token_y < prime - 1
    while True:  # a peer whose shared secret fills all 128 bytes, so no convention on leading zeros matters
        x = secrets.randbelow(prime - 3) + 2
        shared = pow(token_y, x, prime)
        if shared >> (8 * 127):
            break
    peer_y = pow(generator, x, prime).to_bytes(128, "big")
    template = secret_template(CKK.GENERIC_SECRET, value_len=128, sensitive=False, extractable=True)
    key = p11.C_DeriveKey(s, Mechanism(CKM.DH_PKCS_DERIVE, peer_y), priv, template)
    assert read_attr(p11, s, key, CKA.VALUE) == shared.to_bytes(128, "big")


# --- MD5 ----------------------------------------------------------------------------------------------------


@pytest.mark.mechanisms(CKM.MD5_RSA_PKCS)
def test_md5_rsa_pkcs(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.rsa(2048)
    p11.C_SignInit(s, Mechanism(CKM.MD5_RSA_PKCS), priv)
    signature = p11.C_Sign(s, DATA)
    rsa_public(p11, s, pub).verify(signature, DATA, padding.PKCS1v15(), hashes.MD5())
    p11.C_VerifyInit(s, Mechanism(CKM.MD5_RSA_PKCS), pub)
    p11.C_Verify(s, DATA, signature)


# --- parameters KeyGrid's wire cannot carry ---------------------------------------------------------------


@pytest.mark.mechanisms(CKM.AES_ECB_ENCRYPT_DATA)
def test_a_parameter_holding_a_pointer_is_refused(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    key, _ = kit.secret(CKK.AES, 16, derive=True)
    # CK_KEY_DERIVATION_STRING_DATA {pData, ulLen}: an address in this process, meaningless in the module's.
    param = struct.pack("@PL", 0xDEAD_BEEF_000, 16)
    with ckr(CKR.MECHANISM_PARAM_INVALID):
        p11.C_DeriveKey(s, Mechanism(CKM.AES_ECB_ENCRYPT_DATA, param), key, secret_template(CKK.AES, value_len=16))
    assert read_attr(p11, s, key, CKA.VALUE_LEN) == 16, "the module's worker did not restart (session objects live)"
