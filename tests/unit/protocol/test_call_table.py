"""The call table and the core agree: one Core method per call, with the table's arguments."""

from __future__ import annotations

import inspect

import pytest

from keygridd.core.core import Core
from keygridd.protocol.calls import BY_NAME, CALLS, FEATURES


@pytest.mark.parametrize("call", [c for c in CALLS if c.name != "hello"], ids=lambda c: c.name)
def test_every_call_has_a_core_method_with_its_arguments(call: object) -> None:
    name = call.name  # type: ignore[attr-defined]
    method = getattr(Core, name, None)
    assert callable(method), f"Core has no method {name}"
    params = list(inspect.signature(method).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "app"], name
    rest = params[2:]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in rest), name
    assert len(rest) == len(call.args), (  # type: ignore[attr-defined]
        f"{name}: table has {[a.name for a in call.args]}, Core has {[p.name for p in rest]}"  # type: ignore[attr-defined]
    )


def test_every_core_function_is_in_the_table() -> None:
    functions = {n for n in dir(Core) if n.startswith(("C_", "KG_")) and callable(getattr(Core, n))}
    assert functions == set(BY_NAME) - {"hello"}


def test_table_is_consistent() -> None:
    assert len(BY_NAME) == len(CALLS)
    assert CALLS[0].name == "hello"
    known = {"ulong", "bool", "bytes", "bytes?", "str", "map", "template", "types", "mechanism", "outlen"}
    for call in CALLS:
        assert {a.type for a in call.args} <= known, call.name
        assert len({a.name for a in call.args}) == len(call.args), call.name
    assert len(set(FEATURES)) == len(FEATURES)
