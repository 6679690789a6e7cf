"""Edwards curves: CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA (Ed25519, Ed448).

PKCS#11 v3.0 Current Mechanisms 2.3.7 (Edwards key pair generation) and
2.3.14 (EdDSA, CK_EDDSA_PARAMS). CKA_EC_PARAMS is the RFC 8410 OID or the
PrintableString "edwards25519"/"edwards448"; CKA_EC_POINT is a DER OCTET
STRING of the raw public key and CKA_VALUE the raw private key.

Rules: ``cryptography`` offers pure Ed25519 and Ed448 with an empty context,
so an Ed25519 key takes no parameter (a CK_EDDSA_PARAMS would select
Ed25519ctx or Ed25519ph) and an Ed448 key takes none or phFlag false with an
empty context; anything else is CKR_MECHANISM_PARAM_INVALID. CKM_EDDSA is
single-part. Sizes in CK_MECHANISM_INFO are bits (255-448). All INLINE.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from keygridd.mechanisms.base import LoadedKey, Mechanism, MechanismInfo, SingleSign, SingleVerify, bytes_attr, register
from keygridd.mechanisms.curves import ED25519, curve_from_params, der_octet_string
from keygridd.mechanisms.keys import ed_private_raw, ed_public_raw
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO
from keygridd.pkcs11.errors import MechanismParamInvalid, SignatureInvalid, SignatureLenRange
from keygridd.pkcs11.flags import MechanismFlag as F
from keygridd.pkcs11.params import EddsaParams, Param

_PRIVATE = (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
_PUBLIC = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)


class EdwardsKeyPairGen(Mechanism):
    """CKM_EC_EDWARDS_KEY_PAIR_GEN."""

    mechanism = CKM.EC_EDWARDS_KEY_PAIR_GEN
    info = MechanismInfo(255, 448, int(F.GENERATE_KEY_PAIR))
    key_types = frozenset({int(CKK.EC_EDWARDS)})

    def generate_key_pair(
        self, public_template: Mapping[int, object], private_template: Mapping[int, object]
    ) -> tuple[dict[int, object], dict[int, object]]:
        params = bytes_attr(public_template, CKA.EC_PARAMS)
        curve = curve_from_params(params, edwards=True)
        key = ed25519.Ed25519PrivateKey.generate() if curve is ED25519 else ed448.Ed448PrivateKey.generate()
        kt = int(CKK.EC_EDWARDS)
        public: dict[int, object] = {CKA.CLASS: int(CKO.PUBLIC_KEY), CKA.KEY_TYPE: kt, CKA.EC_PARAMS: params}
        public[CKA.EC_POINT] = der_octet_string(ed_public_raw(key.public_key()))
        private: dict[int, object] = {CKA.CLASS: int(CKO.PRIVATE_KEY), CKA.KEY_TYPE: kt, CKA.EC_PARAMS: params}
        private[CKA.VALUE] = ed_private_raw(key)
        return public, private


class Eddsa(Mechanism):
    """CKM_EDDSA: pure Ed25519 and Ed448 (empty context)."""

    mechanism = CKM.EDDSA
    info = MechanismInfo(255, 448, int(F.SIGN | F.VERIFY))
    key_types = frozenset({int(CKK.EC_EDWARDS)})

    def _check_param(self, param: Param, ed25519_key: bool) -> None:
        if param is None or param == b"":
            return
        if not isinstance(param, EddsaParams):
            raise MechanismParamInvalid("CKM_EDDSA takes a CK_EDDSA_PARAMS or nothing")
        if ed25519_key or param.ph_flag or param.context_data:
            raise MechanismParamInvalid("only pure Ed25519 and Ed448 without context are supported")

    def sign_init(self, key: LoadedKey, param: Param) -> SingleSign:
        self.check_key(key, CKO.PRIVATE_KEY)
        priv = key.material
        assert isinstance(priv, _PRIVATE)
        is_25519 = isinstance(priv, ed25519.Ed25519PrivateKey)
        self._check_param(param, is_25519)
        return SingleSign(64 if is_25519 else 114, priv.sign)

    def verify_init(self, key: LoadedKey, param: Param) -> SingleVerify:
        self.check_key(key, CKO.PUBLIC_KEY)
        pub = key.material
        assert isinstance(pub, _PUBLIC)
        is_25519 = isinstance(pub, ed25519.Ed25519PublicKey)
        self._check_param(param, is_25519)
        length = 64 if is_25519 else 114

        def verify(data: bytes, signature: bytes) -> None:
            if len(signature) != length:
                raise SignatureLenRange("EdDSA signature has the wrong length")
            try:
                pub.verify(signature, data)
            except InvalidSignature:
                raise SignatureInvalid("signature does not verify") from None

        return SingleVerify(verify)


register(EdwardsKeyPairGen())
register(Eddsa())
