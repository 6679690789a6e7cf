"""Mechanisms on the command line: names, the default per key type and operation, and their parameters.

``--mechanism`` takes a PKCS#11 name (``CKM_ECDSA_SHA256``, ``ecdsa-sha256``) or
a number. Defaults: EC -> CKM_ECDSA_SHA256, RSA -> CKM_SHA256_RSA_PKCS (sign) and
CKM_RSA_PKCS_OAEP with SHA-256 (encrypt), EdDSA -> CKM_EDDSA, AES ->
CKM_AES_GCM, generic secrets -> CKM_SHA256_HMAC. Mechanisms that need an IV get
a random one, written in front of the ciphertext and read back from there.
"""

from __future__ import annotations

import os
from typing import Literal

from keygridd.cli.hints import CliError, UsageError
from keygridd.mechanisms.rsa import HASHED_PSS
from keygridd.pkcs11 import CKG, CKK, CKM
from keygridd.pkcs11.params import CtrParams, GcmParams, Mechanism, OaepParams, PssParams

Operation = Literal["sign", "verify", "encrypt", "decrypt"]

_SIGN_DEFAULTS: dict[int, int] = {
    CKK.EC: CKM.ECDSA_SHA256,
    CKK.RSA: CKM.SHA256_RSA_PKCS,
    CKK.EC_EDWARDS: CKM.EDDSA,
    CKK.GENERIC_SECRET: CKM.SHA256_HMAC,
    CKK.SHA256_HMAC: CKM.SHA256_HMAC,
}
_CRYPT_DEFAULTS: dict[int, int] = {
    CKK.RSA: CKM.RSA_PKCS_OAEP,
    CKK.AES: CKM.AES_GCM,
}

# hash mechanism -> MGF1 with that hash, and the digest size (the PSS salt length we use)
_HASHES: dict[int, tuple[int, int]] = {
    CKM.SHA_1: (CKG.MGF1_SHA1, 20),
    CKM.SHA224: (CKG.MGF1_SHA224, 28),
    CKM.SHA256: (CKG.MGF1_SHA256, 32),
    CKM.SHA384: (CKG.MGF1_SHA384, 48),
    CKM.SHA512: (CKG.MGF1_SHA512, 64),
    CKM.SHA3_224: (CKG.MGF1_SHA3_224, 28),
    CKM.SHA3_256: (CKG.MGF1_SHA3_256, 32),
    CKM.SHA3_384: (CKG.MGF1_SHA3_384, 48),
    CKM.SHA3_512: (CKG.MGF1_SHA3_512, 64),
}

# PSS mechanism -> its hash (CKM_RSA_PKCS_PSS signs a digest made elsewhere: SHA-256 assumed)
_PSS_HASH: dict[int, int] = {CKM.RSA_PKCS_PSS: CKM.SHA256, **HASHED_PSS}

# mechanism -> length of the IV (or counter block) written in front of the ciphertext
IV_LENGTHS: dict[int, int] = {CKM.AES_GCM: 12, CKM.AES_CBC: 16, CKM.AES_CBC_PAD: 16, CKM.AES_CTR: 16}


def parse_mechanism(text: str) -> int:
    """The CKM number for ``CKM_ECDSA_SHA256``, ``ecdsa-sha256``, ``0x1044`` or ``4164``."""
    try:
        return int(text, 0)
    except ValueError:
        pass
    name = text.strip().upper().replace("-", "_").removeprefix("CKM_")
    try:
        return int(CKM[name])
    except KeyError:
        raise UsageError(f"unknown mechanism {text!r}", "use a PKCS#11 name such as CKM_ECDSA_SHA256") from None


def mechanism_name(mechanism: int) -> str:
    """``CKM_ECDSA_SHA256`` for 0x1044 (the number in hex when it has no name)."""
    try:
        return str(CKM(mechanism))
    except ValueError:
        return f"{mechanism:#x}"


def default_mechanism(operation: Operation, key_type: int) -> int:
    """The mechanism used for ``operation`` with a key of ``key_type`` when --mechanism is not given."""
    table = _SIGN_DEFAULTS if operation in ("sign", "verify") else _CRYPT_DEFAULTS
    mechanism = table.get(key_type)
    if mechanism is None:
        raise CliError(f"no default {operation} mechanism for key type {_key_type_name(key_type)}", "use --mechanism")
    return mechanism


def signature_mechanism(mechanism: int) -> Mechanism:
    """``mechanism`` with the parameters it needs for sign/verify (PSS: MGF1 and salt of the hash)."""
    hash_alg = _PSS_HASH.get(mechanism)
    if hash_alg is not None:
        mgf, salt = _HASHES[hash_alg]
        return Mechanism(mechanism, PssParams(hash_alg=hash_alg, mgf=mgf, s_len=salt))
    return Mechanism(mechanism)


def encryption_mechanism(mechanism: int) -> tuple[Mechanism, bytes]:
    """``mechanism`` with fresh parameters for encryption, and the prefix to write before the ciphertext."""
    length = IV_LENGTHS.get(mechanism)
    if length is None:
        return _fixed_params(mechanism), b""
    iv = os.urandom(length)
    return _iv_params(mechanism, iv), iv


def decryption_mechanism(mechanism: int, data: bytes) -> tuple[Mechanism, bytes]:
    """``mechanism`` with the parameters read from the front of ``data``, and the ciphertext after them."""
    length = IV_LENGTHS.get(mechanism)
    if length is None:
        return _fixed_params(mechanism), data
    if len(data) < length:
        raise CliError(f"the input is shorter than the {length}-byte IV that {mechanism_name(mechanism)} needs")
    return _iv_params(mechanism, data[:length]), data[length:]


def _fixed_params(mechanism: int) -> Mechanism:
    if mechanism == CKM.RSA_PKCS_OAEP:
        return Mechanism(mechanism, OaepParams(hash_alg=CKM.SHA256, mgf=CKG.MGF1_SHA256))
    return Mechanism(mechanism)


def _iv_params(mechanism: int, iv: bytes) -> Mechanism:
    if mechanism == CKM.AES_GCM:
        return Mechanism(mechanism, GcmParams(iv=iv, tag_bits=128, iv_bits=len(iv) * 8))
    if mechanism == CKM.AES_CTR:
        return Mechanism(mechanism, CtrParams(counter_bits=128, cb=iv))
    return Mechanism(mechanism, iv)


def _key_type_name(key_type: int) -> str:
    try:
        return str(CKK(key_type))
    except ValueError:
        return f"{key_type:#x}"
