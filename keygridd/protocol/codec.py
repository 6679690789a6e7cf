"""Typed values <-> MessagePack, and argument checking by the call table.

Frames carry one MessagePack value each (``framing.py``). Requests are
``[0, id, method, [args...]]``; responses ``[1, id, rv, result, message]``;
a fatal protocol error is ``[2, 0, rv, message]`` before the peer closes.

Attribute values are typed by ``keygridd.pkcs11.attributes`` and mechanism
parameters by ``keygridd.pkcs11.params``: a parameter travels as nil, as raw
bytes, or as ``[type, fields...]`` (docs/protocol.md, "Mechanisms").
Decoding peer data raises ``ArgumentsBad`` (or ``AttributeValueInvalid`` /
``MechanismParamInvalid``) with a message naming the argument; nothing here
does I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from keygridd.pkcs11.attributes import KINDS, ULONG_MAX, AttrValue, Kind
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
from keygridd.protocol.calls import Call

REQUEST, RESPONSE, FATAL = 0, 1, 2

Template = tuple[tuple[int, AttrValue], ...]


_packers = threading.local()  # a Packer per thread: msgpack.packb makes a new one on every call


def packer() -> Callable[[Any], bytes]:
    """``pack`` for one thread's repeated use (a connection's replies): a Packer of its own."""
    return msgpack.Packer(use_bin_type=True).pack  # type: ignore[no-any-return]


def pack(value: Any) -> bytes:
    pack_one: Callable[[Any], bytes] | None = getattr(_packers, "pack", None)
    if pack_one is None:
        pack_one = _packers.pack = packer()
    return pack_one(value)


def unpack(data: bytes) -> Any:
    """Decode one MessagePack value; raises ValueError for anything malformed."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ValueError(f"malformed MessagePack: {exc}") from None


# --- attribute values -------------------------------------------------------------------------


def _is_ulong(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ULONG_MAX


def decode_value(attr: int, value: object, depth: int = 0) -> AttrValue:
    """A wire value for attribute ``attr`` as its Python type; AttributeValueInvalid if mistyped."""
    kind = KINDS.get(attr, Kind.BYTES)
    if kind is Kind.BYTES:
        if isinstance(value, bytes):
            return value
    elif kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
    elif kind is Kind.ULONG:
        if _is_ulong(value):
            return value  # type: ignore[return-value]
    elif kind is Kind.MECHANISMS:
        if isinstance(value, list) and all(_is_ulong(m) for m in value):
            return tuple(value)
    elif isinstance(value, list) and depth < 2:
        return decode_template(value, depth + 1)
    raise AttributeValueInvalid(f"attribute {attr:#x}: expected {kind.name.lower()} value")


def encode_value(value: AttrValue) -> Any:
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return [[a, encode_value(v)] for a, v in value]
        return list(value)
    return value


def decode_template(raw: object, depth: int = 0, max_attributes: int = 1 << 16) -> Template:
    if not isinstance(raw, list):
        raise ArgumentsBad("template: expected an array of [type, value] pairs")
    if len(raw) > max_attributes:
        raise ArgumentsBad(f"template: {len(raw)} attributes, the limit is {max_attributes}")
    out: list[tuple[int, AttrValue]] = []
    seen: dict[int, AttrValue] = {}
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and _is_ulong(pair[0])):
            raise ArgumentsBad("template: each entry must be [type, value]")
        attr = pair[0]
        value = decode_value(attr, pair[1], depth)
        if attr in seen and seen[attr] != value:
            raise TemplateInconsistent(f"attribute {attr:#x} given twice with different values")
        seen[attr] = value
        out.append((attr, value))
    return tuple(out)


def encode_template(template: Sequence[tuple[int, AttrValue]]) -> list[list[Any]]:
    return [[attr, encode_value(value)] for attr, value in template]


# --- mechanisms ----------------------------------------------------------------------------------


def _fields(raw: list[Any], types: str) -> list[Any]:
    if len(raw) != len(types) + 1:
        raise MechanismParamInvalid(f"parameter type {raw[0]}: expected {len(types)} fields")
    fields = raw[1:]
    for value, t in zip(fields, types, strict=True):
        if t == "u":
            ok = (type(value) is int and 0 <= value <= ULONG_MAX) or _is_ulong(value)
        elif t == "b":
            ok = isinstance(value, bytes)
        else:
            ok = isinstance(value, bool)
        if not ok:
            raise MechanismParamInvalid(f"parameter type {raw[0]}: a field has the wrong type")
    return fields


def _gcm(fields: list[Any]) -> GcmParams:
    iv, iv_bits, aad, tag_bits = fields
    return GcmParams(iv=iv, aad=aad, tag_bits=tag_bits, iv_bits=iv_bits)


_PARAM_DECODERS: dict[int, Callable[[list[Any]], Param]] = {
    ParamType.GCM: lambda r: _gcm(_fields(r, "bubu")),
    ParamType.OAEP: lambda r: OaepParams(*_fields(r, "uuub")),
    ParamType.PSS: lambda r: PssParams(*_fields(r, "uuu")),
    ParamType.ECDH1: lambda r: Ecdh1Params(*_fields(r, "ubb")),
    ParamType.CTR: lambda r: CtrParams(*_fields(r, "ub")),
    ParamType.EDDSA: lambda r: EddsaParams(*_fields(r, "?b")),
    ParamType.ULONG: lambda r: UlongParams(*_fields(r, "u")),
}


_WITHOUT_PARAM: dict[int, Mechanism] = {}  # frozen values, shared: most requests name one of a few


def decode_mechanism(raw: object) -> Mechanism:
    if not (type(raw) is list and len(raw) == 2):
        raise ArgumentsBad("mechanism: expected [mechanism, parameter]")
    number, param = raw
    if not ((type(number) is int and 0 <= number <= ULONG_MAX) or _is_ulong(number)):
        raise ArgumentsBad("mechanism: expected [mechanism, parameter]")
    if param is None:
        found = _WITHOUT_PARAM.get(number)
        if found is None:
            found = Mechanism(int(number))
            if len(_WITHOUT_PARAM) < 4096:
                _WITHOUT_PARAM[number] = found
        return found
    if isinstance(param, bytes):
        return Mechanism(number, param)
    if isinstance(param, list) and param and param[0] in _PARAM_DECODERS:
        return Mechanism(number, _PARAM_DECODERS[param[0]](param))
    raise MechanismParamInvalid("mechanism parameter: expected nil, bytes or [type, fields...]")


def encode_param(param: Param) -> Any:
    if param is None or isinstance(param, bytes):
        return param
    if isinstance(param, GcmParams):
        return [ParamType.GCM.value, param.iv, param.iv_bits, param.aad, param.tag_bits]
    if isinstance(param, OaepParams):
        return [ParamType.OAEP.value, param.hash_alg, param.mgf, param.source, param.source_data]
    if isinstance(param, PssParams):
        return [ParamType.PSS.value, param.hash_alg, param.mgf, param.s_len]
    if isinstance(param, Ecdh1Params):
        return [ParamType.ECDH1.value, param.kdf, param.shared_data, param.public_data]
    if isinstance(param, CtrParams):
        return [ParamType.CTR.value, param.counter_bits, param.cb]
    if isinstance(param, EddsaParams):
        return [ParamType.EDDSA.value, param.ph_flag, param.context_data]
    return [ParamType.ULONG.value, param.value]


def encode_mechanism(mechanism: Mechanism | int) -> list[Any]:
    if isinstance(mechanism, int):
        return [int(mechanism), None]
    return [int(mechanism.mechanism), encode_param(mechanism.param)]


# --- arguments by call table ------------------------------------------------------------------------


def _check_ulong(value: object, name: str) -> int:
    if not _is_ulong(value):
        raise ArgumentsBad(f"{name}: expected an unsigned integer")
    return value  # type: ignore[return-value]


def _check_outlen(value: object, name: str) -> int | None:
    if value is None or value == -1 or _is_ulong(value):
        return value  # type: ignore[return-value]
    raise ArgumentsBad(f"{name}: expected nil, -1 or a buffer length")


def _check(kind: type | tuple[type, ...], label: str) -> Callable[[object, str], Any]:
    def check(value: object, name: str) -> Any:
        if not isinstance(value, kind) or (kind is bool) != isinstance(value, bool):
            raise ArgumentsBad(f"{name}: expected {label}")
        return value

    return check


def _check_types(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ArgumentsBad(f"{name}: expected an array of attribute types")
    return tuple(_check_ulong(v, name) for v in value)


def _check_bytes_opt(value: object, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    raise ArgumentsBad(f"{name}: expected binary or nil")


_CHECKS: dict[str, Callable[[object, str], Any]] = {
    "ulong": _check_ulong,
    "bool": _check(bool, "a boolean"),
    "bytes": _check(bytes, "binary"),
    "bytes?": _check_bytes_opt,
    "str": _check(str, "a string"),
    "map": _check(dict, "a map"),
    "template": lambda v, n: decode_template(v),
    "types": _check_types,
    "mechanism": lambda v, n: decode_mechanism(v),
    "outlen": _check_outlen,
}


def _check_template_arg(value: object, name: str, max_attributes: int) -> Template:
    return decode_template(value, max_attributes=max_attributes)


def _check_types_arg(value: object, name: str, max_attributes: int) -> tuple[int, ...]:
    types = _check_types(value, name)
    if len(types) > max_attributes:
        raise ArgumentsBad(f"{name}: {len(types)} attributes, the limit is {max_attributes}")
    return types


_ULONG, _BYTES, _OUTLEN, _MECHANISM, _OTHER = range(5)
_KINDS = {"ulong": _ULONG, "bytes": _BYTES, "outlen": _OUTLEN, "mechanism": _MECHANISM}
Plan = tuple[tuple[str, int, Callable[[object, str, int], Any]], ...]
_plans: dict[str, Plan] = {}


def _ignoring_limit(simple: Callable[[object, str], Any]) -> Callable[[object, str, int], Any]:
    def check(value: object, name: str, max_attributes: int) -> Any:
        return simple(value, name)

    return check


def _plan(call: Call) -> Plan:
    """How to check each argument of ``call`` (built once per call)."""
    steps = []
    for arg in call.args:
        if arg.type == "template":
            check: Callable[[object, str, int], Any] = _check_template_arg
        elif arg.type == "types":
            check = _check_types_arg
        else:
            check = _ignoring_limit(_CHECKS[arg.type])
        steps.append((arg.name, _KINDS.get(arg.type, _OTHER), check))
    plan = tuple(steps)
    _plans[call.name] = plan
    return plan


def decode_args(call: Call, raw: object, max_attributes: int) -> list[Any]:
    """Check and convert a request's arguments; raises a PKCS11Error naming the argument."""
    if type(raw) is not list or len(raw) != len(call.args):
        raise ArgumentsBad(f"{call.name}: expected {len(call.args)} arguments")
    plan = _plans.get(call.name) or _plan(call)
    out: list[Any] = []
    for (name, kind, check), value in zip(plan, raw, strict=False):  # the lengths are equal (above)
        # The commonest types are checked inline (the same checks as _CHECKS'): this runs for every request.
        if kind == _ULONG:
            if type(value) is int and 0 <= value <= ULONG_MAX:
                out.append(value)
                continue
        elif kind == _BYTES:
            if type(value) is bytes:
                out.append(value)
                continue
        elif kind == _OUTLEN:
            if value is None or (type(value) is int and -1 <= value <= ULONG_MAX):
                out.append(value)
                continue
        elif kind == _MECHANISM:
            out.append(decode_mechanism(value))
            continue
        out.append(check(value, name, max_attributes))
    return out


def encode_args(call: Call, args: Sequence[Any]) -> list[Any]:
    """The client side of ``decode_args``."""
    out: list[Any] = []
    for arg, value in zip(call.args, args, strict=True):
        if arg.type == "template":
            items = value.items() if isinstance(value, dict) else value
            out.append(encode_template(list(items)))
        elif arg.type == "mechanism":
            out.append(encode_mechanism(value))
        elif arg.type == "types":
            out.append([int(v) for v in value])
        elif arg.type == "ulong":
            out.append(int(value))
        else:
            out.append(value)
    return out
