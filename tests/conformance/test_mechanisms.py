"""Mechanisms (PKCS#11 v2.40 Current Mechanisms; v3.0 for SHA-3 and EdDSA) through the door.

``CASES`` holds one round trip per mechanism; ``test_mechanism_flags_are_honoured``
runs, for every mechanism of C_GetMechanismList, exactly what its
C_GetMechanismInfo flags promise (and checks the functions it does not promise
are refused), and ``test_every_listed_mechanism_has_a_case`` fails when the list
grows a mechanism without a case. The algorithm tests then check outputs
against ``cryptography``, ``hashlib`` and ``hmac`` from public values read
through C_GetAttributeValue or from keys imported with known values.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, keywrap
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygridd.pkcs11 import CKA, CKG, CKK, CKM, CKO, CKR
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import (
    CtrParams,
    Ecdh1Params,
    EddsaParams,
    GcmParams,
    Mechanism,
    OaepParams,
    PssParams,
    UlongParams,
)
from tests.conformance.conftest import DOORS, ckr
from tests.conformance.helpers import (
    ED25519,
    EDWARDS,
    P256,
    WEIERSTRASS,
    Curve,
    Kit,
    Template,
    aes_template,
    ec_public,
    ec_templates,
    ed_public,
    open_kit,
    raw_point,
    read_attr,
    rsa_public,
    rsa_templates,
    secret_template,
)

DATA = b"KeyGrid conformance: the quick brown fox jumps over the lazy dog"
IV = bytes(range(16))


@pytest.fixture(scope="module", params=sorted(DOORS))
def kit(request: pytest.FixtureRequest, daemon: Any) -> Iterator[Kit]:
    with open_kit(DOORS[request.param], daemon) as made:
        yield made


# --- hashes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hash:
    digest: int  # CKM digest
    name: str  # hashlib name
    algorithm: type[hashes.HashAlgorithm]
    mgf: int  # CKG_MGF1_*


SHA1 = Hash(CKM.SHA_1, "sha1", hashes.SHA1, CKG.MGF1_SHA1)
SHA224 = Hash(CKM.SHA224, "sha224", hashes.SHA224, CKG.MGF1_SHA224)
SHA256 = Hash(CKM.SHA256, "sha256", hashes.SHA256, CKG.MGF1_SHA256)
SHA384 = Hash(CKM.SHA384, "sha384", hashes.SHA384, CKG.MGF1_SHA384)
SHA512 = Hash(CKM.SHA512, "sha512", hashes.SHA512, CKG.MGF1_SHA512)
SHA3_224 = Hash(CKM.SHA3_224, "sha3_224", hashes.SHA3_224, CKG.MGF1_SHA3_224)
SHA3_256 = Hash(CKM.SHA3_256, "sha3_256", hashes.SHA3_256, CKG.MGF1_SHA3_256)
SHA3_384 = Hash(CKM.SHA3_384, "sha3_384", hashes.SHA3_384, CKG.MGF1_SHA3_384)
SHA3_512 = Hash(CKM.SHA3_512, "sha3_512", hashes.SHA3_512, CKG.MGF1_SHA3_512)
SHA2 = (SHA1, SHA224, SHA256, SHA384, SHA512)
SHA3 = (SHA3_224, SHA3_256, SHA3_384, SHA3_512)

DIGESTS: dict[int, str] = {h.digest: h.name for h in SHA2 + SHA3}
DIGESTS.update({CKM.SHA512_224: "sha512_224", CKM.SHA512_256: "sha512_256"})

RSA_PKCS_BY_HASH = {
    SHA1: CKM.SHA1_RSA_PKCS, SHA224: CKM.SHA224_RSA_PKCS, SHA256: CKM.SHA256_RSA_PKCS,
    SHA384: CKM.SHA384_RSA_PKCS, SHA512: CKM.SHA512_RSA_PKCS, SHA3_224: CKM.SHA3_224_RSA_PKCS,
    SHA3_256: CKM.SHA3_256_RSA_PKCS, SHA3_384: CKM.SHA3_384_RSA_PKCS, SHA3_512: CKM.SHA3_512_RSA_PKCS,
}  # fmt: skip
RSA_PSS_BY_HASH = {
    SHA1: CKM.SHA1_RSA_PKCS_PSS, SHA224: CKM.SHA224_RSA_PKCS_PSS, SHA256: CKM.SHA256_RSA_PKCS_PSS,
    SHA384: CKM.SHA384_RSA_PKCS_PSS, SHA512: CKM.SHA512_RSA_PKCS_PSS, SHA3_224: CKM.SHA3_224_RSA_PKCS_PSS,
    SHA3_256: CKM.SHA3_256_RSA_PKCS_PSS, SHA3_384: CKM.SHA3_384_RSA_PKCS_PSS, SHA3_512: CKM.SHA3_512_RSA_PKCS_PSS,
}  # fmt: skip
ECDSA_BY_HASH = {
    SHA1: CKM.ECDSA_SHA1, SHA224: CKM.ECDSA_SHA224, SHA256: CKM.ECDSA_SHA256, SHA384: CKM.ECDSA_SHA384,
    SHA512: CKM.ECDSA_SHA512, SHA3_224: CKM.ECDSA_SHA3_224, SHA3_256: CKM.ECDSA_SHA3_256,
    SHA3_384: CKM.ECDSA_SHA3_384, SHA3_512: CKM.ECDSA_SHA3_512,
}  # fmt: skip
HMAC_BY_HASH = {
    SHA1: (CKM.SHA_1_HMAC, CKM.SHA_1_HMAC_GENERAL), SHA224: (CKM.SHA224_HMAC, CKM.SHA224_HMAC_GENERAL),
    SHA256: (CKM.SHA256_HMAC, CKM.SHA256_HMAC_GENERAL), SHA384: (CKM.SHA384_HMAC, CKM.SHA384_HMAC_GENERAL),
    SHA512: (CKM.SHA512_HMAC, CKM.SHA512_HMAC_GENERAL), SHA3_224: (CKM.SHA3_224_HMAC, CKM.SHA3_224_HMAC_GENERAL),
    SHA3_256: (CKM.SHA3_256_HMAC, CKM.SHA3_256_HMAC_GENERAL), SHA3_384: (CKM.SHA3_384_HMAC, CKM.SHA3_384_HMAC_GENERAL),
    SHA3_512: (CKM.SHA3_512_HMAC, CKM.SHA3_512_HMAC_GENERAL),
}  # fmt: skip
SHA3_KEY_GEN = {
    CKM.SHA3_224_KEY_GEN: CKK.SHA3_224_HMAC, CKM.SHA3_256_KEY_GEN: CKK.SHA3_256_HMAC,
    CKM.SHA3_384_KEY_GEN: CKK.SHA3_384_HMAC, CKM.SHA3_512_KEY_GEN: CKK.SHA3_512_HMAC,
}  # fmt: skip


def pss(h: Hash) -> PssParams:
    return PssParams(h.digest, h.mgf, h.algorithm().digest_size)


def _name(mech: int) -> str:
    return CKM(mech).name


# --- the mechanism table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What to do with a mechanism for each flag it may carry.

    ``key`` names the kit key used to sign/verify, encrypt/decrypt, wrap/unwrap or derive;
    ``multipart`` whether the Update/Final forms apply; ``digest`` the hashlib name;
    ``generate`` the C_GenerateKey template or C_GenerateKeyPair templates;
    ``wraps_private`` whether C_WrapKey of a private key (PKCS#8) fits the mechanism.
    """

    key: str = ""
    param: Any = None
    data: bytes = DATA
    multipart: bool = False
    digest: str = ""
    generate: Template | tuple[Template, Template] | None = None
    wraps_private: bool = False


CASES: dict[int, Case] = {
    CKM.RSA_PKCS_KEY_PAIR_GEN: Case(generate=rsa_templates(1024)),
    CKM.RSA_PKCS: Case(key="rsa"),
    CKM.RSA_X_509: Case(key="rsa", data=b"\x00" + (DATA * 4)[:255]),  # k bytes below n: decrypts to itself
    CKM.RSA_PKCS_OAEP: Case(key="rsa", param=OaepParams(CKM.SHA256, CKG.MGF1_SHA256, source_data=b"label")),
    CKM.RSA_PKCS_PSS: Case(key="rsa", param=pss(SHA256), data=hashlib.sha256(DATA).digest()),
    **{m: Case(key="rsa", multipart=True) for m in RSA_PKCS_BY_HASH.values()},
    **{m: Case(key="rsa", param=pss(h), multipart=True) for h, m in RSA_PSS_BY_HASH.items()},
    **{m: Case(digest=name, multipart=True) for m, name in DIGESTS.items()},
    **{m: Case(key="hmac", multipart=True) for m, _ in HMAC_BY_HASH.values()},
    **{m: Case(key="hmac", param=UlongParams(10), multipart=True) for _, m in HMAC_BY_HASH.values()},
    **{m: Case(generate=secret_template(kt, value_len=32)) for m, kt in SHA3_KEY_GEN.items()},
    CKM.GENERIC_SECRET_KEY_GEN: Case(generate=secret_template(CKK.GENERIC_SECRET, value_len=32)),
    CKM.EC_KEY_PAIR_GEN: Case(generate=ec_templates(P256)),
    CKM.ECDSA: Case(key="ec", data=hashlib.sha256(DATA).digest()),
    **{m: Case(key="ec", multipart=True) for m in ECDSA_BY_HASH.values()},
    CKM.ECDH1_DERIVE: Case(key="ec"),
    CKM.ECDH1_COFACTOR_DERIVE: Case(key="ec"),
    CKM.EC_EDWARDS_KEY_PAIR_GEN: Case(generate=ec_templates(ED25519)),
    CKM.EDDSA: Case(key="ed25519"),
    CKM.AES_KEY_GEN: Case(generate=aes_template(16)),
    CKM.AES_ECB: Case(key="aes", data=DATA, multipart=True),
    CKM.AES_CBC: Case(key="aes", param=IV, data=DATA, multipart=True),
    CKM.AES_CBC_PAD: Case(key="aes", param=IV, multipart=True, wraps_private=True),
    CKM.AES_CTR: Case(key="aes", param=CtrParams(128, IV), multipart=True),
    CKM.AES_GCM: Case(key="aes", param=GcmParams(IV[:12], b"header", 128), multipart=True),
    CKM.AES_KEY_WRAP: Case(key="aes", data=DATA),
    CKM.AES_KEY_WRAP_PAD: Case(key="aes", wraps_private=True),
    CKM.AES_KEY_WRAP_KWP: Case(key="aes", wraps_private=True),
}


def case_keys(kit: Kit, name: str) -> tuple[int, int]:
    """(private-side, public-side) handles of a kit key: sign/decrypt/unwrap/derive with the first."""
    if name == "rsa":
        pub, priv = kit.rsa(2048)
    elif name == "ec":
        pub, priv = kit.ec(P256)
    elif name == "ed25519":
        pub, priv = kit.ec(ED25519)
    elif name == "aes":
        priv = pub = kit.secret(CKK.AES, 32)[0]
    elif name == "hmac":
        priv = pub = kit.secret(CKK.GENERIC_SECRET, 32)[0]
    else:
        raise AssertionError(f"no kit key {name!r}")
    return priv, pub


def _sign_round_trip(kit: Kit, mech: Mechanism, case: Case) -> None:
    p11, s = kit.p11, kit.session
    priv, pub = case_keys(kit, case.key)
    p11.C_SignInit(s, mech, priv)
    signature = p11.C_Sign(s, case.data)
    p11.C_VerifyInit(s, mech, pub)
    p11.C_Verify(s, case.data, signature)
    bad = signature[:-1] + bytes([signature[-1] ^ 1])
    p11.C_VerifyInit(s, mech, pub)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, case.data, bad)
    if case.multipart:
        p11.C_SignInit(s, mech, priv)
        p11.C_SignUpdate(s, case.data[:7])
        p11.C_SignUpdate(s, case.data[7:])
        again = p11.C_SignFinal(s)
        p11.C_VerifyInit(s, mech, pub)
        p11.C_VerifyUpdate(s, case.data[:30])
        p11.C_VerifyUpdate(s, case.data[30:])
        p11.C_VerifyFinal(s, again)
        p11.C_VerifyInit(s, mech, pub)
        p11.C_Verify(s, case.data, again)


def _encrypt_round_trip(kit: Kit, mech: Mechanism, case: Case) -> None:
    p11, s = kit.p11, kit.session
    priv, pub = case_keys(kit, case.key)
    p11.C_EncryptInit(s, mech, pub)
    ciphertext = p11.C_Encrypt(s, case.data)
    assert ciphertext != case.data
    p11.C_DecryptInit(s, mech, priv)
    assert p11.C_Decrypt(s, ciphertext) == case.data
    if case.multipart:
        p11.C_EncryptInit(s, mech, pub)
        parts = [p11.C_EncryptUpdate(s, case.data[:16]), p11.C_EncryptUpdate(s, case.data[16:])]
        parts.append(p11.C_EncryptFinal(s))
        assert b"".join(parts) == ciphertext or mech.mechanism == CKM.RSA_PKCS_OAEP
        p11.C_DecryptInit(s, mech, priv)
        plain = [p11.C_DecryptUpdate(s, ciphertext[:5]), p11.C_DecryptUpdate(s, ciphertext[5:])]
        plain.append(p11.C_DecryptFinal(s))
        assert b"".join(plain) == case.data


def _wrap_round_trip(kit: Kit, mech: Mechanism, case: Case) -> None:
    p11, s = kit.p11, kit.session
    unwrapping, wrapping = case_keys(kit, case.key)
    target, _ = kit.secret(CKK.AES, 16, extractable=True)
    wrapped = p11.C_WrapKey(s, mech, wrapping, target)
    copy = p11.C_UnwrapKey(s, mech, unwrapping, wrapped, secret_template(CKK.AES))
    block = os.urandom(16)
    ecb = Mechanism(CKM.AES_ECB)
    outputs = []
    for key in (target, copy):
        p11.C_EncryptInit(s, ecb, key)
        outputs.append(p11.C_Encrypt(s, block))
    assert outputs[0] == outputs[1], "the unwrapped AES key differs from the wrapped one"
    p11.C_DestroyObject(s, copy)
    if case.wraps_private:
        pub, priv = kit.once(
            "ec-extractable",
            lambda: p11.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), *ec_templates(P256, extractable=True)),
        )
        wrapped = p11.C_WrapKey(s, mech, wrapping, priv)
        template = {CKA.CLASS: CKO.PRIVATE_KEY, CKA.KEY_TYPE: CKK.EC, CKA.TOKEN: False, CKA.SIGN: True}
        unwrapped = p11.C_UnwrapKey(s, mech, unwrapping, wrapped, template)
        digest = hashlib.sha256(DATA).digest()
        p11.C_SignInit(s, Mechanism(CKM.ECDSA), unwrapped)
        signature = p11.C_Sign(s, digest)
        p11.C_VerifyInit(s, Mechanism(CKM.ECDSA), pub)
        p11.C_Verify(s, digest, signature)
        p11.C_DestroyObject(s, unwrapped)


def _derive_round_trip(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    pub_a, priv_a = kit.ec(P256)
    pub_b, priv_b = kit.once(
        "ec-peer", lambda: p11.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), *ec_templates(P256, derive=True))
    )
    template = secret_template(CKK.GENERIC_SECRET, value_len=32, sensitive=False, extractable=True)
    a = p11.C_DeriveKey(s, Mechanism(mech, Ecdh1Params(public_data=raw_point(p11, s, pub_b))), priv_a, template)
    b = p11.C_DeriveKey(s, Mechanism(mech, Ecdh1Params(public_data=raw_point(p11, s, pub_a))), priv_b, template)
    value_a, value_b = read_attr(p11, s, a, CKA.VALUE), read_attr(p11, s, b, CKA.VALUE)
    assert len(value_a) == 32 and value_a == value_b
    for handle in (a, b):
        p11.C_DestroyObject(s, handle)


def _generate(kit: Kit, mech: int, case: Case, pair: bool) -> None:
    p11, s = kit.p11, kit.session
    if pair:
        assert isinstance(case.generate, tuple), "CKF_GENERATE_KEY_PAIR without key pair templates"
        pub, priv = p11.C_GenerateKeyPair(s, Mechanism(mech), *case.generate)
        assert read_attr(p11, s, pub, CKA.CLASS) == CKO.PUBLIC_KEY
        assert read_attr(p11, s, priv, CKA.CLASS) == CKO.PRIVATE_KEY
        handles = [pub, priv]
    else:
        assert isinstance(case.generate, dict), "CKF_GENERATE without a key template"
        key = p11.C_GenerateKey(s, Mechanism(mech), case.generate)
        assert read_attr(p11, s, key, CKA.KEY_TYPE) == case.generate[CKA.KEY_TYPE]
        assert read_attr(p11, s, key, CKA.VALUE_LEN) == case.generate[CKA.VALUE_LEN]
        handles = [key]
    for handle in handles:
        assert read_attr(p11, s, handle, CKA.KEY_GEN_MECHANISM) == mech
        p11.C_DestroyObject(s, handle)


def _refused(kit: Kit, mech: Mechanism, flags: int) -> None:
    """Functions the flags do not promise fail with CKR_MECHANISM_INVALID."""
    p11, s = kit.p11, kit.session
    key = kit.secret(CKK.AES, 32, derive=True)[0]
    refusals: list[tuple[int, Callable[[], object]]] = [
        (F.ENCRYPT, lambda: p11.C_EncryptInit(s, mech, key)),
        (F.DECRYPT, lambda: p11.C_DecryptInit(s, mech, key)),
        (F.SIGN, lambda: p11.C_SignInit(s, mech, key)),
        (F.VERIFY, lambda: p11.C_VerifyInit(s, mech, key)),
        (F.DIGEST, lambda: p11.C_DigestInit(s, mech)),
        (F.GENERATE, lambda: p11.C_GenerateKey(s, mech, aes_template(16))),
        (F.GENERATE_KEY_PAIR, lambda: p11.C_GenerateKeyPair(s, mech, *ec_templates(P256))),
        (F.WRAP, lambda: p11.C_WrapKey(s, mech, key, key)),
        (F.UNWRAP, lambda: p11.C_UnwrapKey(s, mech, key, bytes(40), secret_template(CKK.AES))),
        (F.DERIVE, lambda: p11.C_DeriveKey(s, mech, key, secret_template(CKK.GENERIC_SECRET, value_len=16))),
    ]
    for flag, call in refusals:
        if not flags & flag:
            with ckr(CKR.MECHANISM_INVALID):
                call()


def test_every_listed_mechanism_has_a_case(p11: Any) -> None:
    missing = [
        CKM(m).name if m in CKM._value2member_map_ else hex(m) for m in p11.C_GetMechanismList(0) if m not in CASES
    ]
    assert not missing, f"mechanisms without a conformance round trip: {missing}"


@pytest.mark.parametrize("mech", sorted(CASES), ids=_name)
def test_mechanism_flags_are_honoured(kit: Kit, mech: int) -> None:
    # Every token of the suite offers every built-in mechanism: a case for an unlisted one is stale.
    assert mech in kit.once("mechanisms", lambda: set(kit.p11.C_GetMechanismList(0))), f"{_name(mech)} not offered"
    case = CASES[mech]
    flags = kit.p11.C_GetMechanismInfo(0, mech)["flags"]
    m = Mechanism(mech, case.param)
    assert bool(flags & F.SIGN) == bool(flags & F.VERIFY), "sign and verify come together"
    assert bool(flags & F.ENCRYPT) == bool(flags & F.DECRYPT), "encrypt and decrypt come together"
    assert bool(flags & F.WRAP) == bool(flags & F.UNWRAP), "wrap and unwrap come together"
    if flags & F.SIGN:
        _sign_round_trip(kit, m, case)
    if flags & F.ENCRYPT:
        _encrypt_round_trip(kit, m, case)
    if flags & F.DIGEST:
        assert case.digest, "CKF_DIGEST without a hashlib name"
        kit.p11.C_DigestInit(kit.session, m)
        assert kit.p11.C_Digest(kit.session, case.data) == hashlib.new(case.digest, case.data).digest()
    if flags & F.GENERATE:
        _generate(kit, mech, case, pair=False)
    if flags & F.GENERATE_KEY_PAIR:
        _generate(kit, mech, case, pair=True)
    if flags & F.WRAP:
        _wrap_round_trip(kit, m, case)
    if flags & F.DERIVE:
        _derive_round_trip(kit, mech)
    _refused(kit, m, flags)


# --- RSA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1024, 2048, 3072, 4096])
def test_rsa_generation(kit: Kit, bits: int) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.rsa(bits)
    assert read_attr(p11, s, pub, CKA.MODULUS_BITS) == bits
    key = rsa_public(p11, s, pub)
    assert key.key_size == bits and key.public_numbers().e == 65537
    assert read_attr(p11, s, priv, CKA.MODULUS) == read_attr(p11, s, pub, CKA.MODULUS)
    p11.C_SignInit(s, Mechanism(CKM.SHA256_RSA_PKCS), priv)
    signature = p11.C_Sign(s, DATA)
    assert len(signature) == bits // 8
    key.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())


def test_rsa_pkcs_sign_and_encrypt(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    pub, priv, local = kit.rsa_imported()
    mech = Mechanism(CKM.RSA_PKCS)
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(DATA).digest()
    p11.C_SignInit(s, mech, priv)
    signature = p11.C_Sign(s, digest_info)
    local.public_key().verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
    p11.C_SignInit(s, mech, priv)  # raw input (no DigestInfo) is signed as given
    signature = p11.C_Sign(s, b"tls-style raw input")
    assert local.public_key().recover_data_from_signature(signature, padding.PKCS1v15(), None) == b"tls-style raw input"
    p11.C_EncryptInit(s, mech, pub)
    assert local.decrypt(p11.C_Encrypt(s, DATA), padding.PKCS1v15()) == DATA
    p11.C_DecryptInit(s, mech, priv)
    assert p11.C_Decrypt(s, local.public_key().encrypt(DATA, padding.PKCS1v15())) == DATA
    p11.C_EncryptInit(s, mech, pub)
    with ckr(CKR.DATA_LEN_RANGE):
        p11.C_Encrypt(s, bytes(256 - 10))


@pytest.mark.parametrize("h", SHA2, ids=lambda h: h.name)
def test_rsa_pss(kit: Kit, h: Hash) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.rsa(2048)
    key = rsa_public(p11, s, pub)
    pad = padding.PSS(padding.MGF1(h.algorithm()), h.algorithm().digest_size)
    digest = hashlib.new(h.name, DATA).digest()
    p11.C_SignInit(s, Mechanism(CKM.RSA_PKCS_PSS, pss(h)), priv)
    key.verify(p11.C_Sign(s, digest), digest, pad, utils.Prehashed(h.algorithm()))
    p11.C_SignInit(s, Mechanism(RSA_PSS_BY_HASH[h], pss(h)), priv)
    p11.C_SignUpdate(s, DATA[:10])
    p11.C_SignUpdate(s, DATA[10:])
    key.verify(p11.C_SignFinal(s), DATA, pad, h.algorithm())
    # MGF1 with a different hash than the message hash.
    other = PssParams(h.digest, CKG.MGF1_SHA512, 0)
    p11.C_SignInit(s, Mechanism(CKM.RSA_PKCS_PSS, other), priv)
    pad = padding.PSS(padding.MGF1(hashes.SHA512()), 0)
    key.verify(p11.C_Sign(s, digest), digest, pad, utils.Prehashed(h.algorithm()))


@pytest.mark.parametrize("h", SHA2 + SHA3, ids=lambda h: h.name)
def test_rsa_hashed_pkcs(kit: Kit, h: Hash) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.rsa(2048)
    key = rsa_public(p11, s, pub)
    p11.C_SignInit(s, Mechanism(RSA_PKCS_BY_HASH[h]), priv)
    key.verify(p11.C_Sign(s, DATA), DATA, padding.PKCS1v15(), h.algorithm())
    if h in SHA3:  # the PSS forms of SHA-1/2 are in test_rsa_pss
        p11.C_SignInit(s, Mechanism(RSA_PSS_BY_HASH[h], pss(h)), priv)
        pad = padding.PSS(padding.MGF1(h.algorithm()), h.algorithm().digest_size)
        key.verify(p11.C_Sign(s, DATA), DATA, pad, h.algorithm())


@pytest.mark.parametrize("h", SHA2, ids=lambda h: h.name)
def test_rsa_oaep(kit: Kit, h: Hash) -> None:
    p11, s = kit.p11, kit.session
    pub, priv, local = kit.rsa_imported()
    for label in (b"", b"a label"):
        mech = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(h.digest, h.mgf, source_data=label))
        pad = padding.OAEP(padding.MGF1(h.algorithm()), h.algorithm(), label or None)
        p11.C_EncryptInit(s, mech, pub)
        assert local.decrypt(p11.C_Encrypt(s, DATA[:40]), pad) == DATA[:40]
        p11.C_DecryptInit(s, mech, priv)
        assert p11.C_Decrypt(s, local.public_key().encrypt(DATA[:40], pad)) == DATA[:40]
    wrong = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(h.digest, h.mgf, source_data=b"other label"))
    p11.C_DecryptInit(s, wrong, priv)
    with ckr(CKR.ENCRYPTED_DATA_INVALID):
        p11.C_Decrypt(s, local.public_key().encrypt(DATA[:40], pad))


def test_rsa_x_509(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    pub, priv, local = kit.rsa_imported()
    numbers = local.private_numbers()
    n, d, e = numbers.public_numbers.n, numbers.d, numbers.public_numbers.e
    message = b"\x00\x01" + DATA * 3
    m = int.from_bytes(message, "big")
    p11.C_SignInit(s, Mechanism(CKM.RSA_X_509), priv)
    assert p11.C_Sign(s, message) == pow(m, d, n).to_bytes(256, "big")
    p11.C_EncryptInit(s, Mechanism(CKM.RSA_X_509), pub)
    assert p11.C_Encrypt(s, message) == pow(m, e, n).to_bytes(256, "big")
    p11.C_DecryptInit(s, Mechanism(CKM.RSA_X_509), priv)
    assert p11.C_Decrypt(s, pow(m, e, n).to_bytes(256, "big")) == message.rjust(256, b"\x00")


# --- EC and EdDSA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", WEIERSTRASS, ids=lambda c: c.name)
def test_ecdsa(kit: Kit, curve: Curve) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.ec(curve)
    key = ec_public(p11, s, pub, curve)

    def check(signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm) -> None:
        assert len(signature) == 2 * curve.size, "CKM_ECDSA signatures are r || s"
        r, sv = int.from_bytes(signature[: curve.size], "big"), int.from_bytes(signature[curve.size :], "big")
        key.verify(utils.encode_dss_signature(r, sv), data, ec.ECDSA(algorithm))

    digest = hashlib.sha256(DATA).digest()
    p11.C_SignInit(s, Mechanism(CKM.ECDSA), priv)
    check(p11.C_Sign(s, digest), digest, utils.Prehashed(hashes.SHA256()))
    for h in SHA2 + SHA3:
        p11.C_SignInit(s, Mechanism(ECDSA_BY_HASH[h]), priv)
        check(p11.C_Sign(s, DATA), DATA, h.algorithm())
    p11.C_SignInit(s, Mechanism(CKM.ECDSA), priv)
    signature = p11.C_Sign(s, digest)
    p11.C_VerifyInit(s, Mechanism(CKM.ECDSA), pub)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, hashlib.sha256(b"other").digest(), signature)


@pytest.mark.parametrize("curve", EDWARDS, ids=lambda c: c.name)
def test_eddsa(kit: Kit, curve: Curve) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.ec(curve)
    key = ed_public(p11, s, pub, curve)
    params: list[EddsaParams | None] = [None] if curve is ED25519 else [None, EddsaParams(False, b"")]
    for param in params:
        p11.C_SignInit(s, Mechanism(CKM.EDDSA, param), priv)
        signature = p11.C_Sign(s, DATA)
        assert len(signature) == (64 if curve is ED25519 else 114)
        key.verify(signature, DATA)
        p11.C_VerifyInit(s, Mechanism(CKM.EDDSA, param), pub)
        p11.C_Verify(s, DATA, signature)


# --- AES ------------------------------------------------------------------------------------------------

AES_SIZES = (16, 24, 32)
BLOCK_MODES: dict[int, Callable[[], modes.Mode]] = {
    CKM.AES_ECB: modes.ECB,
    CKM.AES_CBC: lambda: modes.CBC(IV),
    CKM.AES_CBC_PAD: lambda: modes.CBC(IV),
    CKM.AES_CTR: lambda: modes.CTR(IV),
}


def _aes_param(mech: int) -> Any:
    return {CKM.AES_ECB: None, CKM.AES_CTR: CtrParams(128, IV)}.get(mech, IV)


def _local_encrypt(mech: int, key: bytes, data: bytes) -> bytes:
    if mech == CKM.AES_CBC_PAD:
        pad = 16 - len(data) % 16
        data += bytes([pad]) * pad
    encryptor = Cipher(algorithms.AES(key), BLOCK_MODES[mech]()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _multi(update: Callable[[bytes], bytes], final: Callable[[], bytes], data: bytes, cuts: list[int]) -> bytes:
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        out.append(update(data[start:cut]))
        start = cut
    out.append(final())
    return b"".join(out)


@pytest.mark.parametrize("size", AES_SIZES)
@pytest.mark.parametrize("mech", sorted(BLOCK_MODES), ids=_name)
def test_aes_modes(kit: Kit, mech: int, size: int) -> None:
    p11, s = kit.p11, kit.session
    key, value = kit.secret(CKK.AES, size)
    data = DATA[:48] if mech in (CKM.AES_ECB, CKM.AES_CBC) else DATA[:45]
    expected = _local_encrypt(mech, value, data)
    m = Mechanism(mech, _aes_param(mech))
    p11.C_EncryptInit(s, m, key)
    assert p11.C_Encrypt(s, data) == expected
    p11.C_DecryptInit(s, m, key)
    assert p11.C_Decrypt(s, expected) == data
    cuts = [1, 17, 40]
    p11.C_EncryptInit(s, m, key)
    assert _multi(lambda d: p11.C_EncryptUpdate(s, d), lambda: p11.C_EncryptFinal(s), data, cuts) == expected
    p11.C_DecryptInit(s, m, key)
    assert _multi(lambda d: p11.C_DecryptUpdate(s, d), lambda: p11.C_DecryptFinal(s), expected, cuts) == data


def test_aes_block_length_rules(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    key, _ = kit.secret(CKK.AES, 16)
    p11.C_EncryptInit(s, Mechanism(CKM.AES_CBC, IV), key)
    with ckr(CKR.DATA_LEN_RANGE):
        p11.C_Encrypt(s, b"not a block multiple")
    p11.C_DecryptInit(s, Mechanism(CKM.AES_ECB), key)
    with ckr(CKR.ENCRYPTED_DATA_LEN_RANGE):
        p11.C_Decrypt(s, bytes(17))
    p11.C_EncryptInit(s, Mechanism(CKM.AES_CBC_PAD, IV), key)
    assert len(p11.C_Encrypt(s, b"")) == 16  # a whole block of padding


@pytest.mark.parametrize("size", AES_SIZES)
def test_aes_gcm(kit: Kit, size: int) -> None:
    p11, s = kit.p11, kit.session
    key, value = kit.secret(CKK.AES, size)
    iv, aad = os.urandom(12), b"associated data"
    expected = AESGCM(value).encrypt(iv, DATA, aad)
    m = Mechanism(CKM.AES_GCM, GcmParams(iv, aad, 128))
    p11.C_EncryptInit(s, m, key)
    assert p11.C_Encrypt(s, DATA) == expected
    p11.C_EncryptInit(s, m, key)
    assert _multi(lambda d: p11.C_EncryptUpdate(s, d), lambda: p11.C_EncryptFinal(s), DATA, [5, 33]) == expected
    p11.C_DecryptInit(s, m, key)
    assert p11.C_Decrypt(s, expected) == DATA
    p11.C_DecryptInit(s, m, key)
    assert _multi(lambda d: p11.C_DecryptUpdate(s, d), lambda: p11.C_DecryptFinal(s), expected, [7, 70]) == DATA
    bad = expected[:-1] + bytes([expected[-1] ^ 0x80])
    p11.C_DecryptInit(s, m, key)
    with ckr(CKR.ENCRYPTED_DATA_INVALID):
        p11.C_Decrypt(s, bad)
    p11.C_DecryptInit(s, m, key)
    p11.C_DecryptUpdate(s, bad)
    with ckr(CKR.ENCRYPTED_DATA_INVALID):
        p11.C_DecryptFinal(s)
    p11.C_DecryptInit(s, Mechanism(CKM.AES_GCM, GcmParams(iv, b"other aad", 128)), key)
    with ckr(CKR.ENCRYPTED_DATA_INVALID):
        p11.C_Decrypt(s, expected)
    short = Mechanism(CKM.AES_GCM, GcmParams(iv, aad, 96))  # a 12-byte tag
    p11.C_EncryptInit(s, short, key)
    assert p11.C_Encrypt(s, DATA) == expected[:-4]


@pytest.mark.parametrize("mech", [CKM.AES_KEY_WRAP, CKM.AES_KEY_WRAP_KWP], ids=_name)
def test_aes_key_wrap(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    kek, kek_value = kit.secret(CKK.AES, 32)
    wrap = keywrap.aes_key_wrap if mech == CKM.AES_KEY_WRAP else keywrap.aes_key_wrap_with_padding
    for size in AES_SIZES:
        target, value = kit.secret(CKK.AES, size, extractable=True)
        wrapped = p11.C_WrapKey(s, Mechanism(mech), kek, target)
        assert wrapped == wrap(kek_value, value)
        copy = p11.C_UnwrapKey(
            s, Mechanism(mech), kek, wrapped, secret_template(CKK.AES, extractable=True, sensitive=False)
        )
        assert read_attr(p11, s, copy, CKA.VALUE) == value
        p11.C_DestroyObject(s, copy)
    data = DATA[:40] if mech == CKM.AES_KEY_WRAP else DATA[:37]
    p11.C_EncryptInit(s, Mechanism(mech), kek)
    assert p11.C_Encrypt(s, data) == wrap(kek_value, data)
    p11.C_DecryptInit(s, Mechanism(mech), kek)
    assert p11.C_Decrypt(s, wrap(kek_value, data)) == data


# --- HMAC and digests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", SHA2 + SHA3, ids=lambda h: h.name)
def test_hmac(kit: Kit, h: Hash) -> None:
    p11, s = kit.p11, kit.session
    full, general = HMAC_BY_HASH[h]
    expected = hmac.new(b"", DATA, h.name).digest()
    for key_type in (CKK.GENERIC_SECRET, _HMAC_KEY_TYPES[h]):
        key, value = kit.secret(key_type, 40)
        expected = hmac.new(value, DATA, h.name).digest()
        p11.C_SignInit(s, Mechanism(full), key)
        assert p11.C_Sign(s, DATA) == expected
        p11.C_SignInit(s, Mechanism(full), key)
        p11.C_SignUpdate(s, DATA[:3])
        p11.C_SignUpdate(s, DATA[3:])
        assert p11.C_SignFinal(s) == expected
        p11.C_VerifyInit(s, Mechanism(full), key)
        p11.C_Verify(s, DATA, expected)
        p11.C_SignInit(s, Mechanism(general, UlongParams(12)), key)
        assert p11.C_Sign(s, DATA) == expected[:12]
        p11.C_VerifyInit(s, Mechanism(general, UlongParams(12)), key)
        p11.C_Verify(s, DATA, expected[:12])
    p11.C_VerifyInit(s, Mechanism(full), key)
    with ckr(CKR.SIGNATURE_LEN_RANGE):
        p11.C_Verify(s, DATA, expected[:-1])
    p11.C_VerifyInit(s, Mechanism(full), key)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, DATA, bytes(len(expected)))


_HMAC_KEY_TYPES = {
    SHA1: CKK.SHA_1_HMAC, SHA224: CKK.SHA224_HMAC, SHA256: CKK.SHA256_HMAC, SHA384: CKK.SHA384_HMAC,
    SHA512: CKK.SHA512_HMAC, SHA3_224: CKK.SHA3_224_HMAC, SHA3_256: CKK.SHA3_256_HMAC,
    SHA3_384: CKK.SHA3_384_HMAC, SHA3_512: CKK.SHA3_512_HMAC,
}  # fmt: skip


@pytest.mark.parametrize("mech", sorted(DIGESTS), ids=_name)
def test_digest(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    name = DIGESTS[mech]
    p11.C_DigestInit(s, Mechanism(mech))
    assert p11.C_Digest(s, DATA) == hashlib.new(name, DATA).digest()
    p11.C_DigestInit(s, Mechanism(mech))
    p11.C_DigestUpdate(s, DATA[:9])
    p11.C_DigestUpdate(s, b"")
    p11.C_DigestUpdate(s, DATA[9:])
    assert p11.C_DigestFinal(s) == hashlib.new(name, DATA).digest()
    key, value = kit.secret(CKK.AES, 32)  # sensitive: C_DigestKey still digests it
    p11.C_DigestInit(s, Mechanism(mech))
    p11.C_DigestUpdate(s, b"prefix")
    p11.C_DigestKey(s, key)
    p11.C_DigestUpdate(s, b"suffix")
    assert p11.C_DigestFinal(s) == hashlib.new(name, b"prefix" + value + b"suffix").digest()


def test_digest_key_of_a_private_key_is_indigestible(kit: Kit) -> None:
    p11, s = kit.p11, kit.session
    _, priv = kit.ec(P256)
    p11.C_DigestInit(s, Mechanism(CKM.SHA256))
    with ckr(CKR.KEY_INDIGESTIBLE):
        p11.C_DigestKey(s, priv)
