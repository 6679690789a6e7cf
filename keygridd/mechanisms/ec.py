"""Elliptic curves over prime fields: key pair generation, ECDSA and ECDH.

PKCS#11 v2.40 Current Mechanisms 2.3 "Elliptic Curve": 2.3.5 CKM_EC_KEY_PAIR_GEN,
2.3.6 CKM_ECDSA, 2.3.7 CKM_ECDSA_SHA*, 2.3.10-2.3.12 CKM_ECDH1_DERIVE and
CKM_ECDH1_COFACTOR_DERIVE (CK_ECDH1_DERIVE_PARAMS, 2.3.15), and v3.0 Current
Mechanisms 2.3 for CKM_ECDSA_SHA3_*. Curves: P-256, P-384, P-521, secp256k1.

Rules:
* CKM_ECDSA signs its input as the hash value (truncated by the curve order
  as ANSI X9.62 says) and is single-part; CKM_ECDSA_SHA* hash incrementally.
* Signatures are r || s, each left-padded to the order length, never DER.
* ECDH: the peer public value is a raw point (compressed or uncompressed) or
  a DER OCTET STRING of one; CKD_NULL requires empty shared data and returns
  Z (truncated to CKA_VALUE_LEN, keeping the trailing bytes, if given);
  CKD_SHA*_KDF is ANSI X9.63 with the shared data as SharedInfo and needs
  CKA_VALUE_LEN. The cofactor variant equals the plain one on these curves
  (cofactor 1).
* Costs: ECDSA P-256 sign is about 36 us, so signing, verifying and deriving
  are INLINE; key generation is THREAD (P-384/P-521/secp256k1 take 0.25-0.7 ms
  and the cost is chosen before the template is read).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from keygridd.mechanisms.base import (
    Cost,
    EcdsaJob,
    HashSign,
    HashVerify,
    LoadedKey,
    Mechanism,
    MechanismInfo,
    SingleSign,
    SingleVerify,
    bytes_attr,
    bytes_to_int,
    int_attr,
    int_to_bytes,
    no_param,
    param_of,
    register,
)
from keygridd.mechanisms.curves import Curve, curve_from_params, curve_of, ec_public_from_point
from keygridd.mechanisms.digest import HASHES, HashFactory
from keygridd.mechanisms.keys import ec_point_der
from keygridd.pkcs11._constants import CKA, CKD, CKK, CKM, CKO
from keygridd.pkcs11.errors import (
    AttributeValueInvalid,
    DataLenRange,
    KeySizeRange,
    MechanismParamInvalid,
    SignatureInvalid,
    SignatureLenRange,
    TemplateIncomplete,
)
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import Ecdh1Params, Param

_EC_FLAGS = F.EC_F_P | F.EC_NAMEDCURVE | F.EC_UNCOMPRESS
MIN_BITS, MAX_BITS = 256, 521
MAX_ECDSA_INPUT = 1024  # CKM_ECDSA input bytes; longer input is certainly not a hash value

KDFS: dict[int, HashFactory] = {
    CKD.SHA1_KDF: hashes.SHA1,
    CKD.SHA224_KDF: hashes.SHA224,
    CKD.SHA256_KDF: hashes.SHA256,
    CKD.SHA384_KDF: hashes.SHA384,
    CKD.SHA512_KDF: hashes.SHA512,
}


class _RawHash(hashes.HashAlgorithm):
    """Stands for "an already computed value of n bytes": ECDSA signs it without a DigestInfo."""

    name = "raw-ecdsa-input"
    block_size = None

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def digest_size(self) -> int:
        return self._size


@functools.cache
def _raw_ecdsa(size: int) -> ec.ECDSA:
    """ECDSA over an input of ``size`` bytes taken as the hash value (one object per size, reused)."""
    return ec.ECDSA(utils.Prehashed(_RawHash(size)))


_PRIVATE_KEY, _PUBLIC_KEY = int(CKO.PRIVATE_KEY), int(CKO.PUBLIC_KEY)


class _EcMechanism(Mechanism):
    key_types = frozenset({int(CKK.EC)})

    def __init__(self, mechanism: int, flags: int) -> None:
        self.mechanism = mechanism
        self.info = MechanismInfo(MIN_BITS, MAX_BITS, int(flags | _EC_FLAGS))

    def private(self, key: LoadedKey) -> ec.EllipticCurvePrivateKey:
        self.check_key(key, _PRIVATE_KEY)  # the loader made an EC private key of such an object
        return cast(ec.EllipticCurvePrivateKey, key.material)

    def public(self, key: LoadedKey) -> ec.EllipticCurvePublicKey:
        self.check_key(key, _PUBLIC_KEY)
        return cast(ec.EllipticCurvePublicKey, key.material)


def _to_raw(der: bytes, curve: Curve) -> bytes:
    r, s = utils.decode_dss_signature(der)
    return int_to_bytes(r, curve.order_bytes) + int_to_bytes(s, curve.order_bytes)


def _to_der(signature: bytes, curve: Curve) -> bytes:
    if len(signature) != 2 * curve.order_bytes:
        raise SignatureLenRange("an ECDSA signature is r || s of the curve's order length")
    n = curve.order_bytes
    return utils.encode_dss_signature(bytes_to_int(signature[:n]), bytes_to_int(signature[n:]))


def _verify(
    pub: ec.EllipticCurvePublicKey, curve: Curve, data: bytes, signature: bytes, h: hashes.HashAlgorithm
) -> None:
    der = _to_der(signature, curve)
    try:
        pub.verify(der, data, ec.ECDSA(utils.Prehashed(h)))
    except InvalidSignature:
        raise SignatureInvalid("signature does not verify") from None


def _check_input(data: bytes) -> None:
    if not 1 <= len(data) <= MAX_ECDSA_INPUT:
        raise DataLenRange("CKM_ECDSA input must be a hash value")


class EcKeyPairGen(_EcMechanism):
    """CKM_EC_KEY_PAIR_GEN (2.3.5)."""

    def __init__(self) -> None:
        super().__init__(CKM.EC_KEY_PAIR_GEN, F.GENERATE_KEY_PAIR)

    def cost(self, key: LoadedKey | None) -> Cost:
        return Cost.THREAD

    def generate_key_pair(
        self, public_template: Mapping[int, object], private_template: Mapping[int, object]
    ) -> tuple[dict[int, object], dict[int, object]]:
        params = bytes_attr(public_template, CKA.EC_PARAMS)
        curve = curve_from_params(params, edwards=False)
        assert curve.factory is not None
        key = ec.generate_private_key(curve.factory())
        public: dict[int, object] = {CKA.CLASS: int(CKO.PUBLIC_KEY), CKA.KEY_TYPE: int(CKK.EC), CKA.EC_PARAMS: params}
        public[CKA.EC_POINT] = ec_point_der(key.public_key())
        private: dict[int, object] = {CKA.CLASS: int(CKO.PRIVATE_KEY), CKA.KEY_TYPE: int(CKK.EC), CKA.EC_PARAMS: params}
        private[CKA.VALUE] = int_to_bytes(key.private_numbers().private_value)
        return public, private


class Ecdsa(_EcMechanism):
    """CKM_ECDSA (2.3.6): single-part, the input is the hash value."""

    def __init__(self) -> None:
        super().__init__(CKM.ECDSA, F.SIGN | F.VERIFY)

    def sign_init(self, key: LoadedKey, param: Param) -> SingleSign:
        no_param(self, param)
        priv = self.private(key)
        curve = curve_of(priv)

        side = curve.order_bytes

        def sign(data: bytes) -> bytes:
            _check_input(data)
            return _to_raw(priv.sign(data, _raw_ecdsa(len(data))), curve)

        def job_for(data: bytes) -> EcdsaJob | None:
            return EcdsaJob(key, data, side) if 1 <= len(data) <= MAX_ECDSA_INPUT else None

        return SingleSign(2 * side, sign, job_for)

    def verify_init(self, key: LoadedKey, param: Param) -> SingleVerify:
        no_param(self, param)
        pub = self.public(key)
        curve = curve_of(pub)

        def verify(data: bytes, signature: bytes) -> None:
            _check_input(data)
            _verify(pub, curve, data, signature, _RawHash(len(data)))

        return SingleVerify(verify)


class EcdsaHash(_EcMechanism):
    """CKM_ECDSA_SHA* (2.3.7; SHA-3 from v3.0): multi-part."""

    def __init__(self, mechanism: int, factory: HashFactory) -> None:
        super().__init__(mechanism, F.SIGN | F.VERIFY)
        self.factory = factory

    def sign_init(self, key: LoadedKey, param: Param) -> HashSign:
        no_param(self, param)
        priv = self.private(key)
        curve, algorithm = curve_of(priv), self.factory()
        side = curve.order_bytes
        return HashSign(
            algorithm,
            2 * side,
            lambda d: _to_raw(priv.sign(d, ec.ECDSA(utils.Prehashed(algorithm))), curve),
            lambda digest: EcdsaJob(key, digest, side),  # CKM_ECDSA over the digest: the signer's work
        )

    def verify_init(self, key: LoadedKey, param: Param) -> HashVerify:
        no_param(self, param)
        pub = self.public(key)
        curve, algorithm = curve_of(pub), self.factory()
        return HashVerify(algorithm, lambda d, sig: _verify(pub, curve, d, sig, algorithm))


class Ecdh1Derive(_EcMechanism):
    """CKM_ECDH1_DERIVE and CKM_ECDH1_COFACTOR_DERIVE (2.3.10-2.3.12)."""

    def __init__(self, mechanism: int) -> None:
        super().__init__(mechanism, F.DERIVE)

    def derive(self, base: LoadedKey, param: Param, template: Mapping[int, object]) -> bytes:
        p = param_of(self, param, Ecdh1Params)
        priv = self.private(base)
        curve = curve_of(priv)
        if p.kdf != CKD.NULL and p.kdf not in KDFS:
            raise MechanismParamInvalid(f"{self.name}: KDF not supported")
        if p.kdf == CKD.NULL and p.shared_data:
            raise MechanismParamInvalid(f"{self.name}: CKD_NULL takes no shared data")
        try:
            peer = ec_public_from_point(p.public_data, curve)
        except AttributeValueInvalid:
            raise MechanismParamInvalid(f"{self.name}: public data is not a point on the key's curve") from None
        z = priv.exchange(ec.ECDH(), peer)
        length = template.get(CKA.VALUE_LEN)
        if p.kdf == CKD.NULL:
            if length is None:
                return z
            n = int_attr(template, CKA.VALUE_LEN)
            if not 1 <= n <= len(z):
                raise KeySizeRange(f"{self.name}: CKA_VALUE_LEN exceeds the shared secret")
            return z[len(z) - n :]
        if length is None:
            raise TemplateIncomplete(f"{self.name}: CKA_VALUE_LEN is required with a KDF")
        n = int_attr(template, CKA.VALUE_LEN)
        if n < 1:
            raise KeySizeRange(f"{self.name}: CKA_VALUE_LEN must be positive")
        try:
            return X963KDF(KDFS[p.kdf](), n, p.shared_data or None).derive(z)
        except ValueError:
            raise KeySizeRange(f"{self.name}: CKA_VALUE_LEN too large for the KDF") from None


register(EcKeyPairGen())
register(Ecdsa())
for _m, _d in {
    CKM.ECDSA_SHA1: CKM.SHA_1,
    CKM.ECDSA_SHA224: CKM.SHA224,
    CKM.ECDSA_SHA256: CKM.SHA256,
    CKM.ECDSA_SHA384: CKM.SHA384,
    CKM.ECDSA_SHA512: CKM.SHA512,
    CKM.ECDSA_SHA3_224: CKM.SHA3_224,
    CKM.ECDSA_SHA3_256: CKM.SHA3_256,
    CKM.ECDSA_SHA3_384: CKM.SHA3_384,
    CKM.ECDSA_SHA3_512: CKM.SHA3_512,
}.items():
    register(EcdsaHash(_m, HASHES[_d]))
register(Ecdh1Derive(CKM.ECDH1_DERIVE))
register(Ecdh1Derive(CKM.ECDH1_COFACTOR_DERIVE))
