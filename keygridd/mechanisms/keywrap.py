"""AES key wrap: CKM_AES_KEY_WRAP (RFC 3394), CKM_AES_KEY_WRAP_KWP (RFC 5649), CKM_AES_KEY_WRAP_PAD.

PKCS#11 v3.0 Current Mechanisms, "AES Key Wrap" section: CKM_AES_KEY_WRAP is
NIST SP 800-38F KW (RFC 3394) and takes input that is a multiple of 8 bytes;
CKM_AES_KEY_WRAP_KWP is SP 800-38F KWP (RFC 5649) and takes any length;
CKM_AES_KEY_WRAP_PAD is PKCS #7 padding to a multiple of 8 bytes followed by
KW. (Some tokens, SoftHSM2 among them, implement RFC 5649 under the PAD
number; KeyGrid follows the v3.0 text, so use KWP for RFC 5649.)

Rules: the optional parameter is the IV (8 bytes for KW/PAD, 4 for KWP);
``cryptography`` implements only the default IVs, so any other IV is
CKR_MECHANISM_PARAM_INVALID. These mechanisms are single-part; the core runs
C_WrapKey / C_UnwrapKey as ``one_shot``. Integrity failure on unwrap is
CKR_ENCRYPTED_DATA_INVALID (the core may report CKR_WRAPPED_KEY_INVALID).
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import keywrap, padding

from keygridd.mechanisms.aes import aes_key
from keygridd.mechanisms.base import LoadedKey, Mechanism, MechanismInfo, SingleCipher, register
from keygridd.pkcs11._constants import CKK, CKM
from keygridd.pkcs11.errors import DataLenRange, EncryptedDataInvalid, EncryptedDataLenRange, MechanismParamInvalid
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import Param

KW_IV = bytes.fromhex("a6a6a6a6a6a6a6a6")
KWP_ICV2 = bytes.fromhex("a65959a6")


class AesKeyWrap(Mechanism):
    """One of the three AES key wrap mechanisms."""

    key_types = frozenset({int(CKK.AES)})

    def __init__(self, mechanism: int) -> None:
        self.mechanism = mechanism
        self.info = MechanismInfo(16, 32, int(F.ENCRYPT | F.DECRYPT | F.WRAP | F.UNWRAP))
        self.kwp = mechanism == CKM.AES_KEY_WRAP_KWP
        self.pkcs7 = mechanism == CKM.AES_KEY_WRAP_PAD

    def _check_iv(self, param: Param) -> None:
        default = KWP_ICV2 if self.kwp else KW_IV
        if param is not None and param != b"" and param != default:
            raise MechanismParamInvalid(f"{self.name}: only the default IV is supported")

    def _wrap(self, kek: bytes) -> Callable[[bytes], bytes]:
        def wrap(data: bytes) -> bytes:
            if self.kwp:
                if not data:
                    raise DataLenRange("nothing to wrap")
                return keywrap.aes_key_wrap_with_padding(kek, data)
            if self.pkcs7:
                padder = padding.PKCS7(64).padder()
                data = padder.update(data) + padder.finalize()
            if len(data) % 8 or len(data) < 16:
                raise DataLenRange(f"{self.name} wraps a multiple of 8 bytes, at least 16")
            return keywrap.aes_key_wrap(kek, data)

        return wrap

    def _unwrap(self, kek: bytes) -> Callable[[bytes], bytes]:
        def unwrap(data: bytes) -> bytes:
            if len(data) % 8 or len(data) < (16 if self.kwp else 24):
                raise EncryptedDataLenRange("wrapped data length is not valid")
            try:
                if self.kwp:
                    return keywrap.aes_key_unwrap_with_padding(kek, data)
                plain = keywrap.aes_key_unwrap(kek, data)
            except keywrap.InvalidUnwrap:
                raise EncryptedDataInvalid("key unwrap integrity check failed") from None
            if not self.pkcs7:
                return plain
            unpadder = padding.PKCS7(64).unpadder()
            try:
                return unpadder.update(plain) + unpadder.finalize()
            except ValueError:
                raise EncryptedDataInvalid("bad padding") from None

        return unwrap

    def _wrap_length(self, n: int) -> int:
        if self.kwp:
            return (n + 7) // 8 * 8 + 8
        if self.pkcs7:
            return (n // 8 + 1) * 8 + 8
        return n + 8

    def encrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        self._check_iv(param)
        return SingleCipher(self._wrap(aes_key(self, key)), self._wrap_length)

    def decrypt_init(self, key: LoadedKey, param: Param) -> SingleCipher:
        self._check_iv(param)
        return SingleCipher(self._unwrap(aes_key(self, key)), lambda n: max(n - 8, 0))


register(AesKeyWrap(CKM.AES_KEY_WRAP))
register(AesKeyWrap(CKM.AES_KEY_WRAP_KWP))
register(AesKeyWrap(CKM.AES_KEY_WRAP_PAD))
