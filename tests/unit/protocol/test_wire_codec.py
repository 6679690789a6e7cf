"""keygridd.protocol.codec with exact bytes: requests, templates, mechanism parameters, decode errors."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import msgpack
import pytest

from keygridd.client.protocol import ClientProtocol
from keygridd.pkcs11 import CKA, CKD, CKG, CKM, CKO, CKZ
from keygridd.pkcs11.errors import ArgumentsBad, AttributeValueInvalid, MechanismParamInvalid, TemplateInconsistent
from keygridd.pkcs11.params import (
    CtrParams,
    Ecdh1Params,
    EddsaParams,
    GcmParams,
    Mechanism,
    OaepParams,
    Param,
    ParamType,
    PssParams,
    UlongParams,
)
from keygridd.protocol import codec
from keygridd.protocol.calls import BY_NAME
from keygridd.protocol.framing import encode_frame

H = bytes.fromhex


# --- requests ------------------------------------------------------------------------------------------


def test_request_frame_for_a_small_call() -> None:
    expected = H(
        "00000013"  # frame length 19
        "94"  # array of 4
        "00"  # REQUEST
        "01"  # id 1
        "ad"
        + b"C_GetSlotInfo".hex()  # str of 13
        + "91 00"  # [0]
    )
    msgid, frame = ClientProtocol().request("C_GetSlotInfo", [0])
    assert msgid == 1
    assert frame == expected
    assert encode_frame(codec.pack([codec.REQUEST, 1, "C_GetSlotInfo", [0]])) == expected


def test_request_ids_count_up_and_skip_zero() -> None:
    proto = ClientProtocol()
    assert [proto.request("KG_Ping", [])[0] for _ in range(3)] == [1, 2, 3]
    proto._next_id = 0xFFFFFFFF
    assert proto.request("KG_Ping", [])[0] == 0xFFFFFFFF
    assert proto.request("KG_Ping", [])[0] == 1


def test_request_with_bytes_bool_and_nil() -> None:
    call = BY_NAME["C_Sign"]
    body = codec.pack([codec.REQUEST, 7, "C_Sign", codec.encode_args(call, [3, b"\x01\x02", None])])
    assert body == H("94 00 07 a6" + b"C_Sign".hex() + "93 03 c4 02 01 02 c0")
    body = codec.pack([codec.REQUEST, 300, "C_GetSlotList", [True]])
    assert body == H("94 00 cd 01 2c ad" + b"C_GetSlotList".hex() + "91 c3")


def test_reply_is_decoded_by_the_client_protocol() -> None:
    proto = ClientProtocol()
    proto.feed(H("00000009 95 01 05 00 c4 02 ab cd c0"))
    assert proto.next_reply() == (5, 0, b"\xab\xcd", None)
    assert proto.next_reply() is None


# --- templates -------------------------------------------------------------------------------------------

TEMPLATE = (
    (CKA.TOKEN, True),
    (CKA.CLASS, CKO.SECRET_KEY),
    (CKA.LABEL, b"k"),
    (CKA.ALLOWED_MECHANISMS, (CKM.SHA256_HMAC, CKM.AES_GCM)),
)
TEMPLATE_BYTES = H(
    "94"
    "92 01 c3"  # [CKA_TOKEN, true]
    "92 00 04"  # [CKA_CLASS, CKO_SECRET_KEY]
    "92 03 c4 01 6b"  # [CKA_LABEL, bin "k"]
    "92 ce 40 00 06 00 92 cd 02 51 cd 10 87"  # [CKA_ALLOWED_MECHANISMS, [CKM_SHA256_HMAC, CKM_AES_GCM]]
)


def test_template_exact_bytes_and_back() -> None:
    assert codec.pack(codec.encode_template(TEMPLATE)) == TEMPLATE_BYTES
    assert codec.decode_template(codec.unpack(TEMPLATE_BYTES)) == TEMPLATE


def test_template_argument_from_a_dict() -> None:
    call = BY_NAME["C_CreateObject"]
    args = codec.encode_args(call, [1, dict(TEMPLATE)])
    assert codec.pack(args) == H("92 01") + TEMPLATE_BYTES
    assert codec.decode_args(call, codec.unpack(codec.pack(args)), 16) == [1, TEMPLATE]


def test_nested_template_round_trip() -> None:
    template = ((CKA.WRAP_TEMPLATE, ((CKA.TOKEN, False), (CKA.VALUE_LEN, 32))),)
    wire = codec.encode_template(template)
    assert codec.pack(wire) == H("91 92 ce 40 00 02 11 92 92 01 c2 92 cd 01 61 20")
    assert codec.decode_template(codec.unpack(codec.pack(wire))) == template


@pytest.mark.parametrize(
    "attr, value",
    [
        (CKA.TOKEN, b"\x01"),
        (CKA.TOKEN, 1),
        (CKA.TOKEN, None),
        (CKA.CLASS, True),
        (CKA.CLASS, -1),
        (CKA.CLASS, 1 << 64),
        (CKA.CLASS, b"\x00"),
        (CKA.LABEL, "text"),
        (CKA.LABEL, 5),
        (CKA.ALLOWED_MECHANISMS, b"\x01"),
        (CKA.ALLOWED_MECHANISMS, [True]),
        (CKA.ALLOWED_MECHANISMS, [-1]),
        (CKA.WRAP_TEMPLATE, b""),
    ],
)
def test_attribute_value_of_the_wrong_kind(attr: int, value: object) -> None:
    with pytest.raises(AttributeValueInvalid):
        codec.decode_value(attr, value)


def test_templates_nest_at_most_twice() -> None:
    inner: Any = [[CKA.TOKEN, True]]
    for _ in range(2):
        inner = [[CKA.WRAP_TEMPLATE, inner]]
    codec.decode_template(inner)
    with pytest.raises(AttributeValueInvalid):
        codec.decode_template([[CKA.WRAP_TEMPLATE, inner]])


@pytest.mark.parametrize(
    "raw",
    [None, {}, b"", [[CKA.LABEL]], [[CKA.LABEL, b"x", b"y"]], [["CKA_LABEL", b"x"]], [[-1, b"x"]], [[True, b"x"]],
     [CKA.LABEL, b"x"]],
)  # fmt: skip
def test_malformed_template(raw: object) -> None:
    with pytest.raises(ArgumentsBad):
        codec.decode_template(raw)


def test_template_limits_and_duplicates() -> None:
    codec.decode_template([[CKA.LABEL, b"x"]] * 4, max_attributes=4)  # a repeated equal value is fine
    with pytest.raises(ArgumentsBad, match="limit is 4"):
        codec.decode_template([[CKA.LABEL, b"x"]] * 5, max_attributes=4)
    with pytest.raises(TemplateInconsistent):
        codec.decode_template([[CKA.LABEL, b"x"], [CKA.LABEL, b"y"]])
    call = BY_NAME["C_GetAttributeValue"]
    assert codec.decode_args(call, [1, 2, [CKA.LABEL] * 3], 3) == [1, 2, (CKA.LABEL,) * 3]
    with pytest.raises(ArgumentsBad):
        codec.decode_args(call, [1, 2, [CKA.LABEL] * 4], 3)


# --- mechanisms ------------------------------------------------------------------------------------------

PARAMS: dict[str, tuple[int, Param, str]] = {
    "nil": (CKM.ECDSA, None, "92 cd 10 41 c0"),
    "bytes": (CKM.AES_CBC_PAD, b"\x00" * 2, "92 cd 10 85 c4 02 00 00"),
    "gcm": (CKM.AES_GCM, GcmParams(iv=b"\x01\x02", aad=b"a", tag_bits=128, iv_bits=16),
            "92 cd 10 87 95 01 c4 02 01 02 10 c4 01 61 cc 80"),
    "oaep": (CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA256, CKG.MGF1_SHA256, CKZ.DATA_SPECIFIED, b"L"),
             "92 09 95 02 cd 02 50 02 01 c4 01 4c"),
    "pss": (CKM.SHA256_RSA_PKCS_PSS, PssParams(CKM.SHA256, CKG.MGF1_SHA256, 32), "92 43 94 03 cd 02 50 02 20"),
    "ecdh1": (CKM.ECDH1_DERIVE, Ecdh1Params(CKD.NULL, b"", b"\x04\x05"),
              "92 cd 10 50 94 04 01 c4 00 c4 02 04 05"),
    "ctr": (CKM.AES_CTR, CtrParams(128, b"\xff" * 2), "92 cd 10 86 93 05 cc 80 c4 02 ff ff"),
    "eddsa": (CKM.EDDSA, EddsaParams(True, b"ctx"), "92 cd 10 57 93 06 c3 c4 03 63 74 78"),
    "ulong": (CKM.SHA256_HMAC_GENERAL, UlongParams(16), "92 cd 02 52 92 07 10"),
}  # fmt: skip


@pytest.mark.parametrize("number, param, hex_bytes", PARAMS.values(), ids=PARAMS.keys())
def test_mechanism_parameter_exact_bytes_and_back(number: int, param: Param, hex_bytes: str) -> None:
    mechanism = Mechanism(number, param)
    wire = codec.pack(codec.encode_mechanism(mechanism))
    assert wire == H(hex_bytes)
    assert codec.decode_mechanism(codec.unpack(wire)) == mechanism


def test_every_parameter_type_is_covered() -> None:
    structured = [H(h) for _, p, h in PARAMS.values() if p is not None and not isinstance(p, bytes)]
    assert sorted(codec.unpack(wire)[1][0] for wire in structured) == sorted(t.value for t in ParamType)


def test_plain_mechanism_number_is_encoded_with_nil() -> None:
    assert codec.encode_mechanism(CKM.SHA256) == [CKM.SHA256, None]
    assert codec.pack(codec.encode_mechanism(CKM.SHA256)) == H("92 cd 02 50 c0")


def test_a_mechanism_without_parameter_is_one_shared_value() -> None:
    first = codec.decode_mechanism(codec.unpack(codec.pack([0x1041, None])))
    assert first == Mechanism(CKM.ECDSA) and type(first.mechanism) is int
    assert codec.decode_mechanism([CKM.ECDSA, None]) is first  # frozen: one value serves every request
    assert codec.decode_mechanism([CKM.ECDSA, b""]) == Mechanism(CKM.ECDSA, b"")


@pytest.mark.parametrize(
    "raw, error",
    [
        (CKM.SHA256, ArgumentsBad),
        ([CKM.SHA256], ArgumentsBad),
        ([CKM.SHA256, None, None], ArgumentsBad),
        (["CKM_SHA256", None], ArgumentsBad),
        ([-1, None], ArgumentsBad),
        ([1 << 64, None], ArgumentsBad),
        ([True, None], ArgumentsBad),
        ([1 << 64, b"p"], ArgumentsBad),
        ([CKM.ECDSA, "p"], MechanismParamInvalid),
        ([CKM.ECDSA, 1], MechanismParamInvalid),
        ([CKM.ECDSA, {}], MechanismParamInvalid),
        ([CKM.AES_GCM, []], MechanismParamInvalid),
        ([CKM.AES_GCM, [99, b""]], MechanismParamInvalid),
        ([CKM.AES_GCM, [1, b"iv", 16, b""]], MechanismParamInvalid),
        ([CKM.AES_GCM, [1, b"iv", "16", b"", 128]], MechanismParamInvalid),
        ([CKM.AES_GCM, [1, b"iv", 16, b"", -128]], MechanismParamInvalid),
        ([CKM.EDDSA, [6, 0, b""]], MechanismParamInvalid),
        ([CKM.SHA256_HMAC_GENERAL, [7, True]], MechanismParamInvalid),
        ([CKM.SHA256_HMAC_GENERAL, [7, 1, 2]], MechanismParamInvalid),
    ],
)
def test_malformed_mechanism(raw: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec.decode_mechanism(raw)


# --- arguments and decode errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, raw",
    [
        ("C_GetSlotInfo", []),
        ("C_GetSlotInfo", [0, 0]),
        ("C_GetSlotInfo", None),
        ("C_GetSlotInfo", {"slot": 0}),
        ("C_GetSlotInfo", [True]),
        ("C_GetSlotInfo", [-1]),
        ("C_GetSlotInfo", [1.0]),
        ("C_GetSlotList", [1]),
        ("C_Login", [1, 1, "pin"]),
        ("C_Sign", [1, b"", -2]),
        ("C_Sign", [1, b"", "64"]),
        ("KG_GetPublicKey", [b"uri", None]),
        ("KG_GetPublicKey", ["uri", "pin"]),
        ("hello", [[]]),
    ],
)
def test_bad_arguments(method: str, raw: object) -> None:
    with pytest.raises(ArgumentsBad):
        codec.decode_args(BY_NAME[method], raw, 16)


def test_outlen_values() -> None:
    call = BY_NAME["C_Sign"]
    for out_len in (None, -1, 0, 64, (1 << 64) - 1):
        assert codec.decode_args(call, [1, b"d", out_len], 16) == [1, b"d", out_len]


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x00", b"\x90\x90", b"\xdd\xff\xff\xff\xff", b"\x81\x90\x00", b"\xa5ab", b"\xc4\x05\x00"],
    ids=["empty", "never-used", "short-array", "extra", "huge-array", "unhashable-key", "short-str", "short-bin"],
)
def test_unpack_errors_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed MessagePack"):
        codec.unpack(data)


def test_unpack_keeps_bin_and_str_apart() -> None:
    assert codec.unpack(H("92 a1 61 c4 01 61")) == ["a", b"a"]
    assert codec.pack(["a", b"a"]) == H("92 a1 61 c4 01 61")
    assert codec.unpack(H("81 01 02")) == {1: 2}  # integer map keys are allowed


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ValueError):
        codec.unpack(deep)
    assert msgpack.unpackb(b"\x91" * 10 + b"\xc0") is not None


def test_pack_after_a_value_it_cannot_pack_starts_clean() -> None:
    """The daemon reuses one msgpack Packer per thread: a failed pack must leave nothing behind."""
    with pytest.raises(TypeError):
        codec.pack([1, 2, object()])
    assert codec.pack([1, 7, 0, b"x", None]) == msgpack.packb([1, 7, 0, b"x", None], use_bin_type=True)


def test_pack_from_several_threads() -> None:
    values = [[i, bytes([i]) * i, None] for i in range(64)]

    def pack_all(_: int) -> list[bytes]:
        return [codec.pack(v) for v in values]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pack_all, range(32)))
    expected = [msgpack.packb(v, use_bin_type=True) for v in values]
    assert all(result == expected for result in results)
