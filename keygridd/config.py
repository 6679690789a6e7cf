"""Configuration: one YAML file plus ``KEYGRID_*`` environment variables -> frozen, validated settings.

This module owns the settings schema (the dataclasses below), reading the file,
``${VAR}`` / ``${VAR:-default}`` expansion, environment overrides and a small
builder ``build`` (in ``schema.py``, re-exported here) that turns a mapping into a
frozen dataclass while checking every field's type. Providers reuse ``build``
for their ``options``.

Rules:

* every problem is a ``ConfigError`` naming the file, the key path
  (``slots[1].access.users[0]``) and the problem; nothing else escapes;
* unknown keys are errors (with the closest known key suggested);
* environment beats file: ``KEYGRID_SOCKET`` sets ``server.socket`` and every
  scalar key of ``server`` and ``logging`` can be set by
  ``KEYGRID_<SECTION>_<KEY>`` (``KEYGRID_SERVER_WORKER_THREADS=4``);
* PINs are never echoed in messages, and ``TokenInit`` keeps them out of ``repr``.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from keygridd.schema import ConfigError, build, constrain, field_types, join_path, kind_name, suggestion

DEFAULT_CONFIG_PATH = "/etc/keygrid/keygrid.yaml"
DEFAULT_SOCKET = "/run/keygrid/keygrid.sock"
ENV_PREFIX = "KEYGRID_"
SOCKET_ENV = "KEYGRID_SOCKET"
CONFIG_ENV = "KEYGRID_CONFIG"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


# ---------------------------------------------------------------------------------------------------------------------
# Field constraints and converters (read by ``build`` from ``dataclasses.field`` metadata)
# ---------------------------------------------------------------------------------------------------------------------


def _convert_mode(value: Any, path: str) -> int:
    """``socket_mode``: an octal string ("0660", "660", "0o660") or an int (YAML reads 0660 as octal)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(path, f'expected an octal string like "0660" or an integer, got {kind_name(value)}')
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ConfigError(path, f'expected an octal mode like "0660", got {value!r}')
        value = int(text, 8)
    mode = int(value)
    if not 0 <= mode <= 0o777:
        raise ConfigError(path, f"mode must be between 0000 and 0777, got {mode:#o}")
    return mode


def _convert_group(value: Any, path: str) -> int | None:
    """``socket_group``: null, a numeric gid, or a group name resolved with ``grp`` now."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(path, f"expected a group name or a numeric gid, got {kind_name(value)}")
    return _resolve_group(value, path)


def _resolve_group(value: int | str, path: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value < 2**32:
            raise ConfigError(path, f"gid must be between 0 and 2**32-1, got {value}")
        return value
    try:
        gid: int = grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(path, f"unknown group {value!r}") from None
    return gid


def _resolve_user(value: str, path: str) -> int:
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ConfigError(path, f"unknown user {value!r}") from None


def _convert_access(value: Any, path: str) -> AccessList:
    """``access``: the raw lists (uids, gids, users, groups) resolved to numeric sets now."""
    raw = build(_AccessSpec, value, path)
    uids = set(raw.uids)
    gids = set(raw.gids)
    for i, user in enumerate(raw.users):
        uids.add(_resolve_user(user, f"{path}.users[{i}]"))
    for i, group in enumerate(raw.groups):
        gids.add(_resolve_group(group, f"{path}.groups[{i}]"))
    return AccessList(uids=frozenset(uids), gids=frozenset(gids))


def _convert_options(value: Any, path: str) -> Mapping[str, Any]:
    """``options``: any mapping with string keys, kept raw and read-only (the provider validates it)."""
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {kind_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {kind_name(key)} {key!r}")
    return types.MappingProxyType(dict(value))


# ---------------------------------------------------------------------------------------------------------------------
# The settings schema
# ---------------------------------------------------------------------------------------------------------------------

_ID = constrain(minimum=0, maximum=2**32 - 1)
_PIN = constrain(min_len=4, max_len=255)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The ``server`` section: the socket and the daemon's resource bounds."""

    socket: str = field(default=DEFAULT_SOCKET, metadata=constrain(min_len=1, max_bytes=SUN_PATH_MAX))
    socket_mode: int = field(default=0o660, metadata=constrain(convert=_convert_mode))
    socket_group: int | None = field(default=None, metadata=constrain(convert=_convert_group))
    max_frame_bytes: int = field(default=1024 * 1024, metadata=constrain(minimum=4096, maximum=64 * 1024 * 1024))
    max_attributes: int = field(default=256, metadata=constrain(minimum=1, maximum=65536))
    max_connections: int = field(default=256, metadata=constrain(minimum=1, maximum=1_000_000))
    worker_threads: int = field(default=8, metadata=constrain(minimum=1, maximum=1024))
    shutdown_grace_seconds: float = field(default=10.0, metadata=constrain(minimum=0, maximum=3600))
    busy_poll_microseconds: int = field(default=100, metadata=constrain(minimum=0, maximum=10_000))
    ecdsa_thread: bool = True
    ecdsa_precompute: bool = True


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """The ``logging`` section."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class _AccessSpec:
    """``access`` as written in the file, before names are resolved."""

    uids: tuple[int, ...] = field(default=(), metadata=constrain(minimum=0, maximum=2**32 - 1))
    gids: tuple[int, ...] = field(default=(), metadata=constrain(minimum=0, maximum=2**32 - 1))
    users: tuple[str, ...] = ()
    groups: tuple[str | int, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessList:
    """Who may see a slot, as resolved uids and gids. Both empty = everyone; root is not special."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        """True when a peer with this uid, primary gid and supplementary groups may see the slot."""
        if not self.uids and not self.gids:
            return True
        if uid in self.uids or gid in self.gids:
            return True
        return any(g in self.gids for g in groups)


@dataclass(frozen=True, slots=True)
class TokenInit:
    """``token``: initialise the slot's token at start when it is not initialised yet. PINs stay out of repr."""

    label: str = field(metadata=constrain(min_len=1, max_bytes=32))
    so_pin: str = field(repr=False, metadata=_PIN)
    user_pin: str | None = field(default=None, repr=False, metadata=_PIN)


@dataclass(frozen=True, slots=True)
class SlotSettings:
    """One ``slots[]`` entry: a slot served by a provider."""

    id: int = field(metadata=_ID)
    provider: str = field(metadata=constrain(min_len=1))
    description: str = field(default="KeyGrid slot", metadata=constrain(max_bytes=64))
    access: AccessList = field(default_factory=AccessList, metadata=constrain(convert=_convert_access))
    token: TokenInit | None = None
    options: Mapping[str, Any] = field(
        default_factory=lambda: types.MappingProxyType({}), metadata=constrain(convert=_convert_options)
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration."""

    slots: tuple[SlotSettings, ...] = field(metadata=constrain(min_len=1))
    server: ServerSettings = field(default_factory=ServerSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)


# The sections whose scalar keys can be overridden by KEYGRID_<SECTION>_<KEY>.
ENV_SECTIONS: dict[str, type] = {"server": ServerSettings, "logging": LoggingSettings}


# ---------------------------------------------------------------------------------------------------------------------
# Reading: YAML, ${VAR} expansion, environment overrides
# ---------------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_variables(text: str, environ: Mapping[str, str], path: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` replaced from ``environ``; ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(path, f"environment variable {name} is not set (use ${{{name}:-default}})")
            return default
        return value

    return _VAR.sub(replace, text)


def _expand_tree(data: Any, environ: Mapping[str, str], path: str) -> Any:
    if isinstance(data, str):
        return expand_variables(data, environ, path)
    if isinstance(data, Mapping):
        return {k: _expand_tree(v, environ, join_path(path, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_tree(v, environ, f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def _parse_env_value(tp: Any, text: str, meta: Mapping[str, Any]) -> Any:
    """An environment string turned into the raw value a YAML file would hold for a key of type ``tp``."""
    if "convert" in meta:
        return None if text.strip().lower() in ("", "null") and _optional(tp) else text
    if _optional(tp) and text.strip().lower() in ("", "null"):
        return None
    base = _strip_optional(tp)
    if base is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    if base is int:
        try:
            return int(text.strip())
        except ValueError:
            return text
    if base is float:
        try:
            return float(text.strip())
        except ValueError:
            return text
    return text


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Put the ``KEYGRID_*`` overrides into ``data``; returns key path -> the variable that set it."""
    origins: dict[str, str] = {}
    for section, cls in ENV_SECTIONS.items():
        prefix = f"{ENV_PREFIX}{section.upper()}_"
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = field_types(cls)
        for var in sorted(environ):
            if not var.startswith(prefix):
                continue
            key = var[len(prefix) :].lower()
            if key not in fields:
                raise ConfigError(var, f"unknown setting {section}.{key}{suggestion(key, fields)}")
            _set_section_key(data, section, key, _parse_env_value(hints[key], environ[var], fields[key].metadata))
            origins[f"{section}.{key}"] = var
    if SOCKET_ENV in environ:
        _set_section_key(data, "server", "socket", environ[SOCKET_ENV])
        origins["server.socket"] = SOCKET_ENV
    return origins


def _set_section_key(data: dict[str, Any], section: str, key: str, value: Any) -> None:
    current = data.get(section)
    if current is None:
        current = {}
    if not isinstance(current, Mapping):
        raise ConfigError(section, f"expected a mapping, got {kind_name(current)}")
    data[section] = {**current, key: value}


def parse_config(text: str, source: str = "<config>", environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from YAML ``text`` (``source`` names it in errors) and the environment ``environ``."""
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(where, f"invalid YAML: {exc.problem or exc.context}", source) from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}", source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", f"expected a mapping, got {kind_name(raw)}", source)
    origins: dict[str, str] = {}
    try:
        data = _expand_tree(dict(raw), environ, "")
        origins = _apply_env(data, environ)
        slots = data.get("slots")
        if isinstance(slots, list):
            data["slots"] = [_with_default_id(s, i) for i, s in enumerate(slots)]
        settings = build(Settings, data, "")
        _check_unique_ids(settings)
    except ConfigError as exc:
        origin = origins.get(exc.path)
        path = f"{exc.path} (from {origin})" if origin else exc.path
        raise exc.with_source(source, path) from None
    return settings


def _with_default_id(slot: Any, position: int) -> Any:
    if isinstance(slot, Mapping) and "id" not in slot:
        return {"id": position, **slot}
    return slot


def _check_unique_ids(settings: Settings) -> None:
    seen: dict[int, int] = {}
    for i, slot in enumerate(settings.slots):
        if slot.id in seen:
            raise ConfigError(f"slots[{i}].id", f"duplicate slot id {slot.id} (also slots[{seen[slot.id]}])")
        seen[slot.id] = i


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from the YAML file at ``path`` (None: ``$KEYGRID_CONFIG``, else /etc/keygrid/keygrid.yaml)."""
    if path is None:
        path = environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("", "configuration file not found", source) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("", f"cannot read configuration file: {reason}", source) from None
    return parse_config(text, source, environ)


# ---------------------------------------------------------------------------------------------------------------------
# Provider options
# ---------------------------------------------------------------------------------------------------------------------


def validate_provider_options(
    settings: Settings,
    lookup: Callable[[str], type],
    known: Iterable[str] = (),
    source: str = "<config>",
) -> dict[int, object]:
    """Each slot's typed options (slot id -> ``lookup(provider).options_type`` instance).

    ``lookup`` raises ``KeyError`` for an unknown provider; ``known`` names the
    providers there are, for the message. A provider class without
    ``options_type`` takes no options (its slots get ``None``).
    """
    result: dict[int, object] = {}
    for i, slot in enumerate(settings.slots):
        try:
            provider = lookup(slot.provider)
        except KeyError:
            names = ", ".join(sorted(known)) or "none installed"
            problem = f"unknown provider {slot.provider!r} (known: {names})"
            raise ConfigError(f"slots[{i}].provider", problem, source) from None
        options_type = getattr(provider, "options_type", None)
        path = f"slots[{i}].options"
        try:
            if options_type is None:
                if slot.options:
                    first = next(iter(slot.options))
                    raise ConfigError(join_path(path, first), f"provider {slot.provider!r} takes no options")
                result[slot.id] = None
            else:
                result[slot.id] = build(options_type, slot.options, path)
        except ConfigError as exc:
            raise exc.with_source(source) from None
    return result


__all__ = [
    "AccessList", "ConfigError", "LoggingSettings", "ServerSettings", "Settings", "SlotSettings", "TokenInit",
    "build", "constrain", "expand_variables", "load_config", "parse_config", "validate_provider_options",
]  # fmt: skip
