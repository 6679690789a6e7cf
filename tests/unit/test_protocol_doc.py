"""docs/protocol.md agrees with the call table and the codec's tables."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from keygridd.pkcs11.params import ParamType
from keygridd.protocol import calls, codec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"


def load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protocol_doc", ROOT / "tools" / "gen_protocol_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_method_reference_is_fresh() -> None:
    generator = load_generator()
    text = DOC.read_text()
    assert text == generator.updated(text), "run: python tools/gen_protocol_doc.py --write"  # type: ignore[attr-defined]


def test_every_call_is_documented_with_its_signature() -> None:
    text = DOC.read_text()
    documented = re.findall(r"^### `([A-Za-z_]+)`$", text, flags=re.M)
    assert documented == [c.name for c in calls.CALLS]
    for call in calls.CALLS:
        args = ", ".join(f"{a.name}: {a.type}" for a in call.args)
        assert f"`{call.name}({args}) -> {call.result}`" in text


def test_every_argument_type_and_parameter_type_is_described() -> None:
    text = DOC.read_text()
    types = {a.type for c in calls.CALLS for a in c.args}
    assert types <= set(codec._CHECKS), "an argument type without a codec check"
    for t in types:
        assert f"| `{t}` |" in text, f"argument type {t} is not in the table of argument types"
    for param in ParamType:
        assert f"`[{param.value}, " in text, f"parameter type {param.name} is not documented"


def test_documented_limits_match_the_code() -> None:
    text = DOC.read_text()
    from keygridd.server.connection import MAX_IN_FLIGHT

    assert f"| requests in flight per connection | {MAX_IN_FLIGHT} | fixed |" in text
