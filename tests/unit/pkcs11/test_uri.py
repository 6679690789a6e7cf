"""Tests of keygridd.pkcs11.uri with the RFC 7512 section 3.3 examples, formatting and matching."""

from __future__ import annotations

import pytest

from keygridd.pkcs11 import CKA, CKO
from keygridd.pkcs11.uri import Pkcs11Uri

SNAKE_OIL_ID = bytes.fromhex("69953e5cf4bdec961f935fa135e24845a036ce24")

# RFC 7512 section 3.3, in order; (text, expected fields)
RFC_EXAMPLES: list[tuple[str, Pkcs11Uri]] = [
    ("pkcs11:", Pkcs11Uri()),
    ("pkcs11:object=my-pubkey;type=public", Pkcs11Uri(object="my-pubkey", type="public")),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        Pkcs11Uri(object="my-key", type="private", pin_source="file:/etc/token"),
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
        "object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%96%1F%93%5F%A1%35%E2%48%45%A0%36%CE%24"
        "?pin-source=file:/etc/token_pin",
        Pkcs11Uri(
            token="The Software PKCS#11 Softtoken",
            manufacturer="Snake Oil, Inc.",
            model="1.0",
            object="my-certificate",
            type="cert",
            id=SNAKE_OIL_ID,
            pin_source="file:/etc/token_pin",
        ),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        Pkcs11Uri(object="my-sign-key", type="private", module_name="mypkcs11"),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        Pkcs11Uri(object="my-sign-key", type="private", module_path="/mnt/libmypkcs11.so.1"),
    ),
    (
        "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
        Pkcs11Uri(token="Software PKCS#11 softtoken", manufacturer="Snake Oil, Inc.", pin_value="the-pin"),
    ),
    ("pkcs11:slot-description=Sun%20Metaslot", Pkcs11Uri(slot_description="Sun Metaslot")),
    (
        "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
        "library-version=1.23",
        Pkcs11Uri(
            library_manufacturer="Snake Oil, Inc.", library_description="Soft Token Library", library_version="1.23"
        ),
    ),
    (
        "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ef%fe%25",
        Pkcs11Uri(token="My token% created by Joe", library_version="3", id=bytes.fromhex("010203badd effe25")),
    ),
    (
        "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
        Pkcs11Uri(token="A name with a substring %;", object="my-certificate", type="cert"),
    ),
    (
        "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
        Pkcs11Uri(token="Name with a small A with acute: \u00e1", object="my-certificate", type="cert"),
    ),
    (
        # The RFC's last example uses vendor-aaa; KeyGrid keeps vendor path attributes only with the x- prefix.
        "pkcs11:token=my-token;object=my-certificate;type=cert;x-vendor-aaa=value-a"
        "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
        Pkcs11Uri(
            token="my-token",
            object="my-certificate",
            type="cert",
            vendor=(("x-vendor-aaa", "value-a"),),
            pin_source="file:/etc/token_pin",
            vendor_query=(("vendor-bbb", "value-b"),),
        ),
    ),
    ("pkcs11:slot-id=4;slot-manufacturer=KeyGrid", Pkcs11Uri(slot_id=4, slot_manufacturer="KeyGrid")),
]


@pytest.mark.parametrize(("text", "expected"), RFC_EXAMPLES)
def test_parse_rfc_examples(text: str, expected: Pkcs11Uri) -> None:
    assert Pkcs11Uri.parse(text) == expected


@pytest.mark.parametrize(("text", "expected"), RFC_EXAMPLES)
def test_format_round_trips(text: str, expected: Pkcs11Uri) -> None:
    formatted = str(expected)
    assert formatted.startswith("pkcs11:")
    assert Pkcs11Uri.parse(formatted) == expected


def test_format_exact() -> None:
    uri = Pkcs11Uri(token="dev token", object="a;b?c%", type="private", id=b"\x01\xab")
    assert str(uri) == "pkcs11:token=dev%20token;object=a%3Bb%3Fc%25;type=private;id=%01%AB"
    uri = Pkcs11Uri(object="k", module_path="/usr/lib/x.so", pin_source="file:/run/pin&x")
    assert str(uri) == "pkcs11:object=k?pin-source=file:/run/pin%26x&module-path=/usr/lib/x.so"
    assert str(Pkcs11Uri(token="\u00e1")) == "pkcs11:token=%C3%A1"


def test_pin_value_not_in_repr() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t?pin-value=s3cret")
    assert uri.pin_value == "s3cret"
    assert "s3cret" not in repr(uri)


def test_scheme_is_case_insensitive() -> None:
    assert Pkcs11Uri.parse("PKCS11:object=x") == Pkcs11Uri(object="x")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("http://x", "not a PKCS#11 URI"),
        ("pkcs11:vendor-aaa=value-a", "unknown path attribute 'vendor-aaa'"),
        ("pkcs11:token", "must be name=value"),
        ("pkcs11:=x", "must be name=value"),
        ("pkcs11:token=a;token=b", "appears more than once"),
        ("pkcs11:object=a?pin-source=x&pin-source=y", "appears more than once"),
        ("pkcs11:type=key", "type must be one of cert, data, private, public, secret-key"),
        ("pkcs11:slot-id=x1", "slot-id must be a decimal number"),
        ("pkcs11:library-version=1.x", "library-version must be M or M.N"),
        ("pkcs11:token=%zz", "bad percent-encoding"),
        ("pkcs11:token=%4", "bad percent-encoding"),
        ("pkcs11:token=%C3", "not valid UTF-8"),
        ("pkcs11:token=a;;object=b", "must be name=value"),
    ],
)
def test_parse_errors(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        Pkcs11Uri.parse(text)
    assert problem in str(info.value)


def test_object_template() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=my-key;id=%01%02;type=private")
    assert uri.object_template() == {CKA.LABEL: b"my-key", CKA.ID: b"\x01\x02", CKA.CLASS: CKO.PRIVATE_KEY}
    assert Pkcs11Uri.parse("pkcs11:token=t").object_template() == {}
    assert Pkcs11Uri.parse("pkcs11:type=secret-key").object_template() == {CKA.CLASS: CKO.SECRET_KEY}
    assert Pkcs11Uri.parse("pkcs11:type=cert").object_class == CKO.CERTIFICATE


def test_matches_token() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=dev;manufacturer=KeyGrid;object=k")
    assert uri.matches_token("dev", "KeyGrid", "memory", "0001")
    assert not uri.matches_token("prod", "KeyGrid", "memory", "0001")
    assert not uri.matches_token("dev", "Other", "memory", "0001")
    assert Pkcs11Uri.parse("pkcs11:").matches_token("any", "thing", "at", "all")
    assert Pkcs11Uri.parse("pkcs11:serial=0001;model=memory").matches_token("x", "y", "memory", "0001")


def test_matches_slot() -> None:
    uri = Pkcs11Uri.parse("pkcs11:slot-id=3;slot-description=mem")
    assert uri.matches_slot(3, "mem")
    assert not uri.matches_slot(4, "mem")
    assert not uri.matches_slot(3, "other")
    assert uri.names_token() and not uri.names_object()
    assert Pkcs11Uri.parse("pkcs11:id=%01").names_object()
