"""Key objects <-> ``cryptography`` keys: loading, import checks, PKCS#8 and SubjectPublicKeyInfo.

Owns ``load_key`` (attributes -> ``LoadedKey``), ``validate_import``
(C_CreateObject of a key), ``private_key_to_pkcs8`` / ``private_key_from_pkcs8``
(C_WrapKey / C_UnwrapKey of private keys), ``public_attrs_from_private`` and
``public_key_info`` (CKA_PUBLIC_KEY_INFO). Attribute tables are those of
PKCS#11 v2.40 Current Mechanisms 2.1.2-2.1.3 (RSA keys), 2.3.3-2.3.4 (EC keys),
v3.0 Current Mechanisms 2.3.5-2.3.6 (Edwards keys) and v2.40 Base 4.7-4.9
(key objects). Big integers are unsigned big-endian without leading zeros.

Import rules: required components missing -> CKR_TEMPLATE_INCOMPLETE;
a value that is not a valid key component -> CKR_ATTRIBUTE_VALUE_INVALID;
a derivable attribute supplied with a different value (CKA_MODULUS_BITS,
CKA_VALUE_LEN, a private key's CKA_EC_POINT) -> CKR_TEMPLATE_INCONSISTENT.
An RSA private key needs CKA_PUBLIC_EXPONENT (``cryptography`` cannot use a
key without it); missing CRT components are recovered from (n, e, d).
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from keygridd.mechanisms.base import LoadedKey, bytes_attr, bytes_to_int, int_attr, int_to_bytes
from keygridd.mechanisms.curves import (
    ED25519,
    Curve,
    curve_from_params,
    curve_of,
    der_octet_string,
    ec_public_from_point,
    point_bytes,
)
from keygridd.pkcs11._constants import CKA, CKK, CKO
from keygridd.pkcs11.errors import (
    AttributeValueInvalid,
    KeyNotWrappable,
    KeyTypeInconsistent,
    TemplateIncomplete,
    TemplateInconsistent,
    WrappedKeyInvalid,
)

_CRT = (CKA.PRIME_1, CKA.PRIME_2, CKA.EXPONENT_1, CKA.EXPONENT_2, CKA.COEFFICIENT)
_AES_SIZES = (16, 24, 32)


# --- loading -------------------------------------------------------------------------------------


def load_key(attrs: Mapping[int, object]) -> LoadedKey:
    """Parse a key object's attributes once; the core caches the result."""
    cls = int_attr(attrs, CKA.CLASS)
    if cls == CKO.SECRET_KEY:
        return LoadedKey(attrs, bytes_attr(attrs, CKA.VALUE))
    if cls not in (CKO.PUBLIC_KEY, CKO.PRIVATE_KEY):
        raise KeyTypeInconsistent("the object is not a key")
    private = cls == CKO.PRIVATE_KEY
    kt = int_attr(attrs, CKA.KEY_TYPE)
    if kt == CKK.RSA:
        return LoadedKey(attrs, _rsa_private(attrs) if private else _rsa_public(attrs))
    if kt == CKK.EC:
        curve = curve_from_params(bytes_attr(attrs, CKA.EC_PARAMS), edwards=False)
        if private:
            return LoadedKey(attrs, _ec_private(attrs, curve))
        return LoadedKey(attrs, ec_public_from_point(bytes_attr(attrs, CKA.EC_POINT), curve))
    if kt == CKK.EC_EDWARDS:
        curve = curve_from_params(bytes_attr(attrs, CKA.EC_PARAMS), edwards=True)
        if private:
            return LoadedKey(attrs, _ed_private(bytes_attr(attrs, CKA.VALUE), curve))
        return LoadedKey(attrs, _ed_public(point_bytes(bytes_attr(attrs, CKA.EC_POINT), curve), curve))
    raise KeyTypeInconsistent("key type not supported by the software mechanisms")


def _rsa_public(attrs: Mapping[int, object]) -> rsa.RSAPublicKey:
    n = bytes_to_int(bytes_attr(attrs, CKA.MODULUS))
    e = bytes_to_int(bytes_attr(attrs, CKA.PUBLIC_EXPONENT))
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise AttributeValueInvalid("RSA modulus or public exponent invalid") from None


def _rsa_private(attrs: Mapping[int, object]) -> rsa.RSAPrivateKey:
    n = bytes_to_int(bytes_attr(attrs, CKA.MODULUS))
    e = bytes_to_int(bytes_attr(attrs, CKA.PUBLIC_EXPONENT))
    d = bytes_to_int(bytes_attr(attrs, CKA.PRIVATE_EXPONENT))
    present = [a for a in _CRT if a in attrs]
    try:
        if len(present) == len(_CRT):
            p, q, dmp1, dmq1, iqmp = (bytes_to_int(bytes_attr(attrs, a)) for a in _CRT)
        elif not present:
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
            dmp1, dmq1, iqmp = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
        else:
            raise TemplateIncomplete("RSA private key needs all CRT components or none")
        numbers = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n))
        return numbers.private_key()
    except ValueError:
        raise AttributeValueInvalid("RSA private key components are inconsistent") from None


def _ec_private(attrs: Mapping[int, object], curve: Curve) -> ec.EllipticCurvePrivateKey:
    assert curve.factory is not None
    value = bytes_attr(attrs, CKA.VALUE)
    try:
        return ec.derive_private_key(bytes_to_int(value), curve.factory())
    except ValueError:
        raise AttributeValueInvalid("EC private value out of range") from None


def _ed_private(value: bytes, curve: Curve) -> ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey:
    if len(value) != curve.order_bytes:
        raise AttributeValueInvalid("Edwards private key has the wrong length")
    if curve is ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(value)
    return ed448.Ed448PrivateKey.from_private_bytes(value)


def _ed_public(value: bytes, curve: Curve) -> ed25519.Ed25519PublicKey | ed448.Ed448PublicKey:
    if len(value) != curve.order_bytes:
        raise AttributeValueInvalid("Edwards public key has the wrong length")
    try:
        if curve is ED25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(value)
        return ed448.Ed448PublicKey.from_public_bytes(value)
    except ValueError:
        raise AttributeValueInvalid("Edwards public key is not a valid point") from None


# --- attribute builders shared with key generation ------------------------------------------------


def rsa_public_attrs(key: rsa.RSAPublicKey) -> dict[int, object]:
    pn = key.public_numbers()
    return {
        CKA.CLASS: int(CKO.PUBLIC_KEY),
        CKA.KEY_TYPE: int(CKK.RSA),
        CKA.MODULUS: int_to_bytes(pn.n),
        CKA.MODULUS_BITS: key.key_size,
        CKA.PUBLIC_EXPONENT: int_to_bytes(pn.e),
    }


def rsa_private_attrs(key: rsa.RSAPrivateKey) -> dict[int, object]:
    sn = key.private_numbers()
    return {
        CKA.CLASS: int(CKO.PRIVATE_KEY),
        CKA.KEY_TYPE: int(CKK.RSA),
        CKA.MODULUS: int_to_bytes(sn.public_numbers.n),
        CKA.PUBLIC_EXPONENT: int_to_bytes(sn.public_numbers.e),
        CKA.PRIVATE_EXPONENT: int_to_bytes(sn.d),
        CKA.PRIME_1: int_to_bytes(sn.p),
        CKA.PRIME_2: int_to_bytes(sn.q),
        CKA.EXPONENT_1: int_to_bytes(sn.dmp1),
        CKA.EXPONENT_2: int_to_bytes(sn.dmq1),
        CKA.COEFFICIENT: int_to_bytes(sn.iqmp),
    }


def ec_point_der(key: ec.EllipticCurvePublicKey) -> bytes:
    raw = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return der_octet_string(raw)


def ed_public_raw(key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed_private_raw(key: ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


# --- public halves, SPKI, PKCS#8 ------------------------------------------------------------------


def public_attrs_from_private(attrs: Mapping[int, object]) -> dict[int, object]:
    """The public key object attributes matching a private (or public) key object."""
    key = load_key(attrs)
    kt = key.key_type
    if key.key_class == CKO.SECRET_KEY:
        raise KeyTypeInconsistent("a secret key has no public half")
    material = key.material
    if isinstance(material, rsa.RSAPrivateKey):
        return rsa_public_attrs(material.public_key())
    if isinstance(material, rsa.RSAPublicKey):
        return rsa_public_attrs(material)
    out: dict[int, object] = {CKA.CLASS: int(CKO.PUBLIC_KEY), CKA.KEY_TYPE: kt, CKA.EC_PARAMS: attrs[CKA.EC_PARAMS]}
    if isinstance(material, ec.EllipticCurvePrivateKey):
        out[CKA.EC_POINT] = ec_point_der(material.public_key())
    elif isinstance(material, ec.EllipticCurvePublicKey):
        out[CKA.EC_POINT] = ec_point_der(material)
    elif isinstance(material, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        out[CKA.EC_POINT] = der_octet_string(ed_public_raw(material.public_key()))
    else:
        assert isinstance(material, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        out[CKA.EC_POINT] = der_octet_string(ed_public_raw(material))
    return out


def public_key_info(attrs: Mapping[int, object]) -> bytes:
    """DER SubjectPublicKeyInfo of a public or private key object."""
    material = load_key(attrs).material
    if isinstance(material, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        public: object = material.public_key()
    elif isinstance(material, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        public = material.public_key()
    else:
        public = material
    if not isinstance(
        public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    ):
        raise KeyTypeInconsistent("a secret key has no SubjectPublicKeyInfo")
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_to_pkcs8(key: LoadedKey) -> bytes:
    """Unencrypted PKCS#8 PrivateKeyInfo (DER) of a private key, for C_WrapKey."""
    material = key.material
    if not isinstance(
        material,
        (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey),
    ):
        raise KeyNotWrappable("only private keys are encoded as PKCS#8")
    return material.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pkcs8(der: bytes) -> dict[int, object]:
    """Private key object attributes from a PKCS#8 PrivateKeyInfo, for C_UnwrapKey."""
    try:
        material = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise WrappedKeyInvalid("the unwrapped data is not a PKCS#8 private key") from None
    if isinstance(material, rsa.RSAPrivateKey):
        return rsa_private_attrs(material)
    if isinstance(material, ec.EllipticCurvePrivateKey):
        try:
            curve = curve_of(material)
        except Exception:
            raise WrappedKeyInvalid("the unwrapped EC key is on an unsupported curve") from None
        return {
            CKA.CLASS: int(CKO.PRIVATE_KEY),
            CKA.KEY_TYPE: int(CKK.EC),
            CKA.EC_PARAMS: curve.oid_der,
            CKA.VALUE: int_to_bytes(material.private_numbers().private_value),
        }
    if isinstance(material, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        from keygridd.mechanisms.curves import ED448

        curve = ED25519 if isinstance(material, ed25519.Ed25519PrivateKey) else ED448
        return {
            CKA.CLASS: int(CKO.PRIVATE_KEY),
            CKA.KEY_TYPE: int(CKK.EC_EDWARDS),
            CKA.EC_PARAMS: curve.oid_der,
            CKA.VALUE: ed_private_raw(material),
        }
    raise WrappedKeyInvalid("the unwrapped key type is not supported")


# --- C_CreateObject -------------------------------------------------------------------------------


def _check_derived(out: dict[int, object], attr: int, value: object) -> None:
    given = out.get(attr)
    if given is not None and given != value:
        raise TemplateInconsistent(f"{CKA(attr)!r} does not match the key")
    out[attr] = value


def validate_import(attrs: Mapping[int, object]) -> dict[int, object]:
    """Check a key object template for C_CreateObject; fill derivable attributes; return what to store."""
    out = dict(attrs)
    cls = int_attr(attrs, CKA.CLASS)
    kt = int_attr(attrs, CKA.KEY_TYPE)
    if cls == CKO.SECRET_KEY:
        value = bytes_attr(attrs, CKA.VALUE)
        if kt == CKK.AES and len(value) not in _AES_SIZES:
            raise AttributeValueInvalid("an AES key is 16, 24 or 32 bytes")
        if not value:
            raise AttributeValueInvalid("a secret key cannot be empty")
        _check_derived(out, CKA.VALUE_LEN, len(value))
        return out
    key = load_key(attrs)  # raises TemplateIncomplete / AttributeValueInvalid / KeyTypeInconsistent
    material = key.material
    if isinstance(material, rsa.RSAPublicKey):
        _check_derived(out, CKA.MODULUS_BITS, material.key_size)
    elif isinstance(material, rsa.RSAPrivateKey) and not any(a in attrs for a in _CRT):
        out.update({a: v for a, v in rsa_private_attrs(material).items() if a in _CRT})
    elif isinstance(material, ec.EllipticCurvePublicKey):
        out[CKA.EC_POINT] = der_octet_string(point_bytes(bytes_attr(attrs, CKA.EC_POINT), curve_of(material)))
    elif isinstance(material, ec.EllipticCurvePrivateKey):
        _check_derived(out, CKA.EC_POINT, ec_point_der(material.public_key()))
    elif isinstance(material, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        out[CKA.EC_POINT] = der_octet_string(ed_public_raw(material))
    elif isinstance(material, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        _check_derived(out, CKA.EC_POINT, der_octet_string(ed_public_raw(material.public_key())))
    return out
