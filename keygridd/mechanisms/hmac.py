"""Generic secrets and HMAC: key generation, CKM_*_HMAC and CKM_*_HMAC_GENERAL.

PKCS#11 v2.40 Current Mechanisms "Generic secret key" (CKM_GENERIC_SECRET_KEY_GEN)
and the SHA-1/SHA-224/SHA-256/SHA-384/SHA-512 HMAC sections; v3.0 Current
Mechanisms "SHA3" for CKM_SHA3_*_HMAC(_GENERAL) and CKM_SHA3_*_KEY_GEN.

Rules:
* HMAC keys are CKK_GENERIC_SECRET or the key type matching the hash.
* *_HMAC_GENERAL take a CK_MAC_GENERAL_PARAMS (UlongParams) of 1..hash size
  bytes and output that many leading bytes of the MAC.
* Verify is constant time (``cryptography``'s ``verify`` for full MACs,
  ``hmac.compare_digest`` for truncated ones); a wrong signature length is
  CKR_SIGNATURE_LEN_RANGE.
* Key generation needs CKA_VALUE_LEN in bytes (1-1024). CK_MECHANISM_INFO
  sizes are bits for CKM_GENERIC_SECRET_KEY_GEN (as the spec says) and bytes
  for the HMAC and SHA3 key generation mechanisms. All INLINE.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from keygridd.mechanisms.base import (
    LoadedKey,
    Mechanism,
    MechanismInfo,
    int_attr,
    no_param,
    param_of,
    register,
)
from keygridd.mechanisms.digest import HASHES, HashFactory
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO
from keygridd.pkcs11.errors import KeySizeRange, MechanismParamInvalid, SignatureInvalid, SignatureLenRange
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import Param, UlongParams

CKK_SHA3_224_HMAC = CKK.SHA3_224_HMAC
CKK_SHA3_256_HMAC = CKK.SHA3_256_HMAC
CKK_SHA3_384_HMAC = CKK.SHA3_384_HMAC
CKK_SHA3_512_HMAC = CKK.SHA3_512_HMAC

MAX_SECRET_BYTES = 1024

# (HMAC mechanism, HMAC_GENERAL mechanism, digest mechanism, specific key type)
_TABLE: tuple[tuple[int, int, int, int], ...] = (
    (CKM.SHA_1_HMAC, CKM.SHA_1_HMAC_GENERAL, CKM.SHA_1, CKK.SHA_1_HMAC),
    (CKM.SHA224_HMAC, CKM.SHA224_HMAC_GENERAL, CKM.SHA224, CKK.SHA224_HMAC),
    (CKM.SHA256_HMAC, CKM.SHA256_HMAC_GENERAL, CKM.SHA256, CKK.SHA256_HMAC),
    (CKM.SHA384_HMAC, CKM.SHA384_HMAC_GENERAL, CKM.SHA384, CKK.SHA384_HMAC),
    (CKM.SHA512_HMAC, CKM.SHA512_HMAC_GENERAL, CKM.SHA512, CKK.SHA512_HMAC),
    (CKM.SHA3_224_HMAC, CKM.SHA3_224_HMAC_GENERAL, CKM.SHA3_224, CKK_SHA3_224_HMAC),
    (CKM.SHA3_256_HMAC, CKM.SHA3_256_HMAC_GENERAL, CKM.SHA3_256, CKK_SHA3_256_HMAC),
    (CKM.SHA3_384_HMAC, CKM.SHA3_384_HMAC_GENERAL, CKM.SHA3_384, CKK_SHA3_384_HMAC),
    (CKM.SHA3_512_HMAC, CKM.SHA3_512_HMAC_GENERAL, CKM.SHA3_512, CKK_SHA3_512_HMAC),
)


class _HmacSign:
    def __init__(self, key: bytes, algorithm: hashes.HashAlgorithm, length: int) -> None:
        self._h = crypto_hmac.HMAC(key, algorithm)
        self.length = length

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def final(self) -> bytes:
        return self._h.finalize()[: self.length]

    def sign(self, data: bytes) -> bytes:
        self._h.update(data)
        return self.final()


class _HmacVerify:
    def __init__(self, key: bytes, algorithm: hashes.HashAlgorithm, length: int) -> None:
        self._h = crypto_hmac.HMAC(key, algorithm)
        self._full = algorithm.digest_size
        self._length = length

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def final(self, signature: bytes) -> None:
        if len(signature) != self._length:
            raise SignatureLenRange("MAC has the wrong length")
        if self._length == self._full:
            try:
                self._h.verify(signature)
            except InvalidSignature:
                raise SignatureInvalid("MAC does not verify") from None
        elif not _stdlib_hmac.compare_digest(self._h.finalize()[: self._length], signature):
            raise SignatureInvalid("MAC does not verify")

    def verify(self, data: bytes, signature: bytes) -> None:
        self._h.update(data)
        self.final(signature)


class Hmac(Mechanism):
    """CKM_*_HMAC (full length) and CKM_*_HMAC_GENERAL (UlongParams output length)."""

    def __init__(self, mechanism: int, factory: HashFactory, key_type: int, general: bool) -> None:
        self.mechanism = mechanism
        self.factory = factory
        self.general = general
        self.key_types = frozenset({int(CKK.GENERIC_SECRET), key_type})
        self.info = MechanismInfo(1, MAX_SECRET_BYTES, int(F.SIGN | F.VERIFY))

    def _setup(self, key: LoadedKey, param: Param) -> tuple[bytes, hashes.HashAlgorithm, int]:
        algorithm = self.factory()
        if self.general:
            length = param_of(self, param, UlongParams).value
            if not 1 <= length <= algorithm.digest_size:
                raise MechanismParamInvalid(f"{self.name}: output length must be 1-{algorithm.digest_size}")
        else:
            no_param(self, param)
            length = algorithm.digest_size
        self.check_key(key, CKO.SECRET_KEY)
        assert isinstance(key.material, bytes)
        if not key.material:
            raise KeySizeRange("HMAC key is empty")
        return key.material, algorithm, length

    def sign_init(self, key: LoadedKey, param: Param) -> _HmacSign:
        return _HmacSign(*self._setup(key, param))

    def verify_init(self, key: LoadedKey, param: Param) -> _HmacVerify:
        return _HmacVerify(*self._setup(key, param))


class SecretKeyGen(Mechanism):
    """CKM_GENERIC_SECRET_KEY_GEN and CKM_SHA3_*_KEY_GEN: random CKA_VALUE of CKA_VALUE_LEN bytes."""

    def __init__(self, mechanism: int, key_type: int, bits: bool) -> None:
        self.mechanism = mechanism
        self.key_type = key_type
        self.key_types = frozenset({key_type})
        scale = 8 if bits else 1
        self.info = MechanismInfo(scale, MAX_SECRET_BYTES * scale, int(F.GENERATE))

    def generate_key(self, template: Mapping[int, object]) -> dict[int, object]:
        n = int_attr(template, CKA.VALUE_LEN)
        if not 1 <= n <= MAX_SECRET_BYTES:
            raise KeySizeRange(f"CKA_VALUE_LEN must be 1-{MAX_SECRET_BYTES}")
        return {CKA.CLASS: int(CKO.SECRET_KEY), CKA.KEY_TYPE: self.key_type, CKA.VALUE: os.urandom(n), CKA.VALUE_LEN: n}


for _mech, _general, _digest, _kt in _TABLE:
    register(Hmac(_mech, HASHES[_digest], _kt, general=False))
    register(Hmac(_general, HASHES[_digest], _kt, general=True))

register(SecretKeyGen(CKM.GENERIC_SECRET_KEY_GEN, CKK.GENERIC_SECRET, bits=True))
register(SecretKeyGen(CKM.SHA3_224_KEY_GEN, CKK_SHA3_224_HMAC, bits=False))
register(SecretKeyGen(CKM.SHA3_256_KEY_GEN, CKK_SHA3_256_HMAC, bits=False))
register(SecretKeyGen(CKM.SHA3_384_KEY_GEN, CKK_SHA3_384_HMAC, bits=False))
register(SecretKeyGen(CKM.SHA3_512_KEY_GEN, CKK_SHA3_512_HMAC, bits=False))
