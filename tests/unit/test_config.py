"""Tests of keygridd.config: defaults, every error kind, ${VAR} expansion, env overrides, the example file."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from keygridd.config import (
    AccessList,
    ConfigError,
    LoggingSettings,
    ServerSettings,
    Settings,
    SlotSettings,
    TokenInit,
    build,
    constrain,
    load_config,
    parse_config,
    validate_provider_options,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keygrid.yaml.example"
MINIMAL = "slots:\n  - provider: memory\n"


def parse(text: str, **env: str) -> Settings:
    return parse_config(text, "test.yaml", env)


def test_defaults() -> None:
    settings = parse(MINIMAL)
    assert settings.server == ServerSettings()
    assert settings.server.socket == "/run/keygrid/keygrid.sock"
    assert settings.server.socket_mode == 0o660
    assert settings.server.socket_group is None
    assert settings.server.max_frame_bytes == 1048576
    assert settings.server.max_attributes == 256
    assert settings.server.max_connections == 256
    assert settings.server.worker_threads == 8
    assert settings.server.shutdown_grace_seconds == 10.0
    assert settings.server.busy_poll_microseconds == 100
    assert settings.logging == LoggingSettings(level="info", format="text")
    (slot,) = settings.slots
    assert slot.id == 0 and slot.provider == "memory" and slot.token is None
    assert slot.access == AccessList() and slot.access.allows(1000, 1000, [])
    assert dict(slot.options) == {}


def test_settings_are_frozen_and_options_read_only() -> None:
    settings = parse(MINIMAL + "    options: {persist: null}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.worker_threads = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.slots[0].options["persist"] = "x"  # type: ignore[index]


def test_slot_ids_default_to_position_and_can_be_set() -> None:
    settings = parse("slots:\n  - provider: a\n  - provider: b\n    id: 7\n  - provider: c\n")
    assert [s.id for s in settings.slots] == [0, 7, 2]


def test_full_file() -> None:
    text = """
server:
  socket: /tmp/kg.sock
  socket_mode: 0600
  socket_group: 0
  max_frame_bytes: 65536
  shutdown_grace_seconds: 2.5
logging: {level: debug, format: json}
slots:
  - id: 3
    description: "hsm"
    provider: pkcs11
    access: {uids: [1000], gids: [50], users: [root], groups: [root]}
    token: {label: dev, so_pin: "12345678", user_pin: "87654321"}
    options: {module: /usr/lib/softhsm/libsofthsm2.so, slots: [1, 2]}
"""
    settings = parse(text)
    assert settings.server.socket == "/tmp/kg.sock"
    assert settings.server.socket_mode == 0o600  # YAML 1.1 reads 0600 as octal
    assert settings.server.socket_group == 0
    assert settings.server.shutdown_grace_seconds == 2.5
    assert settings.logging.format == "json"
    slot = settings.slots[0]
    assert slot.access.uids == frozenset({1000, 0})
    assert slot.access.gids == frozenset({50, 0})
    assert slot.token == TokenInit(label="dev", so_pin="12345678", user_pin="87654321")
    assert slot.options["slots"] == [1, 2]


def test_pins_stay_out_of_repr() -> None:
    settings = parse(MINIMAL + "    token: {label: dev, so_pin: s3cr3t-so, user_pin: s3cr3t-user}\n")
    assert "s3cr3t" not in repr(settings)


@pytest.mark.parametrize(
    ("uids", "gids", "peer", "allowed"),
    [
        ((), (), (0, 0, ()), True),
        ((), (), (1234, 1234, ()), True),
        ((1000,), (), (1000, 5, ()), True),
        ((1000,), (), (0, 0, ()), False),  # root is not special
        ((), (50,), (1, 50, ()), True),
        ((), (50,), (1, 1, (7, 50)), True),
        ((), (50,), (1, 1, (7,)), False),
    ],
)
def test_access_list(
    uids: tuple[int, ...], gids: tuple[int, ...], peer: tuple[int, int, tuple[int, ...]], allowed: bool
) -> None:
    access = AccessList(uids=frozenset(uids), gids=frozenset(gids))
    assert access.allows(*peer) is allowed


def test_socket_mode_forms() -> None:
    for text, mode in (('"0660"', 0o660), ('"600"', 0o600), ('"0o640"', 0o640), ("432", 0o660)):
        assert parse(f"server: {{socket_mode: {text}}}\n" + MINIMAL).server.socket_mode == mode


def test_group_names_resolve() -> None:
    name = grp.getgrgid(os.getgid()).gr_name
    settings = parse(f"server: {{socket_group: {name}}}\n" + MINIMAL)
    assert settings.server.socket_group == os.getgid()


def test_user_names_resolve() -> None:
    name = pwd.getpwuid(os.getuid()).pw_name
    settings = parse(MINIMAL + f"    access: {{users: [{name}]}}\n")
    assert settings.slots[0].access.uids == frozenset({os.getuid()})


# --- ${VAR} expansion and environment overrides ------------------------------------------------------------------


def test_variable_expansion() -> None:
    text = MINIMAL + '    description: "${DESC} on ${HOST:-here} costs $$5"\n    token: {label: dev, so_pin: "${SO}"}\n'
    settings = parse(text, DESC="memory", SO="12345678")
    assert settings.slots[0].description == "memory on here costs $5"
    assert settings.slots[0].token is not None and settings.slots[0].token.so_pin == "12345678"
    assert parse(text, DESC="d", SO="12345678", HOST="box").slots[0].description == "d on box costs $5"


def test_env_overrides_beat_file() -> None:
    text = "server: {worker_threads: 2, socket: /from/file}\nlogging: {level: error}\n" + MINIMAL
    settings = parse(
        text,
        KEYGRID_SOCKET="/tmp/env.sock",
        KEYGRID_SERVER_WORKER_THREADS="4",
        KEYGRID_SERVER_SOCKET_MODE="0600",
        KEYGRID_SERVER_SOCKET_GROUP="",
        KEYGRID_SERVER_SHUTDOWN_GRACE_SECONDS="0.5",
        KEYGRID_LOGGING_LEVEL="debug",
        KEYGRID_LOGGING_FORMAT="json",
        KEYGRID_PIN="ignored: not a setting section",
    )
    assert settings.server.socket == "/tmp/env.sock"
    assert settings.server.worker_threads == 4
    assert settings.server.socket_mode == 0o600
    assert settings.server.socket_group is None
    assert settings.server.shutdown_grace_seconds == 0.5
    assert settings.logging == LoggingSettings(level="debug", format="json")


def test_env_override_creates_missing_section() -> None:
    assert parse(MINIMAL, KEYGRID_SERVER_MAX_CONNECTIONS="3").server.max_connections == 3


# --- errors: one case per kind -------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, str, dict[str, str], str, str]] = [
    # (name, yaml, env, path, problem fragment)
    ("bad yaml", "slots:\n - provider: m\n  bad", {}, "line 3, column 3", "invalid YAML"),
    ("duplicate yaml key", "slots: []\nslots: []\n", {}, "line 2, column 1", "duplicate key 'slots'"),
    ("top level not a mapping", "- a\n", {}, "(top level)", "expected a mapping, got a list"),
    ("unknown key", "server: {soket: /x}\n" + MINIMAL, {}, "server.soket", "did you mean 'socket'?"),
    ("unknown top key", "slot: []\n" + MINIMAL, {}, "slot", "did you mean 'slots'?"),
    ("unknown nested key", MINIMAL + "    access: {user: [root]}\n", {}, "slots[0].access.user", "did you mean"),
    ("wrong type int", "server: {worker_threads: many}\n" + MINIMAL, {}, "server.worker_threads", "expected an integer, got a string"),
    ("bool is not int", "server: {max_connections: true}\n" + MINIMAL, {}, "server.max_connections", "expected an integer"),
    ("wrong type list", MINIMAL + "    access: {uids: 5}\n", {}, "slots[0].access.uids", "expected a list"),
    ("wrong item type", MINIMAL + "    access: {uids: [1, x]}\n", {}, "slots[0].access.uids[1]", "expected an integer"),
    ("wrong type mapping", MINIMAL + "    options: [1]\n", {}, "slots[0].options", "expected a mapping"),
    ("slots not a list", "slots: {provider: m}\n", {}, "slots", "expected a list"),
    ("range low", "server: {max_frame_bytes: 100}\n" + MINIMAL, {}, "server.max_frame_bytes", "must be >= 4096"),
    ("range high", "server: {max_frame_bytes: 67108865}\n" + MINIMAL, {}, "server.max_frame_bytes", "must be <= 67108864"),
    ("busy poll range", "server: {busy_poll_microseconds: 10001}\n" + MINIMAL, {}, "server.busy_poll_microseconds", "must be <= 10000"),
    ("busy poll negative", "server: {busy_poll_microseconds: -1}\n" + MINIMAL, {}, "server.busy_poll_microseconds", "must be >= 0"),
    ("slot id range", "slots: [{provider: m, id: 4294967296}]\n", {}, "slots[0].id", "must be <="),
    ("choice", "logging: {level: loud}\n" + MINIMAL, {}, "logging.level", "must be one of 'debug', 'info'"),
    ("bad mode", "server: {socket_mode: '0999'}\n" + MINIMAL, {}, "server.socket_mode", "octal mode"),
    ("mode too big", "server: {socket_mode: 4095}\n" + MINIMAL, {}, "server.socket_mode", "between 0000 and 0777"),
    ("socket path too long", f"server: {{socket: /{'s' * 120}}}\n" + MINIMAL, {}, "server.socket", "at most 107 bytes"),
    ("description too long", MINIMAL + f"    description: {'d' * 65}\n", {}, "slots[0].description", "at most 64 bytes"),
    ("label too long", MINIMAL + f"    token: {{label: {'é' * 17}, so_pin: '12345678'}}\n", {}, "slots[0].token.label", "at most 32 bytes"),
    ("pin too short", MINIMAL + "    token: {label: dev, so_pin: '123'}\n", {}, "slots[0].token.so_pin", "at least 4 characters"),
    ("pin wrong type", MINIMAL + "    token: {label: dev, so_pin: 12345678}\n", {}, "slots[0].token.so_pin", "expected a string, got an integer"),
    ("duplicate slot id", "slots: [{provider: a, id: 1}, {provider: b, id: 1}]\n", {}, "slots[1].id", "duplicate slot id 1 (also slots[0])"),
    ("duplicate default id", "slots: [{provider: a}, {provider: b, id: 0}]\n", {}, "slots[1].id", "duplicate slot id 0"),
    ("missing slots", "server: {}\n", {}, "slots", "missing required key"),
    ("empty slots", "slots: []\n", {}, "slots", "must not be empty"),
    ("missing provider", "slots: [{id: 1}]\n", {}, "slots[0].provider", "missing required key"),
    ("missing so_pin", MINIMAL + "    token: {label: dev}\n", {}, "slots[0].token.so_pin", "missing required key"),
    ("unknown user", MINIMAL + "    access: {users: [root, no-such-user-kg]}\n", {}, "slots[0].access.users[1]", "unknown user 'no-such-user-kg'"),
    ("unknown group", MINIMAL + "    access: {groups: [no-such-group-kg]}\n", {}, "slots[0].access.groups[0]", "unknown group"),
    ("unknown socket group", "server: {socket_group: no-such-group-kg}\n" + MINIMAL, {}, "server.socket_group", "unknown group"),
    ("unset variable", MINIMAL + "    description: ${NOPE}\n", {}, "slots[0].description", "environment variable NOPE is not set"),
    ("env bad type", MINIMAL, {"KEYGRID_SERVER_WORKER_THREADS": "x"}, "server.worker_threads (from KEYGRID_SERVER_WORKER_THREADS)", "expected an integer"),
    ("env bad value", MINIMAL, {"KEYGRID_SERVER_WORKER_THREADS": "0"}, "server.worker_threads (from KEYGRID_SERVER_WORKER_THREADS)", "must be >= 1"),
    ("env bad choice", MINIMAL, {"KEYGRID_LOGGING_LEVEL": "loud"}, "logging.level (from KEYGRID_LOGGING_LEVEL)", "must be one of"),
    ("env unknown key", MINIMAL, {"KEYGRID_SERVER_WORKER_THREAD": "4"}, "KEYGRID_SERVER_WORKER_THREAD", "did you mean 'worker_threads'?"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "env", "path", "problem"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_errors(text: str, env: dict[str, str], path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, **env)
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value) == f"test.yaml: {path}: {info.value.problem}"


def test_errors_never_show_a_pin() -> None:
    with pytest.raises(ConfigError) as info:
        parse(MINIMAL + "    token: {label: dev, so_pin: 'abc'}\n")
    assert "abc" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(info.value) == f"{missing}: configuration file not found"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, {})  # a directory
    assert info.value.source == str(tmp_path) and "cannot read configuration file" in info.value.problem


def test_load_config_uses_keygrid_config(tmp_path: Path) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(MINIMAL)
    assert load_config(None, {"KEYGRID_CONFIG": str(path)}).slots[0].provider == "memory"


# --- the example file ----------------------------------------------------------------------------------------------


def test_example_loads() -> None:
    settings = load_config(EXAMPLE, {"KEYGRID_DEV_SO_PIN": "so-pin-1234"})
    assert settings.slots[0].provider == "memory"
    assert settings.slots[0].token is not None and settings.slots[0].token.so_pin == "so-pin-1234"
    assert settings.server == ServerSettings()
    assert settings.logging == LoggingSettings()


def _dataclasses(cls: type) -> set[type]:
    found = {cls}
    for f in dataclasses.fields(cls):
        for candidate in (SlotSettings, ServerSettings, LoggingSettings, AccessList, TokenInit):
            if candidate.__name__ in str(f.type) and candidate not in found:
                found |= _dataclasses(candidate)
    return found


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    classes = _dataclasses(Settings)
    assert {SlotSettings, ServerSettings, LoggingSettings, AccessList, TokenInit} <= classes
    names = {f.name for cls in classes for f in dataclasses.fields(cls)} | {"users", "groups"}
    names |= {"persist", "scenarios", "operations", "latency_ms", "error_rate", "error"}  # memory provider
    lines = text.splitlines()
    for name in sorted(names):
        index = next((i for i, line in enumerate(lines) if re.match(rf"\s*(#\s*)?(-\s*)?{name}:", line)), None)
        assert index is not None, f"keygrid.yaml.example does not show key {name!r}"
        assert lines[index - 1].strip().lstrip("- ").startswith("#"), (
            f"keygrid.yaml.example: key {name!r} has no comment above it"
        )


# --- build() and provider options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scenario:
    operations: tuple[str, ...] = ()
    latency_ms: int = 0
    error_rate: float = field(default=0.0, metadata=constrain(minimum=0.0, maximum=1.0))
    error: str = "CKR_DEVICE_ERROR"


@dataclass(frozen=True)
class _Options:
    persist: str | None = None
    scenarios: tuple[_Scenario, ...] = ()
    mode: Literal["fast", "slow"] = "fast"
    extra: Mapping[str, Any] = field(default_factory=dict)
    pair: tuple[int, str] = (0, "")
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.persist == "/":
            raise ValueError("persist must name a file, not /")


class _Provider:
    options_type = _Options


class _Plain:
    pass


def test_build_types() -> None:
    data = {
        "persist": "/tmp/x",
        "scenarios": [{"operations": ["C_Sign"], "latency_ms": 5, "error_rate": 1}],
        "mode": "slow",
        "extra": {"a": [1]},
        "pair": [1, "b"],
        "names": ["n"],
    }
    options = build(_Options, data, "opts")
    assert options == _Options(
        persist="/tmp/x",
        scenarios=(_Scenario(operations=("C_Sign",), latency_ms=5, error_rate=1.0),),
        mode="slow",
        extra={"a": [1]},
        pair=(1, "b"),
        names=["n"],
    )
    assert build(_Options, None, "opts") == _Options()


@pytest.mark.parametrize(
    ("data", "path", "problem"),
    [
        ({"persits": None}, "o.persits", "did you mean 'persist'?"),
        ({"persist": 5}, "o.persist", "expected a string or null, got an integer"),
        ({"scenarios": [{"error_rate": 2}]}, "o.scenarios[0].error_rate", "must be <= 1.0"),
        ({"scenarios": [{"latency_ms": "1"}]}, "o.scenarios[0].latency_ms", "expected an integer"),
        ({"mode": "medium"}, "o.mode", "must be one of 'fast', 'slow'"),
        ({"pair": [1]}, "o.pair", "expected a list of 2 items"),
        ({"persist": "/"}, "o", "persist must name a file"),
        ("text", "o", "expected a mapping, got a string"),
    ],
)
def test_build_errors(data: Any, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(_Options, data, "o")
    assert info.value.path == path
    assert problem in info.value.problem


def test_validate_provider_options() -> None:
    settings = parse("slots:\n  - {provider: mem, options: {persist: /tmp/t}}\n  - {provider: plain, id: 9}\n")
    lookup = {"mem": _Provider, "plain": _Plain}
    options = validate_provider_options(settings, lookup.__getitem__, lookup)
    assert options == {0: _Options(persist="/tmp/t"), 9: None}


def test_validate_provider_options_errors() -> None:
    settings = parse("slots:\n  - {provider: mem, options: {persist: 1}}\n")
    with pytest.raises(ConfigError) as info:
        validate_provider_options(settings, {"mem": _Provider}.__getitem__, ["mem"], source="k.yaml")
    assert str(info.value) == "k.yaml: slots[0].options.persist: expected a string or null, got an integer"

    settings = parse("slots:\n  - {provider: nope}\n")
    with pytest.raises(ConfigError) as info:
        validate_provider_options(settings, {"mem": _Provider}.__getitem__, ["mem", "pkcs11"])
    assert info.value.path == "slots[0].provider"
    assert info.value.problem == "unknown provider 'nope' (known: mem, pkcs11)"

    settings = parse("slots:\n  - {provider: plain, options: {x: 1}}\n")
    with pytest.raises(ConfigError) as info:
        validate_provider_options(settings, {"plain": _Plain}.__getitem__)
    assert info.value.path == "slots[0].options.x"
