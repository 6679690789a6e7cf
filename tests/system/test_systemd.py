"""The systemd units: they verify cleanly, keep their hardening, and keep their security score.

``systemd-analyze verify`` only warns (exit 0) on unknown keys and bad values,
so any output fails. It also requires ``ExecStart=`` to name an existing file:
the tests check a copy of the units whose ``ExecStart=`` runs ``/usr/bin/true``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
UNITS = ("keygridd.service", "keygridd.socket")
DAEMON = "/usr/bin/keygridd"

# `systemd-analyze security` exposure x 10 (0.4 "SAFE" with systemd 252).
# Lower it when the hardening improves; never raise it to make a change pass.
SECURITY_THRESHOLD = 4

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (`make deps` installs it)"
    ),
]


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; keys may repeat."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in parse_unit(path) if s == section and k == key]


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    for name in UNITS:
        text = (UNIT_DIR / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace(f"ExecStart={DAEMON}", "ExecStart=/usr/bin/true"), encoding="utf-8")
    return tmp_path


def test_units_verify_without_any_output(unit_copies: Path) -> None:
    result = analyze("verify", "--man=no", *(f"./{name}" for name in UNITS), cwd=unit_copies)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_reports_an_unknown_key(unit_copies: Path) -> None:
    """The check above would notice a mistake: systemd-analyze prints one, even if it exits 0."""
    service = unit_copies / "keygridd.service"
    service.write_text(service.read_text(encoding="utf-8") + "\n[Service]\nProtectKernalTunables=yes\n")
    result = analyze("verify", "--man=no", "./keygridd.service", "./keygridd.socket", cwd=unit_copies)
    assert "ProtectKernalTunables" in result.stdout + result.stderr


def test_service_security_exposure_within_threshold(unit_copies: Path) -> None:
    result = analyze(
        "security", "--offline=true", f"--threshold={SECURITY_THRESHOLD}", "./keygridd.service", cwd=unit_copies
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("ExecStart", f"{DAEMON} --config /etc/keygrid/keygrid.yaml"),
        ("User", "keygrid"),
        ("Group", "keygrid"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateNetwork", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
        ("StateDirectory", "keygrid"),
        ("LimitCORE", "0"),
        ("UMask", "0077"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "15"),
    ],
)
def test_service_sets(key: str, value: str) -> None:
    assert value in values(UNIT_DIR / "keygridd.service", "Service", key)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("RuntimeDirectory", "it deletes /run/keygrid, the socket's directory, when the service stops"),
        ("PrivateUsers", "peer uids would all read as nobody, and SO_PEERCRED decides what a client sees"),
    ],
)
def test_service_does_not_set(key: str, reason: str) -> None:
    assert values(UNIT_DIR / "keygridd.service", "Service", key) == [], reason


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ListenStream", "/run/keygrid/keygrid.sock"),
        ("SocketMode", "0660"),
        ("SocketGroup", "keygrid"),
        ("DirectoryMode", "0755"),
    ],
)
def test_socket_sets(key: str, value: str) -> None:
    assert values(UNIT_DIR / "keygridd.socket", "Socket", key) == [value]


def test_service_is_bound_to_its_socket() -> None:
    service = UNIT_DIR / "keygridd.service"
    assert values(service, "Unit", "Requires") == ["keygridd.socket"]
    assert values(service, "Unit", "After") == ["keygridd.socket"]
