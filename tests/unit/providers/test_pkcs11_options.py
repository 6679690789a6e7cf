"""The pkcs11 provider's options and PIN sources: bad configuration is refused with the key named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from keygridd.config import ConfigError, build
from keygridd.providers.pkcs11.provider import PinSourceError, Pkcs11Options, read_pin

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def options(**values: Any) -> Pkcs11Options:
    return build(Pkcs11Options, {"module": MODULE, "token_label": "t", **values}, "slots[0].options")


def test_defaults() -> None:
    got = options()
    assert (got.max_concurrency, got.call_timeout_seconds, got.health_interval_seconds) == (None, 30.0, 5.0)
    assert read_pin(got, {}) is None


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"token_label": None}, "token_label or token_serial"),
        ({"token_serial": "123"}, "token_label or token_serial"),
        ({"pin": "1", "pin_env": "X"}, "at most one of pin"),
        ({"pin_credential": "a/b"}, "credential name, not a path"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"call_timeout_seconds": 0}, "call_timeout_seconds"),
        ({"module": ""}, "module"),
        ({"environment": {"A": 1}}, "environment"),
        ({"lanes": 4}, "lanes"),
    ],
)
def test_bad_options_name_the_problem(values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        options(**values)
    assert caught.value.path.startswith("slots[0].options")


def test_pin_sources(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"from-file\n")
    (tmp_path / "hsm-pin").write_bytes(b"from-credential")
    assert read_pin(options(pin="in-config"), {}) == b"in-config"
    assert read_pin(options(pin_env="HSM_PIN"), {"HSM_PIN": "from-env"}) == b"from-env"
    assert read_pin(options(pin_file=str(pin_file)), {}) == b"from-file"
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_pin(options(pin_credential="hsm-pin"), env) == b"from-credential"


@pytest.mark.parametrize(
    ("values", "env", "problem"),
    [
        ({"pin_env": "HSM_PIN"}, {}, r"\$HSM_PIN is not set"),
        ({"pin_file": "/nonexistent/pin"}, {}, "pin_file /nonexistent/pin: cannot read"),
        ({"pin_credential": "hsm-pin"}, {}, r"\$CREDENTIALS_DIRECTORY is not set"),
    ],
)
def test_unreadable_pin_sources(values: dict[str, Any], env: dict[str, str], problem: str) -> None:
    with pytest.raises(PinSourceError, match=problem):
        read_pin(options(**values), env)
