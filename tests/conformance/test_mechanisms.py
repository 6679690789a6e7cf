"""Mechanisms (PKCS#11 v2.40 Current Mechanisms; v3.0 for SHA-3 and EdDSA) through the door.

``CASES`` holds one round trip per mechanism; ``test_mechanism_flags_are_honoured``
runs, for every mechanism the provider offers (``differences.OFFERED``), exactly
what its C_GetMechanismInfo flags promise (and checks the functions it does not
promise are refused), and ``test_every_listed_mechanism_has_a_case`` fails when
the slot's list grows a mechanism without a case that runs and passes (or an
entry of ``differences.UNCOVERED`` saying why not). The algorithm tests then
check outputs against ``cryptography``, ``hashlib`` and ``hmac`` from public
values read through C_GetAttributeValue or from keys imported with known values.
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
from tests.conformance.conftest import DOORS, RW, ckr
from tests.conformance.differences import OFFERED, UNCOVERED, deselected, expected_failure, mechanism_name
from tests.conformance.helpers import (
    ED25519,
    EDWARDS,
    P256,
    WEIERSTRASS,
    Curve,
    Kit,
    Template,
    aes_template,
    check_mac,
    dh_templates,
    dsa_templates,
    ec_public,
    ec_templates,
    ed_public,
    open_kit,
    raw_point,
    read_attr,
    read_attrs,
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
DIGESTS.update({CKM.SHA512_224: "sha512_224", CKM.SHA512_256: "sha512_256", CKM.MD5: "md5"})

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
MD5 = Hash(CKM.MD5, "md5", hashes.MD5, 0)  # for CKM_MD5_HMAC and CKM_MD5_RSA_PKCS: there is no MGF1 with MD5
HMAC_HASH = {full: h for h, (full, _) in HMAC_BY_HASH.items()} | {CKM.MD5_HMAC: MD5}
HMAC_GENERAL_HASH = {general: h for h, (_, general) in HMAC_BY_HASH.items()}
ECDSA_HASH = {m: h for h, m in ECDSA_BY_HASH.items()}
SHA3_KEY_GEN = {
    CKM.SHA3_224_KEY_GEN: CKK.SHA3_224_HMAC, CKM.SHA3_256_KEY_GEN: CKK.SHA3_256_HMAC,
    CKM.SHA3_384_KEY_GEN: CKK.SHA3_384_HMAC, CKM.SHA3_512_KEY_GEN: CKK.SHA3_512_HMAC,
}  # fmt: skip


DSA_BY_HASH = {
    SHA1: CKM.DSA_SHA1, SHA224: CKM.DSA_SHA224, SHA256: CKM.DSA_SHA256, SHA384: CKM.DSA_SHA384, SHA512: CKM.DSA_SHA512,
}  # fmt: skip
_DOMAIN = {CKA.CLASS: CKO.DOMAIN_PARAMETERS, CKA.TOKEN: False}


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
    CKM.RSA_PKCS_OAEP: Case(key="rsa", param=OaepParams()),  # SHA-1, no label: what every token takes
    CKM.RSA_PKCS_PSS: Case(key="rsa", param=pss(SHA256), data=hashlib.sha256(DATA).digest()),
    **{m: Case(key="rsa", multipart=True) for m in RSA_PKCS_BY_HASH.values()},
    **{m: Case(key="rsa", param=pss(h), multipart=True) for h, m in RSA_PSS_BY_HASH.items()},
    **{m: Case(digest=name, multipart=True) for m, name in DIGESTS.items()},
    **{m: Case(key="hmac", multipart=True) for m in HMAC_HASH},
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
    CKM.AES_CMAC: Case(key="aes", multipart=True),
    # Mechanisms KeyGrid's own tokens do not offer, for modules that do (SoftHSM2).
    CKM.MD5_RSA_PKCS: Case(key="rsa", multipart=True),
    CKM.DSA_PARAMETER_GEN: Case(generate={**_DOMAIN, CKA.KEY_TYPE: CKK.DSA, CKA.PRIME_BITS: 1024}),
    CKM.DSA_KEY_PAIR_GEN: Case(generate=dsa_templates()),
    CKM.DSA: Case(key="dsa", data=hashlib.sha1(DATA).digest()),
    **{m: Case(key="dsa", multipart=True) for m in DSA_BY_HASH.values()},
    CKM.DH_PKCS_PARAMETER_GEN: Case(generate={**_DOMAIN, CKA.KEY_TYPE: CKK.DH, CKA.PRIME_BITS: 512}),
    CKM.DH_PKCS_KEY_PAIR_GEN: Case(generate=dh_templates()),
    CKM.DH_PKCS_DERIVE: Case(key="dh"),
    CKM.DES_KEY_GEN: Case(generate=secret_template(CKK.DES)),
    CKM.DES2_KEY_GEN: Case(generate=secret_template(CKK.DES2)),
    CKM.DES3_KEY_GEN: Case(generate=secret_template(CKK.DES3)),
    CKM.DES_ECB: Case(key="des", data=DATA, multipart=True),
    CKM.DES_CBC: Case(key="des", param=IV[:8], data=DATA, multipart=True),
    CKM.DES_CBC_PAD: Case(key="des", param=IV[:8], multipart=True),
    CKM.DES3_ECB: Case(key="des3", data=DATA, multipart=True),
    CKM.DES3_CBC: Case(key="des3", param=IV[:8], data=DATA, multipart=True),
    CKM.DES3_CBC_PAD: Case(key="des3", param=IV[:8], multipart=True),
    CKM.DES3_CMAC: Case(key="des3", multipart=True),
}


@dataclass(frozen=True)
class Agreement:
    """A derive case's key pairs: how to make one, read the public value, and pass it as the parameter."""

    generate: int
    templates: tuple[Template, Template]
    public_value: Callable[[Any, int, int], bytes]
    param: Callable[[bytes], Any]


AGREEMENTS = {
    "ec": Agreement(
        CKM.EC_KEY_PAIR_GEN, ec_templates(P256, derive=True), raw_point, lambda v: Ecdh1Params(public_data=v)
    ),
    "dh": Agreement(
        CKM.DH_PKCS_KEY_PAIR_GEN, dh_templates(derive=True), lambda p, s, o: read_attr(p, s, o, CKA.VALUE), bytes
    ),
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
    elif name == "hmac":  # as long as the largest digest: SoftHSM2 refuses HMAC keys shorter than it
        priv = pub = kit.secret(CKK.GENERIC_SECRET, 64)[0]
    elif name == "dsa":
        pub, priv = kit.dsa()
    elif name == "des":
        priv = pub = kit.secret(CKK.DES, 8)[0]
    elif name == "des3":
        priv = pub = kit.secret(CKK.DES3, 24)[0]
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


def _derive_round_trip(kit: Kit, mech: int, case: Case) -> None:
    p11, s = kit.p11, kit.session
    agreement = AGREEMENTS[case.key]
    (pub_a, priv_a), (pub_b, priv_b) = (
        kit.once(
            f"{case.key}-agreement-{side}",
            lambda: p11.C_GenerateKeyPair(s, Mechanism(agreement.generate), *agreement.templates),
        )
        for side in "ab"
    )
    template = secret_template(CKK.GENERIC_SECRET, value_len=32, sensitive=False, extractable=True)
    a = p11.C_DeriveKey(s, Mechanism(mech, agreement.param(agreement.public_value(p11, s, pub_b))), priv_a, template)
    b = p11.C_DeriveKey(s, Mechanism(mech, agreement.param(agreement.public_value(p11, s, pub_a))), priv_b, template)
    value_a, value_b = read_attr(p11, s, a, CKA.VALUE), read_attr(p11, s, b, CKA.VALUE)
    assert len(value_a) == 32 and value_a == value_b
    for handle in (a, b):
        p11.C_DestroyObject(s, handle)


# What shows an object was generated: CKA_KEY_GEN_MECHANISM of a key; domain parameters have only CKA_LOCAL.
_ORIGIN = {CKO.DOMAIN_PARAMETERS: (CKA.LOCAL, True)}


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
        echoed = [a for a in (CKA.CLASS, CKA.KEY_TYPE, CKA.VALUE_LEN, CKA.PRIME_BITS) if a in case.generate]
        assert read_attrs(p11, s, key, *echoed) == [case.generate[a] for a in echoed]
        handles = [key]
    for handle in handles:
        attr, value = _ORIGIN.get(read_attr(p11, s, handle, CKA.CLASS), (CKA.KEY_GEN_MECHANISM, mech))
        assert read_attr(p11, s, handle, attr) == value
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


def test_offered_mechanisms_are_the_slots_list(p11: Any, provider: str) -> None:
    """The table's mechanisms of the provider (frozen for a module) are what its slot lists now."""
    listed = set(p11.C_GetMechanismList(0))
    assert sorted(map(mechanism_name, listed - OFFERED[provider])) == [], "listed, not in differences.OFFERED"
    assert sorted(map(mechanism_name, OFFERED[provider] - listed)) == [], "in differences.OFFERED, not listed"


def test_every_listed_mechanism_has_a_case(p11: Any, provider: str) -> None:
    """Each listed mechanism has a round trip that runs and passes here, or differences.UNCOVERED says why not."""
    uncovered = UNCOVERED.get(provider, {})
    listed = set(p11.C_GetMechanismList(0))
    assert sorted(map(mechanism_name, set(uncovered) - listed)) == [], "UNCOVERED names mechanisms not listed"
    missing, stale = [], []
    for mech in sorted(listed):
        name = f"test_mechanism_flags_are_honoured[{mechanism_name(mech)}]"
        passes = mech in CASES and not deselected(provider, name) and expected_failure(provider, name) is None
        if not passes and mech not in uncovered:
            missing.append(mechanism_name(mech))
        if passes and mech in uncovered:
            stale.append(mechanism_name(mech))
    assert not missing, f"mechanisms without a conformance round trip that passes: {missing}"
    assert not stale, f"UNCOVERED entries of mechanisms whose round trip passes: {stale}"


@pytest.mark.parametrize("mech", sorted(CASES), ids=_name)
def test_mechanism_flags_are_honoured(kit: Kit, mech: int) -> None:
    # Generated for the mechanisms the provider offers (differences.OFFERED): one it does not list is stale.
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
        _derive_round_trip(kit, mech, case)
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


def _hashed_rsa(h: Hash) -> Any:
    needs = (RSA_PKCS_BY_HASH[h], RSA_PSS_BY_HASH[h]) if h in SHA3 else (RSA_PKCS_BY_HASH[h],)
    return pytest.param(h, id=h.name, marks=pytest.mark.mechanisms(*needs))


@pytest.mark.parametrize("h", [_hashed_rsa(h) for h in SHA2 + SHA3])
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


def _check_ecdsa(key: ec.EllipticCurvePublicKey, curve: Curve, signature: bytes, data: bytes, algorithm: Any) -> None:
    assert len(signature) == 2 * curve.size, "CKM_ECDSA signatures are r || s"
    r, s = int.from_bytes(signature[: curve.size], "big"), int.from_bytes(signature[curve.size :], "big")
    key.verify(utils.encode_dss_signature(r, s), data, ec.ECDSA(algorithm))


@pytest.mark.parametrize("curve", WEIERSTRASS, ids=lambda c: c.name)
def test_ecdsa(kit: Kit, curve: Curve) -> None:
    p11, s = kit.p11, kit.session
    pub, priv = kit.ec(curve)
    key = ec_public(p11, s, pub, curve)
    digest = hashlib.sha256(DATA).digest()
    p11.C_SignInit(s, Mechanism(CKM.ECDSA), priv)
    _check_ecdsa(key, curve, p11.C_Sign(s, digest), digest, utils.Prehashed(hashes.SHA256()))
    p11.C_SignInit(s, Mechanism(CKM.ECDSA), priv)
    signature = p11.C_Sign(s, digest)
    p11.C_VerifyInit(s, Mechanism(CKM.ECDSA), pub)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, hashlib.sha256(b"other").digest(), signature)


@pytest.mark.parametrize("mech", sorted(ECDSA_HASH), ids=_name)
def test_ecdsa_with_hash(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    h = ECDSA_HASH[mech]
    for curve in WEIERSTRASS:
        pub, priv = kit.ec(curve)
        p11.C_SignInit(s, Mechanism(mech), priv)
        _check_ecdsa(ec_public(p11, s, pub, curve), curve, p11.C_Sign(s, DATA), DATA, h.algorithm())


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


# HMAC keys as long as the largest digest: SoftHSM2 refuses keys shorter than the mechanism's output.
HMAC_KEY_LENGTH = 64


@pytest.mark.parametrize("mech", sorted(HMAC_HASH), ids=_name)
def test_hmac(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    h = HMAC_HASH[mech]
    expected = b""
    for key_type in (CKK.GENERIC_SECRET, _HMAC_KEY_TYPES[h]):
        key, value = kit.secret(key_type, HMAC_KEY_LENGTH)
        expected = hmac.new(value, DATA, h.name).digest()
        check_mac(p11, s, Mechanism(mech), key, DATA, expected)
    p11.C_VerifyInit(s, Mechanism(mech), key)
    with ckr(CKR.SIGNATURE_LEN_RANGE):
        p11.C_Verify(s, DATA, expected[:-1])
    p11.C_VerifyInit(s, Mechanism(mech), key)
    with ckr(CKR.SIGNATURE_INVALID):
        p11.C_Verify(s, DATA, bytes(len(expected)))


@pytest.mark.parametrize("mech", sorted(HMAC_GENERAL_HASH), ids=_name)
def test_hmac_general(kit: Kit, mech: int) -> None:
    p11, s = kit.p11, kit.session
    h = HMAC_GENERAL_HASH[mech]
    for key_type in (CKK.GENERIC_SECRET, _HMAC_KEY_TYPES[h]):
        key, value = kit.secret(key_type, HMAC_KEY_LENGTH)
        expected = hmac.new(value, DATA, h.name).digest()[:12]
        p11.C_SignInit(s, Mechanism(mech, UlongParams(12)), key)
        assert p11.C_Sign(s, DATA) == expected
        p11.C_VerifyInit(s, Mechanism(mech, UlongParams(12)), key)
        p11.C_Verify(s, DATA, expected)


_HMAC_KEY_TYPES = {
    SHA1: CKK.SHA_1_HMAC, SHA224: CKK.SHA224_HMAC, SHA256: CKK.SHA256_HMAC, SHA384: CKK.SHA384_HMAC,
    SHA512: CKK.SHA512_HMAC, SHA3_224: CKK.SHA3_224_HMAC, SHA3_256: CKK.SHA3_256_HMAC,
    SHA3_384: CKK.SHA3_384_HMAC, SHA3_512: CKK.SHA3_512_HMAC, MD5: CKK.MD5_HMAC,
}  # fmt: skip


@pytest.fixture
def own_session(kit: Kit) -> Iterator[int]:
    """A session of the kit's application for one test (closing it ends whatever operation a failure left)."""
    session: int = kit.p11.C_OpenSession(0, RW)
    yield session
    kit.p11.C_CloseSession(session)


@pytest.mark.parametrize("mech", sorted(DIGESTS), ids=_name)
def test_digest(kit: Kit, own_session: int, mech: int) -> None:
    p11, s = kit.p11, own_session
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


def test_digest_key_of_a_private_key_is_indigestible(kit: Kit, own_session: int) -> None:
    p11, s = kit.p11, own_session
    _, priv = kit.ec(P256)
    p11.C_DigestInit(s, Mechanism(CKM.SHA256))
    with ckr(CKR.KEY_INDIGESTIBLE):
        p11.C_DigestKey(s, priv)
