"""Named curves and the DER encodings PKCS#11 uses for EC and Edwards keys.

Owns: the CKA_EC_PARAMS table (named-curve OIDs, and for Edwards curves the
PrintableString curve names PKCS#11 v3.0 also allows), and the DER OCTET
STRING wrapping of CKA_EC_POINT (v2.40 Current Mechanisms 2.3.3 "ECDSA
public key objects"; v3.0 Current Mechanisms 2.3.5 "Edwards EC public key
objects"). Only the OCTET STRING and OID/PrintableString shapes are parsed;
explicit curve parameters are refused with CKR_DOMAIN_PARAMS_INVALID.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from keygridd.pkcs11.errors import AttributeValueInvalid, CurveNotSupported, DomainParamsInvalid


@dataclass(frozen=True, slots=True)
class Curve:
    """A supported curve: its name, DER OID and sizes."""

    name: str
    oid_der: bytes
    bits: int  # field size in bits (the CK_MECHANISM_INFO unit)
    order_bytes: int  # length of each of r and s in a CKM_ECDSA signature
    factory: type[ec.EllipticCurve] | None  # None for Edwards curves

    @property
    def point_len(self) -> int:
        """Length of the uncompressed point (0x04 || X || Y) for Weierstrass curves."""
        return 1 + 2 * ((self.bits + 7) // 8)


P256 = Curve("secp256r1", bytes.fromhex("06082a8648ce3d030107"), 256, 32, ec.SECP256R1)
P384 = Curve("secp384r1", bytes.fromhex("06052b81040022"), 384, 48, ec.SECP384R1)
P521 = Curve("secp521r1", bytes.fromhex("06052b81040023"), 521, 66, ec.SECP521R1)
SECP256K1 = Curve("secp256k1", bytes.fromhex("06052b8104000a"), 256, 32, ec.SECP256K1)
ED25519 = Curve("ed25519", bytes.fromhex("06032b6570"), 255, 32, None)
ED448 = Curve("ed448", bytes.fromhex("06032b6571"), 448, 57, None)

WEIERSTRASS: tuple[Curve, ...] = (P256, P384, P521, SECP256K1)
EDWARDS: tuple[Curve, ...] = (ED25519, ED448)

_BY_PARAMS: dict[bytes, Curve] = {c.oid_der: c for c in WEIERSTRASS + EDWARDS}
_BY_PARAMS[b"\x13\x0cedwards25519"] = ED25519
_BY_PARAMS[b"\x13\x0aedwards448"] = ED448
_BY_NAME: dict[str, Curve] = {c.name: c for c in WEIERSTRASS}


def curve_from_params(params: bytes, edwards: bool) -> Curve:
    """The curve named by CKA_EC_PARAMS; CurveNotSupported for an unknown name, DomainParamsInvalid if malformed."""
    curve = _BY_PARAMS.get(params)
    if curve is None:
        if len(params) >= 2 and params[0] in (0x06, 0x13) and params[1] == len(params) - 2:
            raise CurveNotSupported("CKA_EC_PARAMS names a curve that is not supported")
        raise DomainParamsInvalid("CKA_EC_PARAMS must be a named curve OID or name")
    if (curve.factory is None) != edwards:
        raise CurveNotSupported("CKA_EC_PARAMS names a curve of the other key type")
    return curve


def curve_of(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> Curve:
    """The table entry for a ``cryptography`` EC key."""
    curve = _BY_NAME.get(key.curve.name)
    if curve is None:
        raise CurveNotSupported("the key's curve is not supported")
    return curve


def der_octet_string(data: bytes) -> bytes:
    """DER OCTET STRING wrapping ``data``."""
    n = len(data)
    if n < 0x80:
        header = bytes([0x04, n])
    else:
        size = (n.bit_length() + 7) // 8
        header = bytes([0x04, 0x80 | size]) + n.to_bytes(size, "big")
    return header + data


def parse_octet_string(data: bytes) -> bytes | None:
    """The content of a DER OCTET STRING that spans all of ``data``, or None."""
    if len(data) < 2 or data[0] != 0x04:
        return None
    first = data[1]
    if first < 0x80:
        start, n = 2, first
    else:
        size = first & 0x7F
        if size == 0 or size > 4 or len(data) < 2 + size:
            return None
        start, n = 2 + size, int.from_bytes(data[2 : 2 + size], "big")
        if n < 0x80 or data[2] == 0:  # not minimal: not DER
            return None
    if len(data) - start != n:
        return None
    return data[start:]


def point_bytes(value: bytes, curve: Curve) -> bytes:
    """The raw point in a CKA_EC_POINT / CK_ECDH1_DERIVE_PARAMS public value, raw or DER-wrapped.

    A raw uncompressed point of exactly the curve's length is taken as raw
    (it cannot also be a DER OCTET STRING of that total length); otherwise a
    DER OCTET STRING is unwrapped, and anything else is passed on as raw.
    """
    if curve.factory is None:
        if len(value) == curve.order_bytes:
            return value
    elif len(value) == curve.point_len and value[0] == 0x04:
        return value
    inner = parse_octet_string(value)
    return value if inner is None else inner


def ec_public_from_point(value: bytes, curve: Curve) -> ec.EllipticCurvePublicKey:
    """A public key from a raw or DER-wrapped point; AttributeValueInvalid when not on the curve."""
    assert curve.factory is not None
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve.factory(), point_bytes(value, curve))
    except ValueError:
        raise AttributeValueInvalid("the EC point is not a valid point on the curve") from None
