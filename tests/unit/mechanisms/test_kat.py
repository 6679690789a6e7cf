"""Known-answer tests against published vectors (tests/vectors/kat/*.json)."""

from __future__ import annotations

import pytest
from mech_helpers import kat, secret

from keygridd.mechanisms import get, load_key
from keygridd.mechanisms.curves import ED448, P256, der_octet_string
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO
from keygridd.pkcs11.errors import SignatureInvalid
from keygridd.pkcs11.params import CtrParams, GcmParams, UlongParams

H = bytes.fromhex


@pytest.mark.parametrize("v", kat("digest.json")["vectors"], ids=lambda v: v["mechanism"])
def test_digest(v: dict[str, str]) -> None:
    mech = get(CKM[v["mechanism"]])
    assert mech.digest_init(None).digest(H(v["message"])) == H(v["digest"])
    ctx = mech.digest_init(None)
    for byte in H(v["message"]):
        ctx.update(bytes([byte]))
    assert ctx.final() == H(v["digest"])
    assert ctx.length == len(H(v["digest"]))


@pytest.mark.parametrize("v", kat("hmac_rfc4231.json")["vectors"], ids=lambda v: str(v["case"]))
@pytest.mark.parametrize("alg", ["SHA224", "SHA256", "SHA384", "SHA512"])
def test_hmac(v: dict[str, str], alg: str) -> None:
    key = secret(H(v["key"]), CKK.GENERIC_SECRET)
    mech = get(CKM[f"{alg}_HMAC"])
    assert mech.sign_init(key, None).sign(H(v["data"])) == H(v[alg])
    mech.verify_init(key, None).verify(H(v["data"]), H(v[alg]))


def test_hmac_general_truncated() -> None:
    v = kat("hmac_rfc4231.json")["truncated"][0]
    key = secret(H(v["key"]), CKK.SHA256_HMAC)
    mech = get(CKM.SHA256_HMAC_GENERAL)
    assert mech.sign_init(key, UlongParams(16)).sign(H(v["data"])) == H(v["SHA256"])
    mech.verify_init(key, UlongParams(16)).verify(H(v["data"]), H(v["SHA256"]))


def test_aes_sp800_38a() -> None:
    v = kat("aes_sp800_38a.json")
    key, pt = secret(H(v["key"])), H(v["plaintext"])
    assert get(CKM.AES_ECB).encrypt_init(key, None).one_shot(pt) == H(v["ecb"])
    assert get(CKM.AES_ECB).decrypt_init(key, None).one_shot(H(v["ecb"])) == pt
    assert get(CKM.AES_CBC).encrypt_init(key, H(v["cbc_iv"])).one_shot(pt) == H(v["cbc"])
    assert get(CKM.AES_CBC).decrypt_init(key, H(v["cbc_iv"])).one_shot(H(v["cbc"])) == pt
    ctr = CtrParams(128, H(v["ctr_counter"]))
    assert get(CKM.AES_CTR).encrypt_init(key, ctr).one_shot(pt) == H(v["ctr"])
    assert get(CKM.AES_CTR).decrypt_init(key, ctr).one_shot(H(v["ctr"])) == pt


@pytest.mark.parametrize("v", kat("aes_gcm.json")["vectors"], ids=lambda v: str(v["case"]))
def test_aes_gcm(v: dict[str, str]) -> None:
    key = secret(H(v["key"]))
    p = GcmParams(iv=H(v["iv"]), aad=H(v["aad"]), tag_bits=128)
    out = H(v["ciphertext"]) + H(v["tag"])
    assert get(CKM.AES_GCM).encrypt_init(key, p).one_shot(H(v["plaintext"])) == out
    assert get(CKM.AES_GCM).decrypt_init(key, p).one_shot(out) == H(v["plaintext"])


def test_keywrap() -> None:
    v = kat("keywrap.json")
    for mech, rows in ((CKM.AES_KEY_WRAP, v["kw"]), (CKM.AES_KEY_WRAP_KWP, v["kwp"])):
        for row in rows:
            kek = secret(H(row["kek"]))
            assert get(mech).encrypt_init(kek, None).one_shot(H(row["key"])) == H(row["wrapped"])
            assert get(mech).decrypt_init(kek, None).one_shot(H(row["wrapped"])) == H(row["key"])


@pytest.mark.parametrize("curve", ["ed25519", "ed448"])
def test_eddsa(curve: str) -> None:
    oid = ED448.oid_der if curve == "ed448" else bytes.fromhex("06032b6570")
    for v in kat("eddsa_rfc8032.json")[curve]:
        base = {CKA.KEY_TYPE: CKK.EC_EDWARDS, CKA.EC_PARAMS: oid}
        priv = load_key({**base, CKA.CLASS: CKO.PRIVATE_KEY, CKA.VALUE: H(v["secret"])})
        pub = load_key({**base, CKA.CLASS: CKO.PUBLIC_KEY, CKA.EC_POINT: der_octet_string(H(v["public"]))})
        assert get(CKM.EDDSA).sign_init(priv, None).sign(H(v["message"])) == H(v["signature"])
        get(CKM.EDDSA).verify_init(pub, None).verify(H(v["message"]), H(v["signature"]))


def test_ecdsa_p256_verify() -> None:
    v = kat("ecdsa_p256.json")
    point = b"\x04" + H(v["ux"]) + H(v["uy"])
    pub = load_key({CKA.CLASS: CKO.PUBLIC_KEY, CKA.KEY_TYPE: CKK.EC, CKA.EC_PARAMS: P256.oid_der,
                    CKA.EC_POINT: der_octet_string(point)})  # fmt: skip
    for row in v["vectors"]:
        sig = H(row["r"]) + H(row["s"])
        ctx = get(CKM.ECDSA_SHA256).verify_init(pub, None)
        if row["valid"]:
            ctx.verify(H(row["message"]), sig)
        else:
            with pytest.raises(SignatureInvalid):
                ctx.verify(H(row["message"]), sig)
