"""RSA, EC and EdDSA: round trips for every mechanism / size / curve, error codes, costs."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from mech_helpers import ec_pair, rsa_pair

from keygridd.mechanisms import Cost, LoadedKey, get, load_key
from keygridd.mechanisms.base import final_sign_job, sign_job
from keygridd.mechanisms.curves import ED448, ED25519, P256, P384, P521, SECP256K1
from keygridd.mechanisms.rsa import HASHED_PKCS, HASHED_PSS
from keygridd.pkcs11._constants import CKA, CKD, CKG, CKK, CKM
from keygridd.pkcs11.errors import (
    CurveNotSupported,
    DataLenRange,
    EncryptedDataInvalid,
    KeySizeRange,
    KeyTypeInconsistent,
    MechanismParamInvalid,
    OperationNotInitialized,
    SignatureInvalid,
    SignatureLenRange,
    TemplateIncomplete,
)
from keygridd.pkcs11.params import Ecdh1Params, EddsaParams, GcmParams, OaepParams, PssParams

Pair = tuple[LoadedKey, LoadedKey]
SHA256_DI = bytes.fromhex("3031300d060960864801650304020105000420")


def _sign_verify(mech: int, pair: Pair, param: object, data: bytes) -> bytes:
    pub, priv = pair
    m = get(mech)
    sig = m.sign_init(priv, param).sign(data)  # type: ignore[arg-type]
    m.verify_init(pub, param).verify(data, sig)  # type: ignore[arg-type]
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(SignatureInvalid):
        m.verify_init(pub, param).verify(data, bad)  # type: ignore[arg-type]
    with pytest.raises(SignatureLenRange):
        m.verify_init(pub, param).verify(data, sig[:-1])  # type: ignore[arg-type]
    return sig


@pytest.fixture(scope="module")
def rsa4096() -> Pair:
    return rsa_pair(4096)


@pytest.mark.parametrize("bits", [1024, 3072])
def test_rsa_keygen_sizes(bits: int) -> None:
    pub, priv = rsa_pair(bits)
    assert pub.attrs[CKA.MODULUS_BITS] == bits and len(pub.attrs[CKA.MODULUS]) == bits // 8  # type: ignore[arg-type]
    _sign_verify(CKM.SHA256_RSA_PKCS, (pub, priv), None, b"x")


def test_rsa_4096(rsa4096: Pair) -> None:
    _sign_verify(CKM.SHA512_RSA_PKCS_PSS, rsa4096, PssParams(CKM.SHA512, CKG.MGF1_SHA512, 64), b"data")


def test_rsa_keygen_errors() -> None:
    gen = get(CKM.RSA_PKCS_KEY_PAIR_GEN)
    with pytest.raises(TemplateIncomplete):
        gen.generate_key_pair({}, {})
    with pytest.raises(KeySizeRange):
        gen.generate_key_pair({CKA.MODULUS_BITS: 512}, {})
    assert gen.cost(None) is Cost.THREAD


@pytest.mark.parametrize("mech", sorted(HASHED_PKCS))
def test_rsa_hashed_pkcs(rsa2048: Pair, mech: int) -> None:
    sig = _sign_verify(mech, rsa2048, None, b"hello world")
    ctx = get(mech).sign_init(rsa2048[1], None)
    ctx.update(b"hello ")
    ctx.update(b"world")
    assert ctx.final() == sig  # PKCS#1 v1.5 is deterministic
    v = get(mech).verify_init(rsa2048[0], None)
    v.update(b"hello world")
    v.final(sig)


@pytest.mark.parametrize("mech", sorted(HASHED_PSS))
def test_rsa_hashed_pss(rsa2048: Pair, mech: int) -> None:
    _sign_verify(mech, rsa2048, PssParams(HASHED_PSS[mech], CKG.MGF1_SHA256, 20), b"msg")
    other = CKM.SHA_1 if HASHED_PSS[mech] != CKM.SHA_1 else CKM.SHA256
    with pytest.raises(MechanismParamInvalid):
        get(mech).sign_init(rsa2048[1], PssParams(other, CKG.MGF1_SHA1, 20))


def test_rsa_pkcs_raw_and_digestinfo_agree(rsa2048: Pair) -> None:
    priv = rsa2048[1]
    di = SHA256_DI + hashlib.sha256(b"m").digest()
    sig = _sign_verify(CKM.RSA_PKCS, rsa2048, None, di)
    assert sig == get(CKM.SHA256_RSA_PKCS).sign_init(priv, None).sign(b"m")
    tls = bytes(36)  # not a DigestInfo: the raw private operation
    _sign_verify(CKM.RSA_PKCS, rsa2048, None, tls)
    with pytest.raises(DataLenRange):
        get(CKM.RSA_PKCS).sign_init(priv, None).sign(bytes(256 - 10))
    ctx = get(CKM.RSA_PKCS).sign_init(priv, None)
    with pytest.raises(OperationNotInitialized):
        ctx.update(b"x")


def test_rsa_encrypt_mechanisms(rsa2048: Pair) -> None:
    pub, priv = rsa2048
    for mech, param in [
        (CKM.RSA_PKCS, None),
        (CKM.RSA_PKCS_OAEP, OaepParams()),
        (CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA256, CKG.MGF1_SHA256, source_data=b"label")),
        (CKM.RSA_X_509, None),
    ]:
        enc = get(mech).encrypt_init(pub, param)  # type: ignore[arg-type]
        ct = enc.one_shot(b"\x01secret")
        assert len(ct) == 256 and enc.one_shot_length(7) >= len(ct)
        pt = get(mech).decrypt_init(priv, param).one_shot(ct)  # type: ignore[arg-type]
        assert pt.lstrip(b"\x00") == b"\x01secret"
    with pytest.raises(EncryptedDataInvalid):
        get(CKM.RSA_PKCS_OAEP).decrypt_init(priv, OaepParams()).one_shot(bytes(255) + b"\x02")
    with pytest.raises(DataLenRange):
        get(CKM.RSA_PKCS_OAEP).encrypt_init(pub, OaepParams()).one_shot(bytes(256 - 41))


def test_rsa_x509_sign(rsa2048: Pair) -> None:
    _sign_verify(CKM.RSA_X_509, rsa2048, None, b"\x00\x01raw")


def test_rsa_pss_raw(rsa2048: Pair) -> None:
    h = hashlib.sha256(b"x").digest()
    _sign_verify(CKM.RSA_PKCS_PSS, rsa2048, PssParams(CKM.SHA256, CKG.MGF1_SHA256, 32), h)
    with pytest.raises(DataLenRange):
        get(CKM.RSA_PKCS_PSS).sign_init(rsa2048[1], PssParams(CKM.SHA256, CKG.MGF1_SHA256, 32)).sign(h[:-1])


def test_rsa_param_and_key_errors(rsa2048: Pair, p256: Pair) -> None:
    pub, priv = rsa2048
    with pytest.raises(MechanismParamInvalid):
        get(CKM.RSA_PKCS_PSS).sign_init(priv, None)
    with pytest.raises(MechanismParamInvalid):
        get(CKM.RSA_PKCS_OAEP).encrypt_init(pub, GcmParams(iv=bytes(12)))
    with pytest.raises(MechanismParamInvalid):
        get(CKM.RSA_PKCS_OAEP).encrypt_init(pub, OaepParams(CKM.SHA3_256, CKG.MGF1_SHA3_256))
    with pytest.raises(KeyTypeInconsistent):
        get(CKM.SHA256_RSA_PKCS).sign_init(p256[1], None)
    with pytest.raises(KeyTypeInconsistent):
        get(CKM.SHA256_RSA_PKCS).sign_init(pub, None)  # public key cannot sign
    m = get(CKM.RSA_PKCS)
    assert m.cost(priv) is Cost.THREAD and m.cost(pub) is Cost.INLINE


CURVES = [P256, P384, P521, SECP256K1]
ECDSA_HASHED = [CKM.ECDSA_SHA1, CKM.ECDSA_SHA224, CKM.ECDSA_SHA256, CKM.ECDSA_SHA384, CKM.ECDSA_SHA512,
                CKM.ECDSA_SHA3_224, CKM.ECDSA_SHA3_256, CKM.ECDSA_SHA3_384, CKM.ECDSA_SHA3_512]  # fmt: skip


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_ec_curves(curve: object) -> None:
    pair = ec_pair(curve.oid_der)  # type: ignore[attr-defined]
    sig = _sign_verify(CKM.ECDSA, pair, None, hashlib.sha256(b"m").digest())
    assert len(sig) == 2 * curve.order_bytes  # type: ignore[attr-defined]
    other = ec_pair(curve.oid_der)  # type: ignore[attr-defined]
    for kdf, n in [(CKD.NULL, None), (CKD.SHA256_KDF, 32), (CKD.SHA1_KDF, 16)]:
        tmpl = {} if n is None else {CKA.VALUE_LEN: n}
        pa = Ecdh1Params(kdf, b"", other[0].attrs[CKA.EC_POINT])  # type: ignore[arg-type]
        pb = Ecdh1Params(kdf, b"", pair[0].attrs[CKA.EC_POINT])  # type: ignore[arg-type]
        za = get(CKM.ECDH1_DERIVE).derive(pair[1], pa, tmpl)
        zb = get(CKM.ECDH1_COFACTOR_DERIVE).derive(other[1], pb, tmpl)
        assert za == zb and (n is None or len(za) == n)


@pytest.mark.parametrize("mech", ECDSA_HASHED)
def test_ecdsa_hashed(p256: Pair, mech: int) -> None:
    _sign_verify(mech, p256, None, b"message")
    ctx = get(mech).sign_init(p256[1], None)
    ctx.update(b"mess")
    ctx.update(b"age")
    get(mech).verify_init(p256[0], None).verify(b"message", ctx.final())


@pytest.mark.parametrize("mech", ECDSA_HASHED)
def test_ecdsa_hashed_jobs_are_ecdsa_over_the_digest(p256: Pair, mech: int) -> None:
    """The signer's job of CKM_ECDSA_SHA*: CKM_ECDSA of the finished hash, which is hashed once."""
    raw, hashed = get(CKM.ECDSA), get(mech)
    h = hashes.Hash(hashed.factory())  # type: ignore[attr-defined]
    h.update(b"message")
    digest = h.finalize()
    one = hashed.sign_init(p256[1], None)
    job = sign_job(one, b"message")
    assert job is not None and job.key is p256[1] and job.data == digest and job.side == 32
    signature = one.sign(b"message")  # the signature made inline after the job: of the same digest
    raw.verify_init(p256[0], None).verify(digest, signature)
    hashed.verify_init(p256[0], None).verify(b"message", signature)
    parts = hashed.sign_init(p256[1], None)
    parts.update(b"mess")
    parts.update(b"age")
    job = final_sign_job(parts)
    assert job is not None and job.data == digest
    hashed.verify_init(p256[0], None).verify(b"message", parts.final())
    rsa_context = get(CKM.SHA256_RSA_PKCS).sign_init(rsa_pair(1024)[1], None)
    assert sign_job(rsa_context, b"m") is None and final_sign_job(rsa_context) is None
    assert len(rsa_context.sign(b"m")) == 128  # asking for no job left the hash alone


def test_ec_errors(p256: Pair) -> None:
    with pytest.raises(CurveNotSupported):
        get(CKM.EC_KEY_PAIR_GEN).generate_key_pair({CKA.EC_PARAMS: bytes.fromhex("06052b81040021")}, {})
    with pytest.raises(OperationNotInitialized):
        get(CKM.ECDSA).sign_init(p256[1], None).update(b"x")
    with pytest.raises(MechanismParamInvalid):
        get(CKM.ECDH1_DERIVE).derive(p256[1], Ecdh1Params(CKD.NULL, b"", b"\x04" + bytes(64)), {})
    with pytest.raises(TemplateIncomplete):
        get(CKM.ECDH1_DERIVE).derive(p256[1], Ecdh1Params(CKD.SHA256_KDF, b"", p256[0].attrs[CKA.EC_POINT]), {})  # type: ignore[arg-type]
    assert get(CKM.ECDSA).cost(p256[1]) is Cost.INLINE


@pytest.mark.parametrize("curve", [ED25519, ED448], ids=lambda c: c.name)
def test_eddsa_round_trip(curve: object) -> None:
    pair = ec_pair(curve.oid_der, CKM.EC_EDWARDS_KEY_PAIR_GEN)  # type: ignore[attr-defined]
    sig = _sign_verify(CKM.EDDSA, pair, None, b"m")
    assert len(sig) == (64 if curve is ED25519 else 114)
    assert get(CKM.EDDSA).cost(pair[1]) is Cost.INLINE
    with pytest.raises(MechanismParamInvalid):
        get(CKM.EDDSA).sign_init(pair[1], EddsaParams(ph_flag=True))
    assert pair[0].attrs[CKA.KEY_TYPE] == CKK.EC_EDWARDS


def test_eddsa_printable_string_params() -> None:
    pub, priv = ec_pair(b"\x13\x0cedwards25519", CKM.EC_EDWARDS_KEY_PAIR_GEN)
    with pytest.raises(MechanismParamInvalid):
        get(CKM.EDDSA).sign_init(priv, EddsaParams())  # Ed25519ctx is not available
    get(CKM.EDDSA).verify_init(pub, None).verify(b"", get(CKM.EDDSA).sign_init(priv, None).sign(b""))
    assert load_key(priv.attrs).key_type == CKK.EC_EDWARDS
