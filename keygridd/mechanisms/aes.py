"""AES: key generation, ECB, CBC, CBC with PKCS #7 padding, CTR and GCM.

PKCS#11 v2.40 Current Mechanisms 2.8 "AES" (CKM_AES_KEY_GEN, CKM_AES_ECB,
CKM_AES_CBC, CKM_AES_CBC_PAD), "AES with Counter" (CK_AES_CTR_PARAMS) and
"AES GCM" (CK_GCM_PARAMS). Key sizes are bytes (16, 24, 32).

Rules:
* ECB/CBC take whole blocks: leftover input at final (or a one-shot input not
  a multiple of 16) is CKR_DATA_LEN_RANGE on encrypt and
  CKR_ENCRYPTED_DATA_LEN_RANGE on decrypt. CBC takes a 16-byte IV as raw bytes.
* CBC_PAD: bad padding on decrypt is CKR_ENCRYPTED_DATA_INVALID.
* CTR: 1 <= counter_bits <= 128. The counter is the low ``counter_bits`` of
  the block; rather than wrapping into the nonce bits (or reusing key
  stream) an operation that would need more blocks than the counter has left
  fails with CKR_DATA_LEN_RANGE (CKR_ENCRYPTED_DATA_LEN_RANGE on decrypt).
* GCM: IV of 8-128 bytes (the range ``cryptography`` supports; the spec allows
  1-256), iv_bits 0 or 8*len(iv), tag_bits one of 32, 64, 96, 104, 112, 120, 128.
  Multi-part encrypt streams ciphertext and appends the tag at final;
  multi-part decrypt buffers everything and releases plaintext only at final,
  after the tag verified (bad tag: CKR_ENCRYPTED_DATA_INVALID).
* Length queries are upper bounds computed without consuming input.
All AES work is INLINE.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext, Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygridd.mechanisms.base import (
    LoadedKey,
    Mechanism,
    MechanismInfo,
    int_attr,
    no_param,
    param_of,
    register,
)
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO
from keygridd.pkcs11.errors import (
    DataLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    KeySizeRange,
    MechanismParamInvalid,
)
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import CtrParams, GcmParams, Param

KEY_SIZES = (16, 24, 32)
BLOCK = 16
GCM_TAG_BITS = frozenset({32, 64, 96, 104, 112, 120, 128})
_CRYPT = F.ENCRYPT | F.DECRYPT
_SECRET_KEY = int(CKO.SECRET_KEY)  # read on every init: a module global is read faster than an enum member


def aes_key(mech: Mechanism, key: LoadedKey) -> bytes:
    """The AES key bytes of a secret key object (KeyTypeInconsistent / KeySizeRange)."""
    mech.check_key(key, _SECRET_KEY)
    assert isinstance(key.material, bytes)
    if len(key.material) not in KEY_SIZES:
        raise KeySizeRange("an AES key is 16, 24 or 32 bytes")
    return key.material


def _len_error(encrypt: bool) -> type[DataLenRange] | type[EncryptedDataLenRange]:
    return DataLenRange if encrypt else EncryptedDataLenRange


class AesKeyGen(Mechanism):
    """CKM_AES_KEY_GEN: CKA_VALUE_LEN (16, 24 or 32) is required."""

    mechanism = CKM.AES_KEY_GEN
    info = MechanismInfo(16, 32, int(F.GENERATE))
    key_types = frozenset({int(CKK.AES)})

    def generate_key(self, template: Mapping[int, object]) -> dict[int, object]:
        n = int_attr(template, CKA.VALUE_LEN)
        if n not in KEY_SIZES:
            raise KeySizeRange("CKA_VALUE_LEN must be 16, 24 or 32 for AES")
        return {CKA.CLASS: int(CKO.SECRET_KEY), CKA.KEY_TYPE: int(CKK.AES), CKA.VALUE: os.urandom(n), CKA.VALUE_LEN: n}


class _BlockContext:
    """ECB / CBC / CBC_PAD over a ``cryptography`` cipher context."""

    def __init__(self, cipher: Cipher[modes.ECB] | Cipher[modes.CBC], encrypt: bool, pad: bool) -> None:
        self._ctx: CipherContext = cipher.encryptor() if encrypt else cipher.decryptor()
        self._encrypt = encrypt
        self._pad = pad
        self._padder = padding.PKCS7(128).padder() if encrypt else padding.PKCS7(128).unpadder()
        self._pending = 0

    def update(self, data: bytes) -> bytes:
        self._pending = (self._pending + len(data)) % BLOCK
        if not self._pad:
            return self._ctx.update(data)
        if self._encrypt:
            return self._ctx.update(self._padder.update(data))
        return self._padder.update(self._ctx.update(data))

    def final(self) -> bytes:
        if self._pad and self._encrypt:
            return self._ctx.update(self._padder.finalize()) + self._ctx.finalize()
        if self._pending:
            raise _len_error(self._encrypt)("input is not a whole number of AES blocks")
        tail = self._ctx.finalize()
        if not self._pad:
            return tail
        try:
            return self._padder.update(tail) + self._padder.finalize()
        except ValueError:
            raise EncryptedDataInvalid("bad padding") from None

    def one_shot(self, data: bytes) -> bytes:
        if (not (self._pad and self._encrypt) and len(data) % BLOCK) or (self._pad and not self._encrypt and not data):
            raise _len_error(self._encrypt)("input is not a whole number of AES blocks")
        return self.update(data) + self.final()

    def update_length(self, n: int) -> int:
        return (self._pending + n) // BLOCK * BLOCK

    def final_length(self) -> int:
        return BLOCK if self._pad else 0

    def one_shot_length(self, n: int) -> int:
        if self._pad and self._encrypt:
            return (n // BLOCK + 1) * BLOCK
        return n


class AesBlock(Mechanism):
    """CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CBC_PAD."""

    key_types = frozenset({int(CKK.AES)})

    def __init__(self, mechanism: int, cbc: bool, pad: bool) -> None:
        self.mechanism = mechanism
        self.cbc, self.pad = cbc, pad
        self.info = MechanismInfo(16, 32, int(_CRYPT | F.WRAP | F.UNWRAP) if pad else int(_CRYPT))

    def _cipher(self, key: LoadedKey, param: Param) -> Cipher[modes.ECB] | Cipher[modes.CBC]:
        k = aes_key(self, key)
        if not self.cbc:
            no_param(self, param)
            return Cipher(algorithms.AES(k), modes.ECB())
        if not isinstance(param, bytes) or len(param) != BLOCK:
            raise MechanismParamInvalid(f"{self.name} needs a 16-byte IV")
        return Cipher(algorithms.AES(k), modes.CBC(param))

    def encrypt_init(self, key: LoadedKey, param: Param) -> _BlockContext:
        return _BlockContext(self._cipher(key, param), True, self.pad)

    def decrypt_init(self, key: LoadedKey, param: Param) -> _BlockContext:
        return _BlockContext(self._cipher(key, param), False, self.pad)


class _CtrContext:
    def __init__(self, key: bytes, p: CtrParams, encrypt: bool) -> None:
        self._ctx = Cipher(algorithms.AES(key), modes.CTR(p.cb)).encryptor()
        mask = (1 << p.counter_bits) - 1
        self._blocks_left = mask - (int.from_bytes(p.cb, "big") & mask) + 1
        self._done = 0
        self._encrypt = encrypt

    def update(self, data: bytes) -> bytes:
        total = self._done + len(data)
        if -(-total // BLOCK) > self._blocks_left:
            raise _len_error(self._encrypt)("the CTR counter would wrap")
        self._done = total
        return self._ctx.update(data)

    def final(self) -> bytes:
        return self._ctx.finalize()

    def one_shot(self, data: bytes) -> bytes:
        return self.update(data) + self.final()

    def update_length(self, n: int) -> int:
        return n

    def final_length(self) -> int:
        return 0

    def one_shot_length(self, n: int) -> int:
        return n


class AesCtr(Mechanism):
    """CKM_AES_CTR with CK_AES_CTR_PARAMS."""

    mechanism = CKM.AES_CTR
    info = MechanismInfo(16, 32, int(_CRYPT))
    key_types = frozenset({int(CKK.AES)})

    def _init(self, key: LoadedKey, param: Param, encrypt: bool) -> _CtrContext:
        p = param_of(self, param, CtrParams)
        if not 1 <= p.counter_bits <= 128 or len(p.cb) != BLOCK:
            raise MechanismParamInvalid("CKM_AES_CTR: counter_bits 1-128 and a 16-byte counter block")
        return _CtrContext(aes_key(self, key), p, encrypt)

    def encrypt_init(self, key: LoadedKey, param: Param) -> _CtrContext:
        return self._init(key, param, True)

    def decrypt_init(self, key: LoadedKey, param: Param) -> _CtrContext:
        return self._init(key, param, False)


class _GcmEncrypt:
    """Single-part encryption is one AEAD call, with the key's AESGCM object (made once per loaded key);
    the streaming context is made only for C_EncryptUpdate. A shorter tag is the full tag's leading
    bytes (SP 800-38D 5.2.1.2)."""

    def __init__(self, key: bytes, p: GcmParams, aead: AESGCM) -> None:
        self._key, self._p, self._aead = key, p, aead
        self._ctx: AEADEncryptionContext | None = None
        self._tag_len = p.tag_bits // 8

    def _stream(self) -> AEADEncryptionContext:
        if self._ctx is None:
            self._ctx = Cipher(algorithms.AES(self._key), modes.GCM(self._p.iv)).encryptor()
            if self._p.aad:
                self._ctx.authenticate_additional_data(self._p.aad)
        return self._ctx

    def update(self, data: bytes) -> bytes:
        return self._stream().update(data)

    def final(self) -> bytes:
        ctx = self._stream()
        tail = ctx.finalize()
        return tail + ctx.tag[: self._tag_len]

    def one_shot(self, data: bytes) -> bytes:
        if self._ctx is not None:
            return self.update(data) + self.final()
        sealed = self._aead.encrypt(self._p.iv, data, self._p.aad or None)
        return sealed[: len(sealed) - 16 + self._tag_len]

    def update_length(self, n: int) -> int:
        return n

    def final_length(self) -> int:
        return self._tag_len

    def one_shot_length(self, n: int) -> int:
        return n + self._tag_len


class _GcmDecrypt:
    def __init__(self, key: bytes, p: GcmParams) -> None:
        self._key, self._p = key, p
        self._tag_len = p.tag_bits // 8
        self._buffer = bytearray()

    def update(self, data: bytes) -> bytes:
        self._buffer += data
        return b""

    def final(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        if len(data) < self._tag_len:
            raise EncryptedDataLenRange("ciphertext shorter than the tag")
        body, tag = data[: len(data) - self._tag_len], data[len(data) - self._tag_len :]
        mode = modes.GCM(self._p.iv, tag, min_tag_length=self._tag_len)
        ctx = Cipher(algorithms.AES(self._key), mode).decryptor()
        if self._p.aad:
            ctx.authenticate_additional_data(self._p.aad)
        try:
            plain = ctx.update(body)
            return plain + ctx.finalize()
        except InvalidTag:
            raise EncryptedDataInvalid("GCM tag does not verify") from None

    def one_shot(self, data: bytes) -> bytes:
        self.update(data)
        return self.final()

    def update_length(self, n: int) -> int:
        return 0

    def final_length(self) -> int:
        return max(len(self._buffer) - self._tag_len, 0)

    def one_shot_length(self, n: int) -> int:
        return max(n - self._tag_len, 0)


class AesGcm(Mechanism):
    """CKM_AES_GCM with CK_GCM_PARAMS."""

    mechanism = CKM.AES_GCM
    info = MechanismInfo(16, 32, int(_CRYPT))
    key_types = frozenset({int(CKK.AES)})

    def _params(self, param: Param) -> GcmParams:
        p = param_of(self, param, GcmParams)
        if not 8 <= len(p.iv) <= 128 or p.iv_bits not in (0, 8 * len(p.iv)):
            raise MechanismParamInvalid("CKM_AES_GCM: IV must be 8-128 bytes")
        if p.tag_bits not in GCM_TAG_BITS:
            raise MechanismParamInvalid("CKM_AES_GCM: tag_bits must be 32, 64 or 96-128 in steps of 8")
        return p

    def encrypt_init(self, key: LoadedKey, param: Param) -> _GcmEncrypt:
        p = self._params(param)
        material = aes_key(self, key)
        aead = key.derived.get("aes-gcm")
        if aead is None:
            aead = key.derived["aes-gcm"] = AESGCM(material)
        return _GcmEncrypt(material, p, cast(AESGCM, aead))

    def decrypt_init(self, key: LoadedKey, param: Param) -> _GcmDecrypt:
        p = self._params(param)
        return _GcmDecrypt(aes_key(self, key), p)


register(AesKeyGen())
register(AesBlock(CKM.AES_ECB, cbc=False, pad=False))
register(AesBlock(CKM.AES_CBC, cbc=True, pad=False))
register(AesBlock(CKM.AES_CBC_PAD, cbc=True, pad=True))
register(AesCtr())
register(AesGcm())
