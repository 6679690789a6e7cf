"""AES, key wrap, HMAC, digests, key generation, key import / PKCS#8 / SPKI, registry."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mech_helpers import ec_pair, secret

from keygridd.mechanisms import (
    REGISTRY,
    Cost,
    LoadedKey,
    get,
    load_key,
    private_key_from_pkcs8,
    private_key_to_pkcs8,
    public_attrs_from_private,
    public_key_info,
    validate_import,
)
from keygridd.mechanisms.curves import ED25519, P384
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO
from keygridd.pkcs11.errors import (
    AttributeValueInvalid,
    DataLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    KeySizeRange,
    KeyTypeInconsistent,
    MechanismInvalid,
    MechanismParamInvalid,
    SignatureInvalid,
    SignatureLenRange,
    TemplateIncomplete,
    TemplateInconsistent,
)
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import CtrParams, GcmParams, UlongParams

Pair = tuple[LoadedKey, LoadedKey]


@pytest.mark.parametrize("size", [16, 24, 32])
def test_aes_modes_round_trip(size: int) -> None:
    attrs = get(CKM.AES_KEY_GEN).generate_key({CKA.VALUE_LEN: size})
    assert attrs[CKA.VALUE_LEN] == size and attrs[CKA.KEY_TYPE] == CKK.AES
    key = load_key(attrs)
    data = bytes(range(40))
    cases: list[tuple[int, object, bytes]] = [
        (CKM.AES_ECB, None, data[:32]),
        (CKM.AES_CBC, bytes(16), data[:32]),
        (CKM.AES_CBC_PAD, bytes(16), data),
        (CKM.AES_CTR, CtrParams(64, bytes(16)), data),
        (CKM.AES_GCM, GcmParams(iv=bytes(12), aad=b"a", tag_bits=96), data),
    ]
    for mech, param, pt in cases:
        m = get(mech)
        enc = m.encrypt_init(key, param)  # type: ignore[arg-type]
        bound = enc.one_shot_length(len(pt))
        ct = enc.one_shot(pt)
        assert len(ct) <= bound
        assert m.decrypt_init(key, param).one_shot(ct) == pt  # type: ignore[arg-type]
        # multi-part in odd pieces; update_length/final_length are upper bounds
        enc = m.encrypt_init(key, param)  # type: ignore[arg-type]
        out = b""
        for i in range(0, len(pt), 7):
            n = enc.update_length(len(pt[i : i + 7]))
            part = enc.update(pt[i : i + 7])
            assert len(part) <= n
            out += part
        fl = enc.final_length()
        tail = enc.final()
        assert len(tail) <= fl and out + tail == ct
        dec = m.decrypt_init(key, param)  # type: ignore[arg-type]
        plain = b"".join(dec.update(ct[i : i + 5]) for i in range(0, len(ct), 5)) + dec.final()
        assert plain == pt
        assert m.cost(key) is Cost.INLINE


def test_aes_errors() -> None:
    key = secret(bytes(16))
    with pytest.raises(DataLenRange):
        get(CKM.AES_CBC).encrypt_init(key, bytes(16)).one_shot(bytes(15))
    with pytest.raises(EncryptedDataLenRange):
        get(CKM.AES_ECB).decrypt_init(key, None).one_shot(bytes(17))
    ctx = get(CKM.AES_ECB).encrypt_init(key, None)
    ctx.update(bytes(5))
    with pytest.raises(DataLenRange):
        ctx.final()
    with pytest.raises(EncryptedDataInvalid):  # bad padding
        get(CKM.AES_CBC_PAD).decrypt_init(key, bytes(16)).one_shot(
            get(CKM.AES_CBC).encrypt_init(key, bytes(16)).one_shot(bytes(16))
        )
    with pytest.raises(MechanismParamInvalid):
        get(CKM.AES_CBC).encrypt_init(key, bytes(8))
    with pytest.raises(MechanismParamInvalid):
        get(CKM.AES_GCM).encrypt_init(key, bytes(12))
    with pytest.raises(MechanismParamInvalid):
        get(CKM.AES_GCM).encrypt_init(key, GcmParams(iv=bytes(12), tag_bits=100))
    with pytest.raises(MechanismParamInvalid):
        get(CKM.AES_CTR).encrypt_init(key, CtrParams(0, bytes(16)))
    with pytest.raises(KeyTypeInconsistent):
        get(CKM.AES_ECB).encrypt_init(secret(bytes(16), CKK.GENERIC_SECRET), None)
    with pytest.raises(KeySizeRange):
        get(CKM.AES_KEY_GEN).generate_key({CKA.VALUE_LEN: 20})
    with pytest.raises(TemplateIncomplete):
        get(CKM.AES_KEY_GEN).generate_key({})
    with pytest.raises(MechanismInvalid):
        get(CKM.AES_ECB).sign_init(key, None)


@pytest.mark.parametrize("tag_bits", [32, 64, 96, 104, 112, 120, 128])
@pytest.mark.parametrize("aad", [b"", b"header"])
def test_gcm_single_part_equals_multi_part(tag_bits: int, aad: bytes) -> None:
    """C_Encrypt takes one AEAD call, C_EncryptUpdate/Final a stream: the same bytes, any tag length."""
    key, p = secret(bytes(range(32))), GcmParams(iv=bytes(range(12)), aad=aad, tag_bits=tag_bits)
    data = bytes(range(100))
    one = get(CKM.AES_GCM).encrypt_init(key, p).one_shot(data)
    ctx = get(CKM.AES_GCM).encrypt_init(key, p)
    assert one == ctx.update(data[:33]) + ctx.update(data[33:]) + ctx.final()
    assert len(one) == len(data) + tag_bits // 8
    assert get(CKM.AES_GCM).decrypt_init(key, p).one_shot(one) == data


def test_gcm_cipher_is_made_once_per_loaded_key() -> None:
    """The AESGCM object (its key schedule) is kept with the loaded key and reused for every IV."""
    key, other = secret(bytes(range(32))), secret(bytes(range(1, 33)))
    gcm = get(CKM.AES_GCM)
    outputs = [gcm.encrypt_init(key, GcmParams(iv=bytes([i]) * 12)).one_shot(b"data") for i in range(3)]
    kept = key.derived["aes-gcm"]
    assert gcm.encrypt_init(key, GcmParams(iv=bytes(12))).one_shot(b"data") and key.derived["aes-gcm"] is kept
    assert len(set(outputs)) == 3  # each IV still gives its own ciphertext
    for i, sealed in enumerate(outputs):
        assert AESGCM(bytes(range(32))).decrypt(bytes([i]) * 12, sealed, None) == b"data"
    gcm.encrypt_init(other, GcmParams(iv=bytes(12)))
    assert other.derived["aes-gcm"] is not kept  # another key gets its own
    assert "aes-gcm" not in secret(bytes(16)).derived  # made on first use only


def test_gcm_tag_checked_before_release() -> None:
    key, p = secret(bytes(16)), GcmParams(iv=bytes(12))
    ct = get(CKM.AES_GCM).encrypt_init(key, p).one_shot(b"attack at dawn")
    dec = get(CKM.AES_GCM).decrypt_init(key, p)
    assert dec.update(ct[:-1] + bytes([ct[-1] ^ 1])) == b""
    with pytest.raises(EncryptedDataInvalid):
        dec.final()
    with pytest.raises(EncryptedDataLenRange):
        get(CKM.AES_GCM).decrypt_init(key, p).one_shot(bytes(5))


def test_ctr_counter_bits_limit() -> None:
    key = secret(bytes(16))
    cb = bytes(15) + b"\xff"  # 8-bit counter at 255: one block left
    ctx = get(CKM.AES_CTR).encrypt_init(key, CtrParams(8, cb))
    ctx.update(bytes(16))
    with pytest.raises(DataLenRange):
        ctx.update(b"x")


def test_key_wraps() -> None:
    kek = secret(bytes(range(16)))
    for mech in (CKM.AES_KEY_WRAP, CKM.AES_KEY_WRAP_KWP, CKM.AES_KEY_WRAP_PAD):
        m = get(mech)
        assert m.info.flags & F.WRAP and m.info.flags & F.UNWRAP
        data = bytes(range(24)) if mech == CKM.AES_KEY_WRAP else bytes(range(21))
        enc = m.encrypt_init(kek, None)
        wrapped = enc.one_shot(data)
        assert len(wrapped) <= enc.one_shot_length(len(data))
        assert m.decrypt_init(kek, None).one_shot(wrapped) == data
        with pytest.raises(EncryptedDataInvalid):
            m.decrypt_init(kek, None).one_shot(wrapped[:-1] + bytes([wrapped[-1] ^ 1]))
    # PAD is PKCS#7 + RFC 3394, not RFC 5649
    assert get(CKM.AES_KEY_WRAP_PAD).encrypt_init(kek, None).one_shot(bytes(21)) != get(
        CKM.AES_KEY_WRAP_KWP
    ).encrypt_init(kek, None).one_shot(bytes(21))
    with pytest.raises(DataLenRange):
        get(CKM.AES_KEY_WRAP).encrypt_init(kek, None).one_shot(bytes(20))
    with pytest.raises(MechanismParamInvalid):
        get(CKM.AES_KEY_WRAP).encrypt_init(kek, bytes(8))


def test_hmac_errors_and_keys() -> None:
    gen = get(CKM.GENERIC_SECRET_KEY_GEN).generate_key({CKA.VALUE_LEN: 32})
    key = load_key(gen)
    m = get(CKM.SHA256_HMAC)
    mac = m.sign_init(key, None).sign(b"d")
    with pytest.raises(SignatureInvalid):
        m.verify_init(key, None).verify(b"e", mac)
    with pytest.raises(SignatureLenRange):
        m.verify_init(key, None).verify(b"d", mac[:10])
    with pytest.raises(MechanismParamInvalid):
        get(CKM.SHA256_HMAC_GENERAL).sign_init(key, UlongParams(33))
    with pytest.raises(MechanismParamInvalid):
        m.sign_init(key, UlongParams(3))
    with pytest.raises(KeyTypeInconsistent):
        m.sign_init(secret(bytes(16), CKK.AES), None)
    sha3 = load_key(get(CKM.SHA3_256_KEY_GEN).generate_key({CKA.VALUE_LEN: 32}))
    get(CKM.SHA3_256_HMAC).verify_init(sha3, None).verify(b"x", get(CKM.SHA3_256_HMAC).sign_init(sha3, None).sign(b"x"))
    with pytest.raises(KeyTypeInconsistent):
        get(CKM.SHA512_HMAC).sign_init(sha3, None)
    short = get(CKM.SHA384_HMAC_GENERAL).sign_init(key, UlongParams(10)).sign(b"d")
    get(CKM.SHA384_HMAC_GENERAL).verify_init(key, UlongParams(10)).verify(b"d", short)


def test_registry_and_digest_key() -> None:
    with pytest.raises(MechanismInvalid):
        get(0x7FFFFFF0)
    assert all(m.mechanism == n for n, m in REGISTRY.items())
    ctx = get(CKM.SHA256).digest_init(None)
    ctx.update(b"key-bytes")
    assert len(ctx.final()) == 32
    with pytest.raises(MechanismParamInvalid):
        get(CKM.SHA256).digest_init(b"x")


def test_pkcs8_spki_and_public_attrs(rsa2048: Pair, p256: Pair) -> None:
    ed = ec_pair(ED25519.oid_der, CKM.EC_EDWARDS_KEY_PAIR_GEN)
    for pub, priv in (rsa2048, p256, ed):
        der = private_key_to_pkcs8(priv)
        back = private_key_from_pkcs8(der)
        assert private_key_to_pkcs8(load_key(back)) == der
        assert public_key_info(priv.attrs) == public_key_info(pub.attrs)
        serialization.load_der_public_key(public_key_info(pub.attrs))
        derived = public_attrs_from_private(priv.attrs)
        for attr in (CKA.MODULUS, CKA.PUBLIC_EXPONENT, CKA.EC_POINT):
            assert derived.get(attr) == pub.attrs.get(attr)
    with pytest.raises(Exception):  # noqa: B017 - any PKCS11Error
        private_key_to_pkcs8(secret(bytes(16)))


def test_validate_import(rsa2048: Pair) -> None:
    pub, priv = rsa2048
    imported = validate_import({k: v for k, v in pub.attrs.items() if k != CKA.MODULUS_BITS})
    assert imported[CKA.MODULUS_BITS] == 2048
    bare = {
        k: v
        for k, v in priv.attrs.items()
        if k not in (CKA.PRIME_1, CKA.PRIME_2, CKA.EXPONENT_1, CKA.EXPONENT_2, CKA.COEFFICIENT)
    }
    assert validate_import(bare)[CKA.PRIME_1] in (priv.attrs[CKA.PRIME_1], priv.attrs[CKA.PRIME_2])
    with pytest.raises(TemplateIncomplete):
        validate_import({k: v for k, v in pub.attrs.items() if k != CKA.MODULUS})
    with pytest.raises(TemplateInconsistent):
        validate_import({**pub.attrs, CKA.MODULUS_BITS: 1024})
    with pytest.raises(AttributeValueInvalid):
        validate_import({CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: bytes(15)})
    assert (
        validate_import({CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: bytes(16)})[CKA.VALUE_LEN] == 16
    )
    ec_pub, ec_priv = ec_pair(P384.oid_der)
    filled = validate_import({k: v for k, v in ec_priv.attrs.items()})
    assert filled[CKA.EC_POINT] == ec_pub.attrs[CKA.EC_POINT]
    raw_point = ec_pub.attrs[CKA.EC_POINT][2:]  # type: ignore[index]
    assert validate_import({**ec_pub.attrs, CKA.EC_POINT: raw_point})[CKA.EC_POINT] == ec_pub.attrs[CKA.EC_POINT]
    with pytest.raises(AttributeValueInvalid):
        validate_import({**ec_pub.attrs, CKA.EC_POINT: b"\x04" + bytes(96)})
