"""tools/devsetup.py: the configuration `make run` starts the development daemon with."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import yaml

from keygridd.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEVSETUP = REPO / "tools" / "devsetup.py"


def devsetup(var_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(DEVSETUP), str(var_dir)], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def devsetup_config(tmp_path: Path) -> Path:
    devsetup(tmp_path / "var")
    return tmp_path / "var" / "keygrid.yaml"


def test_writes_a_private_config_with_one_software_slot(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    devsetup(var_dir)
    config_path = var_dir / "keygrid.yaml"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(var_dir.stat().st_mode) == 0o700
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    assert config["server"] == {"socket": str(var_dir / "run" / "keygrid.sock")}
    (slot,) = config["slots"]
    assert slot["provider"] == "software"
    assert slot["options"] == {"backend": "lmdb", "path": str(var_dir / "tokens.lmdb")}
    token = slot["token"]
    assert token["label"] == "dev"
    assert isinstance(token["so_pin"], str) and len(token["so_pin"]) == 12 and token["so_pin"].isdigit()
    assert isinstance(token["user_pin"], str) and len(token["user_pin"]) == 8 and token["user_pin"].isdigit()


def test_config_is_valid_for_keygridd(tmp_path: Path) -> None:
    settings = load_config(devsetup_config(tmp_path))
    assert settings.server.socket == str(tmp_path / "var" / "run" / "keygrid.sock")
    assert [(slot.id, slot.provider, slot.token and slot.token.label) for slot in settings.slots] == [
        (0, "software", "dev")
    ]


def test_keeps_an_existing_config_and_prints_how_to_use_it(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    devsetup(var_dir)
    before = (var_dir / "keygrid.yaml").read_text(encoding="utf-8")
    out = devsetup(var_dir)
    assert (var_dir / "keygrid.yaml").read_text(encoding="utf-8") == before
    token = yaml.safe_load(before)["slots"][0]["token"]
    assert f"export KEYGRID_SOCKET={var_dir / 'run' / 'keygrid.sock'}" in out
    assert f"export KEYGRID_PIN={token['user_pin']}" in out
    assert token["so_pin"] in out
    assert "keygrid keys generate --type ec:P-256 --label demo" in out
    assert "keygrid sign 'pkcs11:token=dev;object=demo' --in" in out
    assert "keygrid verify 'pkcs11:token=dev;object=demo' --signature" in out


def test_pins_differ_between_checkouts(tmp_path: Path) -> None:
    pins = set()
    for name in ("a", "b"):
        devsetup(tmp_path / name)
        config = yaml.safe_load((tmp_path / name / "keygrid.yaml").read_text(encoding="utf-8"))
        pins.add(config["slots"][0]["token"]["so_pin"])
    assert len(pins) == 2
