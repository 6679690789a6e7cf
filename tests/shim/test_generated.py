"""The shim's generated header and the golden wire vectors agree with the Python tables and codec."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from keygridd.protocol.codec import pack, unpack

pytestmark = pytest.mark.shim

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "keygrid_pkcs11_shim" / "keygrid-calls.h"
VECTORS = ROOT / "tests" / "vectors" / "wire" / "msgpack.txt"


def _load(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_header_is_fresh() -> None:
    gen = _load(ROOT / "tools" / "gen_shim_header.py", "gen_shim_header")
    expected = gen.render()  # type: ignore[attr-defined]
    assert HEADER.read_text(encoding="utf-8") == expected, (
        "keygrid_pkcs11_shim/keygrid-calls.h is stale: run"
        " `python tools/gen_shim_header.py > keygrid_pkcs11_shim/keygrid-calls.h`"
    )


def _vectors() -> list[tuple[str, str, str]]:
    rows = []
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, hex_bytes, literal = line.split(" ", 2)
            rows.append((name, hex_bytes, literal))
    return rows


@pytest.mark.parametrize(("name", "hex_bytes", "literal"), _vectors(), ids=[v[0] for v in _vectors()])
def test_wire_vector_matches_the_codec(name: str, hex_bytes: str, literal: str) -> None:
    value = ast.literal_eval(literal)
    assert pack(value).hex() == hex_bytes
    assert unpack(bytes.fromhex(hex_bytes)) == value


def test_vectors_file_is_what_make_vectors_writes() -> None:
    gen = _load(VECTORS.with_name("make_vectors.py"), "make_vectors")
    lines = [f"{n} {pack(v).hex()} {gen.render(v)}" for n, v in gen.VECTORS]  # type: ignore[attr-defined]
    assert [" ".join(row) for row in _vectors()] == lines
