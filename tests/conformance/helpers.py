"""Template builders and key readers shared by the conformance tests of keys and mechanisms.

Templates are plain ``{CKA: value}`` dicts for session objects (CKA_TOKEN
false) so tests leave nothing on the token. ``Kit`` is one application with
its own logged-in session that makes each kind of key once, for module-scoped
fixtures; readers turn public key objects read through C_GetAttributeValue
into ``cryptography`` keys so outputs can be checked outside the daemon.
Everything goes through the door API only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKU
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RW

Template = dict[int, Any]


@dataclass(frozen=True)
class Curve:
    name: str
    params: bytes  # CKA_EC_PARAMS: DER OID
    curve: type[ec.EllipticCurve] | None  # None for Edwards curves
    size: int  # bytes of r and s (Weierstrass) or of the raw public key (Edwards)


P256 = Curve("P-256", bytes.fromhex("06082a8648ce3d030107"), ec.SECP256R1, 32)
P384 = Curve("P-384", bytes.fromhex("06052b81040022"), ec.SECP384R1, 48)
P521 = Curve("P-521", bytes.fromhex("06052b81040023"), ec.SECP521R1, 66)
SECP256K1 = Curve("secp256k1", bytes.fromhex("06052b8104000a"), ec.SECP256K1, 32)
ED25519 = Curve("Ed25519", bytes.fromhex("06032b6570"), None, 32)
ED448 = Curve("Ed448", bytes.fromhex("06032b6571"), None, 57)
WEIERSTRASS = (P256, P384, P521, SECP256K1)
EDWARDS = (ED25519, ED448)

# Finite-field domain parameters (p, q, g), fixed so no test waits for a parameter generation.
# DSA 1024/160: made once with cryptography's dsa.generate_parameters(1024).
DSA_1024 = (
    int(
        "a41bdcb9d245521ddc82db0822cf35fb776901af3bd5b6c92516ea5504d52f71f24e3e0aa456a179aff8f4f97fa875e9883f6549"
        "ca8575018e7a84945f66e83c77e75cac9456fe9dada1001b541afaedac94586adf90aba099098a3c1405fb34034251eac9384f7aeb"
        "c9858b209d83370055f4603b176538d11f5fab192e47d5",
        16,
    ),
    int("bba2e7d910c9ad924c44da0f5f62602e77d06495", 16),
    int(
        "2638d6d25fdcdc54d674d35d5b3c0c33b91bbce1d34eee5d14ecf97ecbf380fa9e7253ee48a32ad7d5d7d9eef205faf3d3a48a052e"
        "6669f3695e3b6730d2fc65e8910b81c5db0e40e959737d04b4899eab79d9adc32a7b0db355287c6ca11805391ccfb65d7caba3e7bf"
        "e9b139cf928cf30e1ee2dc8c1c914f9801ca223a057",
        16,
    ),
)
# Diffie-Hellman: the 1024-bit MODP group of RFC 2409 (Oakley group 2), generator 2.
DH_1024 = (
    int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD"
        "3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F"
        "24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
        16,
    ),
    2,
)


# --- template builders -----------------------------------------------------------------------------


def secret_template(key_type: int, **attrs: Any) -> Template:
    """A session secret key template; keyword names are CKA names (``value_len=32``)."""
    return {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: key_type, CKA.TOKEN: False, **_named(attrs)}


def aes_template(length: int = 32, **attrs: Any) -> Template:
    """C_GenerateKey(CKM_AES_KEY_GEN) template."""
    return secret_template(CKK.AES, value_len=length, **attrs)


def secret_import(key_type: int, value: bytes, **attrs: Any) -> Template:
    """C_CreateObject template of a secret key with a known value."""
    return secret_template(key_type, value=value, **attrs)


def rsa_templates(bits: int = 2048, *, public: Template | None = None, **private: Any) -> tuple[Template, Template]:
    """C_GenerateKeyPair(CKM_RSA_PKCS_KEY_PAIR_GEN) public and private templates."""
    pub = {CKA.TOKEN: False, CKA.MODULUS_BITS: bits, CKA.PUBLIC_EXPONENT: b"\x01\x00\x01", **(public or {})}
    return pub, {CKA.TOKEN: False, **_named(private)}


def dsa_templates(**private: Any) -> tuple[Template, Template]:
    """C_GenerateKeyPair(CKM_DSA_KEY_PAIR_GEN) templates with the domain parameters of ``DSA_1024``."""
    p, q, g = DSA_1024
    pub = {CKA.TOKEN: False, CKA.PRIME: _fixed(p, 128), CKA.SUBPRIME: _fixed(q, 20), CKA.BASE: _fixed(g, 128)}
    return pub, {CKA.TOKEN: False, **_named(private)}


def dh_templates(**private: Any) -> tuple[Template, Template]:
    """C_GenerateKeyPair(CKM_DH_PKCS_KEY_PAIR_GEN) templates in the group of ``DH_1024``."""
    p, g = DH_1024
    return {CKA.TOKEN: False, CKA.PRIME: _fixed(p, 128), CKA.BASE: _big(g)}, {CKA.TOKEN: False, **_named(private)}


def ec_templates(curve: Curve, *, public: Template | None = None, **private: Any) -> tuple[Template, Template]:
    """C_GenerateKeyPair(CKM_EC_KEY_PAIR_GEN or CKM_EC_EDWARDS_KEY_PAIR_GEN) templates."""
    pub = {CKA.TOKEN: False, CKA.EC_PARAMS: curve.params, **(public or {})}
    return pub, {CKA.TOKEN: False, **_named(private)}


def rsa_import(key: rsa.RSAPrivateKey, *, crt: bool = True, **attrs: Any) -> tuple[Template, Template]:
    """C_CreateObject templates of an RSA key pair made outside the token."""
    sn = key.private_numbers()
    n, e = _big(sn.public_numbers.n), _big(sn.public_numbers.e)
    pub = {CKA.CLASS: CKO.PUBLIC_KEY, CKA.KEY_TYPE: CKK.RSA, CKA.TOKEN: False, CKA.MODULUS: n, CKA.PUBLIC_EXPONENT: e}
    priv: Template = {
        CKA.CLASS: CKO.PRIVATE_KEY,
        CKA.KEY_TYPE: CKK.RSA,
        CKA.TOKEN: False,
        CKA.MODULUS: n,
        CKA.PUBLIC_EXPONENT: e,
        CKA.PRIVATE_EXPONENT: _big(sn.d),
        **_named(attrs),
    }
    if crt:
        priv.update({
            CKA.PRIME_1: _big(sn.p), CKA.PRIME_2: _big(sn.q), CKA.EXPONENT_1: _big(sn.dmp1),
            CKA.EXPONENT_2: _big(sn.dmq1), CKA.COEFFICIENT: _big(sn.iqmp),
        })  # fmt: skip
    return pub, priv


def ec_import(key: ec.EllipticCurvePrivateKey, curve: Curve, **attrs: Any) -> tuple[Template, Template]:
    """C_CreateObject templates of an EC key pair made outside the token."""
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    common = {CKA.KEY_TYPE: CKK.EC, CKA.TOKEN: False, CKA.EC_PARAMS: curve.params}
    pub = {CKA.CLASS: CKO.PUBLIC_KEY, **common, CKA.EC_POINT: octet_string(point)}
    priv = {CKA.CLASS: CKO.PRIVATE_KEY, **common, CKA.VALUE: _big(key.private_numbers().private_value), **_named(attrs)}
    return pub, priv


def _named(attrs: dict[str, Any]) -> Template:
    return {CKA[name.upper()]: value for name, value in attrs.items()}


def _big(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _fixed(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


# --- DER and key readers ---------------------------------------------------------------------------


def octet_string(data: bytes) -> bytes:
    """DER OCTET STRING of ``data`` (CKA_EC_POINT)."""
    n = len(data)
    if n < 0x80:
        return bytes([0x04, n]) + data
    size = (n.bit_length() + 7) // 8
    return bytes([0x04, 0x80 | size]) + n.to_bytes(size, "big") + data


def octet_string_content(der: bytes) -> bytes:
    """The content of a DER OCTET STRING (strict: it must span all of ``der``)."""
    assert der[0] == 0x04, "CKA_EC_POINT is not a DER OCTET STRING"
    if der[1] < 0x80:
        start, n = 2, der[1]
    else:
        size = der[1] & 0x7F
        start, n = 2 + size, int.from_bytes(der[2 : 2 + size], "big")
    assert len(der) == start + n, "CKA_EC_POINT has trailing or missing bytes"
    return der[start:]


def check_mac(p11: Any, session: int, mechanism: Mechanism, key: int, data: bytes, expected: bytes) -> None:
    """A MAC (HMAC, CMAC) is ``expected`` single-part and multi-part, and verifies."""
    p11.C_SignInit(session, mechanism, key)
    assert p11.C_Sign(session, data) == expected
    p11.C_SignInit(session, mechanism, key)
    p11.C_SignUpdate(session, data[:3])
    p11.C_SignUpdate(session, data[3:])
    assert p11.C_SignFinal(session) == expected
    p11.C_VerifyInit(session, mechanism, key)
    p11.C_Verify(session, data, expected)


def read_attrs(p11: Any, session: int, obj: int, *types: int) -> list[Any]:
    """C_GetAttributeValue of several attributes."""
    return list(p11.C_GetAttributeValue(session, obj, list(types)))


def read_attr(p11: Any, session: int, obj: int, type_: int) -> Any:
    return p11.C_GetAttributeValue(session, obj, [type_])[0]


def rsa_public(p11: Any, session: int, obj: int) -> rsa.RSAPublicKey:
    """The ``cryptography`` key of an RSA public (or private) key object, from CKA_MODULUS/CKA_PUBLIC_EXPONENT."""
    n, e = read_attrs(p11, session, obj, CKA.MODULUS, CKA.PUBLIC_EXPONENT)
    return rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()


def ec_public(p11: Any, session: int, obj: int, curve: Curve) -> ec.EllipticCurvePublicKey:
    """The ``cryptography`` key of an EC public key object, from CKA_EC_POINT."""
    assert curve.curve is not None
    point = octet_string_content(read_attr(p11, session, obj, CKA.EC_POINT))
    return ec.EllipticCurvePublicKey.from_encoded_point(curve.curve(), point)


def ed_public(p11: Any, session: int, obj: int, curve: Curve) -> ed25519.Ed25519PublicKey | ed448.Ed448PublicKey:
    raw = octet_string_content(read_attr(p11, session, obj, CKA.EC_POINT))
    if curve is ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    return ed448.Ed448PublicKey.from_public_bytes(raw)


def raw_point(p11: Any, session: int, obj: int) -> bytes:
    """The raw (uncompressed) point of an EC public key object, for CK_ECDH1_DERIVE_PARAMS."""
    return octet_string_content(read_attr(p11, session, obj, CKA.EC_POINT))


# --- one application with keys made once --------------------------------------------------------------


@dataclass
class Kit:
    """A door, its own logged-in R/W session, and keys made on first use and kept for the module."""

    p11: Any
    session: int
    _cache: dict[str, Any] = field(default_factory=dict)

    def once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def rsa(self, bits: int = 2048) -> tuple[int, int]:
        return self.once(  # type: ignore[no-any-return]
            f"rsa{bits}", lambda: self.p11.C_GenerateKeyPair(self.session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), *rsa_templates(bits))
        )  # fmt: skip

    def ec(self, curve: Curve = P256) -> tuple[int, int]:
        mech = CKM.EC_KEY_PAIR_GEN if curve.curve is not None else CKM.EC_EDWARDS_KEY_PAIR_GEN
        return self.once(  # type: ignore[no-any-return]
            f"ec-{curve.name}",
            lambda: self.p11.C_GenerateKeyPair(self.session, Mechanism(mech), *ec_templates(curve, derive=True)),
        )

    def dsa(self) -> tuple[int, int]:
        return self.once(  # type: ignore[no-any-return]
            "dsa", lambda: self.p11.C_GenerateKeyPair(self.session, Mechanism(CKM.DSA_KEY_PAIR_GEN), *dsa_templates())
        )

    def secret(self, key_type: int, length: int = 32, **extra: Any) -> tuple[int, bytes]:
        """An imported secret key with a known value: (handle, value)."""

        def make() -> tuple[int, bytes]:
            value = os.urandom(length)
            return self.p11.C_CreateObject(self.session, secret_import(key_type, value, **extra)), value

        return self.once(f"secret-{key_type}-{length}-{sorted(extra.items())}", make)  # type: ignore[no-any-return]

    def rsa_imported(self) -> tuple[int, int, rsa.RSAPrivateKey]:
        """An RSA-2048 pair made with ``cryptography`` and imported, so token output can be checked both ways."""

        def make() -> tuple[int, int, rsa.RSAPrivateKey]:
            key = rsa.generate_private_key(65537, 2048)
            pub, priv = rsa_import(key)
            return self.p11.C_CreateObject(self.session, pub), self.p11.C_CreateObject(self.session, priv), key

        return self.once("rsa-imported", make)  # type: ignore[no-any-return]


@contextmanager
def open_kit(door: Callable[[str], Any], daemon: Any) -> Iterator[Kit]:
    """A new application through ``door``: R/W session on the daemon's slot, user logged in."""
    conn = door(daemon.socket)
    try:
        session = conn.C_OpenSession(daemon.slot_id, RW)
        conn.C_Login(session, CKU.USER, daemon.user_pin)
        yield Kit(conn, session)
        conn.C_CloseSession(session)  # destroys the kit's session objects
    finally:
        conn.close()
