"""RSA: key pair generation, PKCS #1 v1.5, raw (X.509), PSS and OAEP, with and without hashing.

PKCS#11 v2.40 Current Mechanisms 2.1 "RSA" (2.1.4 key pair generation,
2.1.6 PKCS #1 v1.5, 2.1.7-2.1.11 PSS and OAEP, 2.1.12 X.509 raw, 2.1.13-2.1.15
hashed signatures) and v3.0 Current Mechanisms 2.1 for the SHA-3 variants.

Rules:
* CKM_RSA_PKCS, CKM_RSA_X_509, CKM_RSA_PKCS_PSS and CKM_RSA_PKCS_OAEP are
  single-part (update raises CKR_OPERATION_NOT_INITIALIZED); the hashing
  mechanisms are multi-part and hash incrementally.
* CKM_RSA_PKCS signs a DigestInfo it recognises through ``cryptography``;
  other input (e.g. the TLS 1.0 MD5||SHA-1 value) and CKM_RSA_X_509 use the
  raw private operation below (CRT, blinded, checked against the public
  exponent), since ``cryptography`` exposes no raw RSA.
* CKM_RSA_PKCS decryption uses OpenSSL's implicit rejection (Marvin attack
  countermeasure): bad padding usually yields random-looking plaintext rather
  than CKR_ENCRYPTED_DATA_INVALID.
* Key sizes: generation 1024-4096 bits; operations accept 1024-16384 bits
  (CKR_KEY_SIZE_RANGE otherwise). Private-key operations and key generation
  cost THREAD (about 1 ms for RSA-2048); public-key operations are INLINE.
"""

from __future__ import annotations

import hmac
import math
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from keygridd.mechanisms.base import (
    Cost,
    HashSign,
    HashVerify,
    LoadedKey,
    Mechanism,
    MechanismInfo,
    SingleCipher,
    SingleSign,
    SingleVerify,
    bytes_to_int,
    int_attr,
    int_to_bytes,
    no_param,
    param_of,
    register,
)
from keygridd.mechanisms.digest import HASHES, MGF1, HashFactory, digest_size, hash_in_digest_info
from keygridd.mechanisms.keys import rsa_private_attrs, rsa_public_attrs
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO, CKZ
from keygridd.pkcs11.errors import (
    AttributeValueInvalid,
    DataInvalid,
    DataLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    GeneralError,
    KeySizeRange,
    MechanismParamInvalid,
    SignatureInvalid,
    SignatureLenRange,
)
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import OaepParams, Param, PssParams

GEN_MIN_BITS, GEN_MAX_BITS = 1024, 4096
OP_MIN_BITS, OP_MAX_BITS = 1024, 16384

_OAEP_HASHES = (CKM.SHA_1, CKM.SHA224, CKM.SHA256, CKM.SHA384, CKM.SHA512)  # OpenSSL has no SHA-3 OAEP
_PSS_HASHES = (*_OAEP_HASHES, CKM.SHA3_224, CKM.SHA3_256, CKM.SHA3_384, CKM.SHA3_512)


def _raw_public(key: rsa.RSAPublicKey, m: int) -> int:
    pn = key.public_numbers()
    return pow(m, pn.e, pn.n)


def _raw_private(key: rsa.RSAPrivateKey, m: int) -> int:
    """m^d mod n with CRT and base blinding; the result is checked with the public exponent (fault attacks)."""
    sn = key.private_numbers()
    n, e = sn.public_numbers.n, sn.public_numbers.e
    while True:
        r = secrets.randbelow(n - 2) + 2
        if math.gcd(r, n) == 1:
            break
    blinded = (m * pow(r, e, n)) % n
    s1 = pow(blinded % sn.p, sn.dmp1, sn.p)
    s2 = pow(blinded % sn.q, sn.dmq1, sn.q)
    s = ((s2 + ((sn.iqmp * (s1 - s2)) % sn.p) * sn.q) * pow(r, -1, n)) % n
    if pow(s, e, n) != m:
        raise GeneralError("RSA private operation failed its consistency check")
    return s


class _RsaMechanism(Mechanism):
    """Shared key checks for the RSA mechanisms."""

    key_types = frozenset({int(CKK.RSA)})

    def __init__(self, mechanism: int, flags: int) -> None:
        self.mechanism = mechanism
        self.info = MechanismInfo(OP_MIN_BITS, OP_MAX_BITS, flags)

    def cost(self, key: LoadedKey | None) -> Cost:
        return Cost.THREAD if key is None or key.is_private else Cost.INLINE

    def private(self, key: LoadedKey) -> rsa.RSAPrivateKey:
        self.check_key(key, CKO.PRIVATE_KEY)
        assert isinstance(key.material, rsa.RSAPrivateKey)
        self._check_size(key.material.key_size)
        return key.material

    def public(self, key: LoadedKey) -> rsa.RSAPublicKey:
        self.check_key(key, CKO.PUBLIC_KEY)
        assert isinstance(key.material, rsa.RSAPublicKey)
        self._check_size(key.material.key_size)
        return key.material

    def _check_size(self, bits: int) -> None:
        if not OP_MIN_BITS <= bits <= OP_MAX_BITS:
            raise KeySizeRange(f"{self.name} takes {OP_MIN_BITS}-{OP_MAX_BITS} bit keys")


def _k(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> int:
    return (key.key_size + 7) // 8


def _check_sig_len(signature: bytes, k: int) -> None:
    if len(signature) != k:
        raise SignatureLenRange("signature length differs from the modulus length")


class RsaKeyPairGen(_RsaMechanism):
    """CKM_RSA_PKCS_KEY_PAIR_GEN (2.1.4)."""

    def __init__(self) -> None:
        super().__init__(CKM.RSA_PKCS_KEY_PAIR_GEN, int(F.GENERATE_KEY_PAIR))
        self.info = MechanismInfo(GEN_MIN_BITS, GEN_MAX_BITS, int(F.GENERATE_KEY_PAIR))

    def generate_key_pair(
        self, public_template: Mapping[int, object], private_template: Mapping[int, object]
    ) -> tuple[dict[int, object], dict[int, object]]:
        bits = int_attr(public_template, CKA.MODULUS_BITS)
        if not GEN_MIN_BITS <= bits <= GEN_MAX_BITS:
            raise KeySizeRange(f"RSA key generation takes {GEN_MIN_BITS}-{GEN_MAX_BITS} bits")
        raw_e = public_template.get(CKA.PUBLIC_EXPONENT, int_to_bytes(65537))
        if not isinstance(raw_e, bytes):
            raise AttributeValueInvalid("CKA_PUBLIC_EXPONENT must be bytes")
        e = bytes_to_int(raw_e)
        if e not in (3, 65537):
            raise AttributeValueInvalid("CKA_PUBLIC_EXPONENT must be 3 or 65537")
        key = rsa.generate_private_key(e, bits)
        return rsa_public_attrs(key.public_key()), rsa_private_attrs(key)


class RsaPkcs(_RsaMechanism):
    """CKM_RSA_PKCS (2.1.6): DigestInfo sign/verify, PKCS #1 v1.5 encrypt/decrypt and wrap/unwrap."""

    def __init__(self) -> None:
        super().__init__(CKM.RSA_PKCS, int(F.ENCRYPT | F.DECRYPT | F.SIGN | F.VERIFY | F.WRAP | F.UNWRAP))

    def sign_init(self, key: LoadedKey, param: Param) -> SingleSign:
        no_param(self, param)
        priv = self.private(key)
        k = _k(priv)

        def sign(data: bytes) -> bytes:
            if len(data) > k - 11:
                raise DataLenRange("CKM_RSA_PKCS input longer than k-11 bytes")
            factory = hash_in_digest_info(data)
            if factory is not None:
                digest = data[-digest_size(factory) :]
                return priv.sign(digest, padding.PKCS1v15(), utils.Prehashed(factory()))
            em = b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data
            return int_to_bytes(_raw_private(priv, bytes_to_int(em)), k)

        return SingleSign(k, sign)

    def verify_init(self, key: LoadedKey, param: Param) -> SingleVerify:
        no_param(self, param)
        pub = self.public(key)
        k = _k(pub)

        def verify(data: bytes, signature: bytes) -> None:
            _check_sig_len(signature, k)
            if len(data) > k - 11:
                raise DataLenRange("CKM_RSA_PKCS input longer than k-11 bytes")
            try:
                recovered = pub.recover_data_from_signature(signature, padding.PKCS1v15(), None)
            except InvalidSignature:
                raise SignatureInvalid("signature does not verify") from None
            if not hmac.compare_digest(recovered, data):
                raise SignatureInvalid("signature does not verify")

        return SingleVerify(verify)

    def encrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        no_param(self, param)
        pub = self.public(key)
        k = _k(pub)

        def encrypt(data: bytes) -> bytes:
            if len(data) > k - 11:
                raise DataLenRange("CKM_RSA_PKCS input longer than k-11 bytes")
            return pub.encrypt(data, padding.PKCS1v15())

        return SingleCipher(encrypt, lambda n: k)

    def decrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        no_param(self, param)
        priv = self.private(key)
        k = _k(priv)

        def decrypt(data: bytes) -> bytes:
            if len(data) != k:
                raise EncryptedDataLenRange("ciphertext length differs from the modulus length")
            try:
                return priv.decrypt(data, padding.PKCS1v15())
            except ValueError:
                raise EncryptedDataInvalid("decryption failed") from None

        return SingleCipher(decrypt, lambda n: k)


class RsaX509(_RsaMechanism):
    """CKM_RSA_X_509 (2.1.12): raw RSA; output is always k bytes."""

    def __init__(self) -> None:
        super().__init__(CKM.RSA_X_509, int(F.ENCRYPT | F.DECRYPT | F.SIGN | F.VERIFY))

    @staticmethod
    def _input(data: bytes, n: int, k: int, err: type[DataLenRange] | type[EncryptedDataLenRange]) -> int:
        if len(data) > k:
            raise err("input longer than the modulus")
        m = bytes_to_int(data)
        if m >= n:
            raise DataInvalid("input is not smaller than the modulus")
        return m

    def sign_init(self, key: LoadedKey, param: Param) -> SingleSign:
        no_param(self, param)
        priv = self.private(key)
        k, n = _k(priv), priv.private_numbers().public_numbers.n
        return SingleSign(k, lambda data: int_to_bytes(_raw_private(priv, self._input(data, n, k, DataLenRange)), k))

    def verify_init(self, key: LoadedKey, param: Param) -> SingleVerify:
        no_param(self, param)
        pub = self.public(key)
        k, n = _k(pub), pub.public_numbers().n

        def verify(data: bytes, signature: bytes) -> None:
            _check_sig_len(signature, k)
            m = self._input(data, n, k, DataLenRange)
            s = bytes_to_int(signature)
            if s >= n or not hmac.compare_digest(int_to_bytes(_raw_public(pub, s), k), int_to_bytes(m, k)):
                raise SignatureInvalid("signature does not verify")

        return SingleVerify(verify)

    def encrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        no_param(self, param)
        pub = self.public(key)
        k, n = _k(pub), pub.public_numbers().n
        return SingleCipher(
            lambda d: int_to_bytes(_raw_public(pub, self._input(d, n, k, DataLenRange)), k), lambda _: k
        )

    def decrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        no_param(self, param)
        priv = self.private(key)
        k, n = _k(priv), priv.private_numbers().public_numbers.n

        def decrypt(data: bytes) -> bytes:
            if len(data) != k:
                raise EncryptedDataLenRange("ciphertext length differs from the modulus length")
            c = bytes_to_int(data)
            if c >= n:
                raise EncryptedDataInvalid("ciphertext is not smaller than the modulus")
            return int_to_bytes(_raw_private(priv, c), k)

        return SingleCipher(decrypt, lambda _: k)


def _pss(mech: Mechanism, param: Param, key_bits: int, required_hash: int | None) -> tuple[HashFactory, padding.PSS]:
    p = param_of(mech, param, PssParams)
    if p.hash_alg not in _PSS_HASHES or (required_hash is not None and p.hash_alg != required_hash):
        raise MechanismParamInvalid(f"{mech.name}: hash_alg not allowed")
    mgf = MGF1.get(p.mgf)
    if mgf is None:
        raise MechanismParamInvalid(f"{mech.name}: unknown MGF")
    factory = HASHES[p.hash_alg]
    em_len = (key_bits - 1 + 7) // 8
    if not 0 <= p.s_len <= em_len - digest_size(factory) - 2:
        raise MechanismParamInvalid(f"{mech.name}: salt length out of range for this key")
    return factory, padding.PSS(mgf=padding.MGF1(mgf()), salt_length=p.s_len)


class RsaPss(_RsaMechanism):
    """CKM_RSA_PKCS_PSS (2.1.10): the input is the hash value; CK_RSA_PKCS_PSS_PARAMS required."""

    def __init__(self) -> None:
        super().__init__(CKM.RSA_PKCS_PSS, int(F.SIGN | F.VERIFY))

    def sign_init(self, key: LoadedKey, param: Param) -> SingleSign:
        priv = self.private(key)
        factory, pad = _pss(self, param, priv.key_size, None)
        size = digest_size(factory)

        def sign(data: bytes) -> bytes:
            if len(data) != size:
                raise DataLenRange("CKM_RSA_PKCS_PSS input must be one hash value")
            return priv.sign(data, pad, utils.Prehashed(factory()))

        return SingleSign(_k(priv), sign)

    def verify_init(self, key: LoadedKey, param: Param) -> SingleVerify:
        pub = self.public(key)
        factory, pad = _pss(self, param, pub.key_size, None)
        size, k = digest_size(factory), _k(pub)

        def verify(data: bytes, signature: bytes) -> None:
            _check_sig_len(signature, k)
            if len(data) != size:
                raise DataLenRange("CKM_RSA_PKCS_PSS input must be one hash value")
            try:
                pub.verify(signature, data, pad, utils.Prehashed(factory()))
            except InvalidSignature:
                raise SignatureInvalid("signature does not verify") from None

        return SingleVerify(verify)


class RsaHashPkcs(_RsaMechanism):
    """CKM_SHA*_RSA_PKCS (2.1.13, and v3.0 for SHA-3): multi-part PKCS #1 v1.5 signatures."""

    def __init__(self, mechanism: int, factory: HashFactory) -> None:
        super().__init__(mechanism, int(F.SIGN | F.VERIFY))
        self.factory = factory

    def sign_init(self, key: LoadedKey, param: Param) -> HashSign:
        no_param(self, param)
        priv = self.private(key)
        algorithm = self.factory()
        return HashSign(algorithm, _k(priv), lambda d: priv.sign(d, padding.PKCS1v15(), utils.Prehashed(algorithm)))

    def verify_init(self, key: LoadedKey, param: Param) -> HashVerify:
        no_param(self, param)
        pub = self.public(key)
        algorithm, k = self.factory(), _k(pub)

        def verify(digest: bytes, signature: bytes) -> None:
            _check_sig_len(signature, k)
            try:
                pub.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
            except InvalidSignature:
                raise SignatureInvalid("signature does not verify") from None

        return HashVerify(algorithm, verify)


class RsaHashPss(_RsaMechanism):
    """CKM_SHA*_RSA_PKCS_PSS (2.1.15, and v3.0 for SHA-3): multi-part PSS; params.hash_alg must match."""

    def __init__(self, mechanism: int, digest_mechanism: int) -> None:
        super().__init__(mechanism, int(F.SIGN | F.VERIFY))
        self.digest_mechanism = digest_mechanism

    def sign_init(self, key: LoadedKey, param: Param) -> HashSign:
        priv = self.private(key)
        factory, pad = _pss(self, param, priv.key_size, self.digest_mechanism)
        algorithm = factory()
        return HashSign(algorithm, _k(priv), lambda d: priv.sign(d, pad, utils.Prehashed(algorithm)))

    def verify_init(self, key: LoadedKey, param: Param) -> HashVerify:
        pub = self.public(key)
        factory, pad = _pss(self, param, pub.key_size, self.digest_mechanism)
        algorithm, k = factory(), _k(pub)

        def verify(digest: bytes, signature: bytes) -> None:
            _check_sig_len(signature, k)
            try:
                pub.verify(signature, digest, pad, utils.Prehashed(algorithm))
            except InvalidSignature:
                raise SignatureInvalid("signature does not verify") from None

        return HashVerify(algorithm, verify)


class RsaOaep(_RsaMechanism):
    """CKM_RSA_PKCS_OAEP (2.1.8): MGF1 with SHA-1/224/256/384/512; source data is the label."""

    def __init__(self) -> None:
        super().__init__(CKM.RSA_PKCS_OAEP, int(F.ENCRYPT | F.DECRYPT | F.WRAP | F.UNWRAP))

    def _padding(self, param: Param) -> tuple[padding.OAEP, int]:
        p = param_of(self, param, OaepParams)
        mgf = MGF1.get(p.mgf)
        if p.hash_alg not in _OAEP_HASHES or mgf is None or mgf().name.startswith("sha3-"):
            raise MechanismParamInvalid("CKM_RSA_PKCS_OAEP: hash or MGF not supported")
        if p.source != CKZ.DATA_SPECIFIED and not (p.source == 0 and not p.source_data):
            raise MechanismParamInvalid("CKM_RSA_PKCS_OAEP: source must be CKZ_DATA_SPECIFIED")
        algorithm: hashes.HashAlgorithm = HASHES[p.hash_alg]()
        pad = padding.OAEP(padding.MGF1(mgf()), algorithm, p.source_data or None)
        return pad, algorithm.digest_size

    def encrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        pad, h_len = self._padding(param)
        pub = self.public(key)
        k = _k(pub)

        def encrypt(data: bytes) -> bytes:
            if len(data) > k - 2 * h_len - 2:
                raise DataLenRange("CKM_RSA_PKCS_OAEP input longer than k-2hLen-2 bytes")
            return pub.encrypt(data, pad)

        return SingleCipher(encrypt, lambda _: k)

    def decrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        pad, _ = self._padding(param)
        priv = self.private(key)
        k = _k(priv)

        def decrypt(data: bytes) -> bytes:
            if len(data) != k:
                raise EncryptedDataLenRange("ciphertext length differs from the modulus length")
            try:
                return priv.decrypt(data, pad)
            except ValueError:
                raise EncryptedDataInvalid("decryption failed") from None

        return SingleCipher(decrypt, lambda _: k)


register(RsaKeyPairGen())
register(RsaPkcs())
register(RsaX509())
register(RsaPss())
register(RsaOaep())

HASHED_PKCS: dict[int, int] = {
    CKM.SHA1_RSA_PKCS: CKM.SHA_1,
    CKM.SHA224_RSA_PKCS: CKM.SHA224,
    CKM.SHA256_RSA_PKCS: CKM.SHA256,
    CKM.SHA384_RSA_PKCS: CKM.SHA384,
    CKM.SHA512_RSA_PKCS: CKM.SHA512,
    CKM.SHA3_224_RSA_PKCS: CKM.SHA3_224,
    CKM.SHA3_256_RSA_PKCS: CKM.SHA3_256,
    CKM.SHA3_384_RSA_PKCS: CKM.SHA3_384,
    CKM.SHA3_512_RSA_PKCS: CKM.SHA3_512,
}
HASHED_PSS: dict[int, int] = {
    CKM.SHA1_RSA_PKCS_PSS: CKM.SHA_1,
    CKM.SHA224_RSA_PKCS_PSS: CKM.SHA224,
    CKM.SHA256_RSA_PKCS_PSS: CKM.SHA256,
    CKM.SHA384_RSA_PKCS_PSS: CKM.SHA384,
    CKM.SHA512_RSA_PKCS_PSS: CKM.SHA512,
    CKM.SHA3_224_RSA_PKCS_PSS: CKM.SHA3_224,
    CKM.SHA3_256_RSA_PKCS_PSS: CKM.SHA3_256,
    CKM.SHA3_384_RSA_PKCS_PSS: CKM.SHA3_384,
    CKM.SHA3_512_RSA_PKCS_PSS: CKM.SHA3_512,
}
for _m, _h in HASHED_PKCS.items():
    register(RsaHashPkcs(_m, HASHES[_h]))
for _m, _h in HASHED_PSS.items():
    register(RsaHashPss(_m, _h))
