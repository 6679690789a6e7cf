"""Write msgpack.txt: golden MessagePack vectors shared by the C shim and Python.

Each line is ``NAME HEX LITERAL``: LITERAL is a Python literal (read with
``ast.literal_eval``) in the canonical form the C test renders after decoding
HEX; HEX is ``keygridd.protocol.codec.pack(value)``. The C tests decode HEX,
render and compare with LITERAL, re-encode and compare with HEX; the Python
test packs LITERAL and compares with HEX. Names starting with ``mechanism-``,
``template-`` and ``reply-`` are also used by the C marshalling tests.

Run: python tests/vectors/wire/make_vectors.py > tests/vectors/wire/msgpack.txt
"""

from __future__ import annotations

import sys
from typing import Any

from keygridd.protocol.codec import pack

VECTORS: list[tuple[str, Any]] = [
    ("nil", None),
    ("false", False),
    ("true", True),
    ("uint-0", 0),
    ("uint-127", 127),
    ("uint-128", 128),
    ("uint-255", 255),
    ("uint-256", 256),
    ("uint-65535", 65535),
    ("uint-65536", 65536),
    ("uint-4294967295", 2**32 - 1),
    ("uint-4294967296", 2**32),
    ("uint-max", 2**64 - 1),
    ("int-m1", -1),
    ("int-m32", -32),
    ("int-m33", -33),
    ("int-m128", -128),
    ("int-m129", -129),
    ("int-m32768", -32768),
    ("int-m32769", -32769),
    ("int-m2147483648", -(2**31)),
    ("int-m2147483649", -(2**31) - 1),
    ("int-min", -(2**63)),
    ("bin-empty", b""),
    ("bin-3", b"\x01\x02\x03"),
    ("bin-255", bytes(range(255))),
    ("bin-256", bytes(i % 256 for i in range(256))),
    ("str-empty", ""),
    ("str-method", "C_Sign"),
    ("str-31", "a" * 31),
    ("str-32", "b" * 32),
    ("str-utf8", "ключ ✓"),
    ("str-256", "c" * 256),
    ("array-empty", []),
    ("array-15", list(range(15))),
    ("array-16", list(range(16))),
    ("array-nested", [[1, [2, [3, []]]], None]),
    ("map-empty", {}),
    ("map-1", {"a": 1}),
    ("map-16", {f"k{i:02}": i for i in range(16)}),
    # Protocol messages (docs/protocol.md).
    (
        "request-hello",
        [
            0,
            1,
            "hello",
            [{"versions": [1, 1], "features": ["app-join", "outlen"], "app_id": None, "client": "libkeygrid-pkcs11"}],
        ],
    ),
    (
        "reply-hello",
        [
            1,
            1,
            0,
            {
                "version": 1,
                "features": ["app-join", "outlen"],
                "app_id": bytes(range(16)),
                "server": "keygridd 0.1.0",
                "limits": {"max_frame": 1048576, "max_attributes": 256},
            },
            None,
        ],
    ),
    ("request-sign-length", [0, 7, "C_Sign", [1, b"hello", -1]]),
    ("request-sign", [0, 8, "C_Sign", [1, b"hello", 64]]),
    ("reply-out", [1, 8, 0, [b"\x30\x45\x02\x21", 4], None]),
    ("reply-out-length", [1, 7, 0, [None, 64], None]),
    ("reply-buffer-too-small", [1, 9, 0x150, [None, 64], "64 bytes needed"]),
    # C_GetAttributeValue of CKA_LABEL, CKA_VALUE (sensitive), CKA_SIGN, CKA_KEY_TYPE,
    # CKA_ALLOWED_MECHANISMS, CKA_UNWRAP_TEMPLATE.
    (
        "reply-attributes",
        [1, 10, 0x11, [b"label", None, True, 3, [0x1041, 0x1082], [[0x0, 4], [0x161, 32], [0x104, False]]], None],
    ),
    ("reply-fatal", [2, 0, 7, "the first request must be hello"]),
    ("reply-info", [1, 2, 0, {"cryptoki_version": [2, 40], "manufacturer_id": "KeyGrid", "flags": 0}, None]),
    # Mechanisms with each parameter form.
    ("mechanism-none", [0x1041, None]),
    ("mechanism-iv", [0x1082, bytes(range(16))]),
    ("mechanism-gcm", [0x1087, [1, bytes(12), 96, b"aad", 128]]),
    ("mechanism-oaep", [0x9, [2, 0x250, 0x2, 0x1, b"label"]]),
    ("mechanism-pss", [0x43, [3, 0x250, 0x2, 32]]),
    ("mechanism-ecdh1", [0x1050, [4, 0x1, b"", b"\x04\x01\x02"]]),
    ("mechanism-ctr", [0x1086, [5, 128, bytes(range(16))]]),
    ("mechanism-eddsa", [0x1057, [6, True, b"ctx"]]),
    ("mechanism-ulong", [0x252, [7, 16]]),
    # A template with every value kind: CKA_CLASS, CKA_TOKEN, CKA_LABEL, CKA_ALLOWED_MECHANISMS,
    # CKA_WRAP_TEMPLATE holding CKA_KEY_TYPE and CKA_VALUE_LEN, and a vendor attribute (bytes).
    (
        "template-kinds",
        [
            [0x0, 3],
            [0x1, True],
            [0x3, b"key"],
            [0x40000600, [0x1041, 0x1082]],
            [0x40000211, [[0x100, 0x1F], [0x161, 32]]],
            [0x80000001, b"\x01\x02"],
        ],
    ),
]


def render(value: Any) -> str:
    """The canonical literal: what the C test prints for a decoded value."""
    if value is None or isinstance(value, bool | int):
        return repr(value)
    if isinstance(value, bytes):
        return 'b"' + "".join(f"\\x{b:02x}" for b in value) + '"'
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    return "{" + ", ".join(f"{render(k)}: {render(v)}" for k, v in value.items()) + "}"


def main() -> None:
    out = sys.stdout
    out.write("# Golden MessagePack vectors: NAME HEX LITERAL. Written by make_vectors.py (same folder)\n")
    out.write("# from keygridd.protocol.codec.pack (msgpack, use_bin_type=True); read by the C and Python tests.\n")
    for name, value in VECTORS:
        out.write(f"{name} {pack(value).hex()} {render(value)}\n")


if __name__ == "__main__":
    main()
