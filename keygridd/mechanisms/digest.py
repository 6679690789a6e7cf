"""Message digests: CKM_SHA_1, CKM_SHA224/256/384/512, CKM_SHA512_224/256 and CKM_SHA3_224/256/384/512.

PKCS#11 v2.40 Current Mechanisms 2.20-2.25 (SHA-1, SHA-224, SHA-256, SHA-384,
SHA-512, SHA-512/t) and v3.0 Current Mechanisms "SHA3" sections: no
parameter, multi-part; the core feeds C_DigestKey as ``update(key value)``.
Also owns the hash tables the signing families share: CKM digest -> hash,
CKG_MGF1_* -> hash, and the DER DigestInfo prefixes of RFC 8017 section 9.2
note 1 (and NIST's SHA-3 OIDs) used by CKM_RSA_PKCS.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

from keygridd.mechanisms.base import Mechanism, MechanismInfo, no_param, register
from keygridd.pkcs11._constants import CKG, CKM
from keygridd.pkcs11.flags import MechanismFlag
from keygridd.pkcs11.params import Param

HashFactory = type[hashes.HashAlgorithm]

# CKM digest mechanism -> hash algorithm class.
HASHES: dict[int, HashFactory] = {
    CKM.SHA_1: hashes.SHA1,
    CKM.SHA224: hashes.SHA224,
    CKM.SHA256: hashes.SHA256,
    CKM.SHA384: hashes.SHA384,
    CKM.SHA512: hashes.SHA512,
    CKM.SHA512_224: hashes.SHA512_224,
    CKM.SHA512_256: hashes.SHA512_256,
    CKM.SHA3_224: hashes.SHA3_224,
    CKM.SHA3_256: hashes.SHA3_256,
    CKM.SHA3_384: hashes.SHA3_384,
    CKM.SHA3_512: hashes.SHA3_512,
}

# CKG_MGF1_* -> hash of the mask generation function.
MGF1: dict[int, HashFactory] = {
    CKG.MGF1_SHA1: hashes.SHA1,
    CKG.MGF1_SHA224: hashes.SHA224,
    CKG.MGF1_SHA256: hashes.SHA256,
    CKG.MGF1_SHA384: hashes.SHA384,
    CKG.MGF1_SHA512: hashes.SHA512,
    CKG.MGF1_SHA3_224: hashes.SHA3_224,
    CKG.MGF1_SHA3_256: hashes.SHA3_256,
    CKG.MGF1_SHA3_384: hashes.SHA3_384,
    CKG.MGF1_SHA3_512: hashes.SHA3_512,
}

# DigestInfo DER prefix (everything before the hash value) -> hash class.
DIGEST_INFO: dict[bytes, HashFactory] = {
    bytes.fromhex("3021300906052b0e03021a05000414"): hashes.SHA1,
    bytes.fromhex("302d300d06096086480165030402040500041c"): hashes.SHA224,
    bytes.fromhex("3031300d060960864801650304020105000420"): hashes.SHA256,
    bytes.fromhex("3041300d060960864801650304020205000430"): hashes.SHA384,
    bytes.fromhex("3051300d060960864801650304020305000440"): hashes.SHA512,
    bytes.fromhex("302d300d06096086480165030402070500041c"): hashes.SHA3_224,
    bytes.fromhex("3031300d060960864801650304020805000420"): hashes.SHA3_256,
    bytes.fromhex("3041300d060960864801650304020905000430"): hashes.SHA3_384,
    bytes.fromhex("3051300d060960864801650304020a05000440"): hashes.SHA3_512,
}


def hash_in_digest_info(data: bytes) -> HashFactory | None:
    """The hash whose DigestInfo ``data`` is, or None."""
    for prefix, factory in DIGEST_INFO.items():
        if data.startswith(prefix) and len(data) == len(prefix) + digest_size(factory):
            return factory
    return None


def digest_size(factory: HashFactory) -> int:
    size: int = factory().digest_size
    return size


class _DigestContext:
    """A multi-part digest."""

    def __init__(self, factory: HashFactory) -> None:
        self._hash = hashes.Hash(factory())
        self.length = self._hash.algorithm.digest_size

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def final(self) -> bytes:
        return self._hash.finalize()

    def digest(self, data: bytes) -> bytes:
        self._hash.update(data)
        return self._hash.finalize()


class DigestMechanism(Mechanism):
    """CKM_SHA* digests."""

    def __init__(self, mechanism: int, factory: HashFactory) -> None:
        self.mechanism = mechanism
        self.factory = factory
        self.info = MechanismInfo(0, 0, int(MechanismFlag.DIGEST))

    def digest_init(self, param: Param) -> _DigestContext:
        no_param(self, param)
        return _DigestContext(self.factory)


for _mech, _factory in HASHES.items():
    register(DigestMechanism(_mech, _factory))
