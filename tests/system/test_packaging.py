"""Packaging files: sysusers.d and tmpfiles.d entries applied to a scratch root, and the wheel's contents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import compiled_modules

REPO = Path(__file__).resolve().parents[2]
SYSUSERS = REPO / "packaging" / "keygrid.sysusers"
TMPFILES = REPO / "packaging" / "keygrid.tmpfiles"

pytestmark = pytest.mark.system

needs_systemd_tools = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (`make deps` installs systemd)",
)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


def account(root: Path, database: str, name: str) -> list[str]:
    for line in (root / "etc" / database).read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} not in {database}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    return tmp_path


@needs_systemd_tools
def test_sysusers_creates_a_system_account_without_login(root: Path) -> None:
    result = run("systemd-sysusers", f"--root={root}", SYSUSERS)
    assert result.returncode == 0, result.stderr
    _, _, uid, gid, _, home, shell = account(root, "passwd", "keygrid")
    assert int(uid) < 1000
    assert account(root, "group", "keygrid")[2] == gid
    assert (home, shell) == ("/var/lib/keygrid", "/usr/sbin/nologin")


@needs_systemd_tools
@pytest.mark.skipif(os.geteuid() != 0, reason="chowning to the keygrid account needs root")
def test_tmpfiles_makes_the_directories_with_their_owners(root: Path) -> None:
    assert run("systemd-sysusers", f"--root={root}", SYSUSERS).returncode == 0
    result = run("systemd-tmpfiles", f"--root={root}", "--create", TMPFILES)
    assert result.returncode == 0, result.stderr
    uid, gid = (int(x) for x in account(root, "passwd", "keygrid")[2:4])
    expected = {
        "run/keygrid": (0o755, 0, 0),  # the same mode keygridd.socket's DirectoryMode= gives it
        "etc/keygrid": (0o750, 0, gid),
        "var/lib/keygrid": (0o700, uid, gid),
    }
    for path, (mode, owner, group) in expected.items():
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, owner, group), path


def test_wheel_ships_the_package_its_commands_and_entry_points(tmp_path: Path) -> None:
    result = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
        "--wheel-dir", tmp_path, REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("keygrid-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "keygridd/__init__.py" in names
    assert "keygridd/py.typed" in names
    libraries = {
        "keygridd/lib/libkeygrid-pkcs11.so",
        "keygridd/lib/libkeygrid-worker.so",
        "keygridd/lib/libkeygrid-signer.so",
    }
    assert libraries <= set(names)  # the signer: make test installs libssl-dev
    # The request path compiled by mypyc (make test installs python3-dev), its sources beside it.
    extensions = {n.split(".")[0].replace("/", ".") for n in names if n.endswith(".so") and "/lib/" not in n}
    assert set(compiled_modules()) <= extensions, extensions
    assert any(n.startswith("keygridd__mypyc.cpython-") for n in names)
    assert "keygridd/server/connection.py" in names
    assert not [n for n in names if n.startswith(("tests/", "tools/", "bench/"))]
    assert "keygridd = keygridd.daemon:main" in entry_points
    assert "keygrid = keygridd.cli:main" in entry_points
    assert "[keygrid.providers]\nmemory = keygridd.providers.memory:MemoryProvider" in entry_points
