"""A small generic builder: a mapping (from YAML) to a frozen, validated dataclass.

``build(cls, data, path)`` checks every field's type (int, float, str, bool,
None and unions, Literal, tuples, lists, frozensets, nested dataclasses,
mappings, Any) and the constraints ``constrain`` attaches to a field; unknown
keys are errors with the closest known key suggested. Every problem is a
``ConfigError`` naming the key path (``slots[1].access.users[0]``). The
configuration (``config.py``) and every provider's ``options`` use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem: which file, which key, what is wrong."""

    def __init__(self, path: str, problem: str, source: str | None = None) -> None:
        super().__init__(path, problem, source)
        self.path = path
        self.problem = problem
        self.source = source

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.path) if p]
        return ": ".join([*parts, self.problem])

    def with_source(self, source: str, path: str | None = None) -> ConfigError:
        """A copy of this error attributed to ``source`` (and ``path`` when given)."""
        return ConfigError(self.path if path is None else path, self.problem, source)


Converter = Callable[[Any, str], Any]


def constrain(
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_len: int | None = None,
    max_len: int | None = None,
    max_bytes: int | None = None,
    convert: Converter | None = None,
) -> dict[str, object]:
    """Field metadata understood by ``build``: ``field(default=0, metadata=constrain(minimum=0))``.

    Ranges apply to numbers (and to each item of a list), lengths to strings and
    lists, ``max_bytes`` to a string's UTF-8 size. ``convert(value, path)`` replaces
    type checking for that field and returns the final value (or raises ConfigError).
    """
    spec = {"minimum": minimum, "maximum": maximum, "min_len": min_len, "max_len": max_len,
            "max_bytes": max_bytes, "convert": convert}  # fmt: skip
    return {k: v for k, v in spec.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------------
# The generic builder
# ---------------------------------------------------------------------------------------------------------------------

_hints_cache: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _hints_cache[cls] = hints
    return hints


def kind_name(value: object) -> str:
    """A short name for the YAML type of ``value`` (never the value itself: it may be a PIN)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def suggestion(key: str, known: Iterable[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(names)})" if names else ""


def build(cls: type[T], data: Any, path: str) -> T:
    """Build the frozen dataclass ``cls`` from the mapping ``data`` read at ``path``.

    Field types understood: int, float, str, bool, None/Optional and unions, Literal,
    tuple[X, ...], list[X], frozenset[X], nested dataclasses, Mapping[str, X] / dict[str, X], Any.
    Field metadata adds constraints (see ``constrain``). Unknown keys, missing required keys,
    wrong types and out-of-range values raise ``ConfigError`` naming the key path.
    A ``ValueError`` raised by the dataclass itself is reported at ``path``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"build() needs a dataclass, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {kind_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {kind_name(key)} {key!r}")
        if key not in fields:
            raise ConfigError(join_path(path, key), f"unknown key {key!r}{suggestion(key, fields)}")
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = join_path(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(sub, "missing required key")
            continue
        convert = f.metadata.get("convert")
        value = convert(data[name], sub) if convert is not None else _coerce(hints[name], data[name], sub)
        _check_constraints(f.metadata, value, sub)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(path or "(top level)", str(exc)) from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked (and converted, for collections) against the annotation ``tp``."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(args, value, path)
    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        choices = ", ".join(repr(c) for c in args)
        shown = repr(value) if isinstance(value, str | int | float) else kind_name(value)
        raise ConfigError(path, f"must be one of {choices}, got {shown}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, f"expected null, got {kind_name(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected a boolean (true/false), got {kind_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {kind_name(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {kind_name(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {kind_name(value)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (tuple, list, frozenset, set, Sequence):
        return _coerce_sequence(origin, args, value, path)
    if origin in (dict, Mapping):
        return _coerce_mapping(origin, args, value, path)
    raise TypeError(f"build() does not support the annotation {tp!r} (at {path})")


def _coerce_union(args: tuple[Any, ...], value: Any, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    errors: list[ConfigError] = []
    for member in members:
        try:
            return _coerce(member, value, path)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:
        if members[0] in (int, float, str, bool) and type(None) in args:
            raise ConfigError(path, f"expected {_type_name(members[0])} or null, got {kind_name(value)}")
        raise errors[0]
    names = [_type_name(m) for m in members] + (["null"] if type(None) in args else [])
    raise ConfigError(path, f"expected {' or '.join(names)}, got {kind_name(value)}")


def _type_name(tp: Any) -> str:
    simple = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}
    if tp in simple:
        return simple[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return "a list"


def _coerce_sequence(origin: Any, args: tuple[Any, ...], value: Any, path: str) -> Any:
    if not isinstance(value, list | tuple):
        raise ConfigError(path, f"expected a list, got {kind_name(value)}")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(path, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    item_type = args[0] if args else Any
    items = [_coerce(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is list:
        return items
    if origin in (frozenset, set):
        return frozenset(items) if origin is frozenset else set(items)
    return tuple(items)


def _coerce_mapping(origin: Any, args: tuple[Any, ...], value: Any, path: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {kind_name(value)}")
    key_type, value_type = args if args else (str, Any)
    result: dict[Any, Any] = {}
    for key, item in value.items():
        result[_coerce(key_type, key, path)] = _coerce(value_type, item, join_path(path, str(key)))
    return result if origin is dict else types.MappingProxyType(result)


def _check_constraints(meta: Mapping[str, Any], value: Any, path: str) -> None:
    """Apply the ``constrain`` constraints of a field to its typed value (items one by one for collections)."""
    if value is None:
        return
    if isinstance(value, tuple | list | frozenset | set) and ("minimum" in meta or "maximum" in meta):
        for i, item in enumerate(value):
            _check_range(meta, item, f"{path}[{i}]")
    else:
        _check_range(meta, value, path)
    if isinstance(value, str | tuple | list | frozenset | set):
        what = "characters" if isinstance(value, str) else "items"
        if "min_len" in meta and len(value) < meta["min_len"]:
            if meta["min_len"] == 1:
                raise ConfigError(path, "must not be empty")
            raise ConfigError(path, f"must have at least {meta['min_len']} {what}, got {len(value)}")
        if "max_len" in meta and len(value) > meta["max_len"]:
            raise ConfigError(path, f"must have at most {meta['max_len']} {what}, got {len(value)}")
    if isinstance(value, str) and "max_bytes" in meta:
        size = len(value.encode("utf-8"))
        if size > meta["max_bytes"]:
            raise ConfigError(path, f"must be at most {meta['max_bytes']} bytes of UTF-8, got {size}")


def _check_range(meta: Mapping[str, Any], value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if "minimum" in meta and value < meta["minimum"]:
        raise ConfigError(path, f"must be >= {meta['minimum']}, got {value}")
    if "maximum" in meta and value > meta["maximum"]:
        raise ConfigError(path, f"must be <= {meta['maximum']}, got {value}")
