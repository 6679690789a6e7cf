"""Fixtures for the C shim tests: the built module and real keygridd daemons.

``shim_lib`` builds ``libkeygrid-pkcs11.so`` with its Makefile (or takes
``KEYGRID_SHIM_LIB``, e.g. the ASan build from ``make -C keygrid_pkcs11_shim
asan``). ``daemon`` starts a keygridd (``daemon_process.Daemon``) and points
the shim at it with ``KEYGRID_SOCKET``; ``absent_daemon`` only configures one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import Daemon
from fakedaemon import Fake

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = ROOT / "keygrid_pkcs11_shim"


def _build() -> Path:
    subprocess.run(["make", "-s", "-C", str(SHIM_DIR)], check=True, capture_output=True)
    return SHIM_DIR / "build" / "libkeygrid-pkcs11.so"


@pytest.fixture(scope="session")
def shim_lib() -> Path:
    override = os.environ.get("KEYGRID_SHIM_LIB")
    return Path(override) if override else _build()


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    monkeypatch.setenv("KEYGRID_SOCKET", str(d.socket))
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(tmp_path / "absent.conf"))
    d.start()
    yield d
    d.stop()


@pytest.fixture
def absent_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon configured but not started."""
    d = Daemon(tmp_path)
    monkeypatch.setenv("KEYGRID_SOCKET", str(d.socket))
    monkeypatch.setenv("KEYGRID_PKCS11_CONF", str(tmp_path / "absent.conf"))
    yield d
    d.stop()


@pytest.fixture
def fake(tmp_path: Path, shim_lib: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    monkeypatch.delenv("KEYGRID_SOCKET", raising=False)
    f = Fake(tmp_path, shim_lib, monkeypatch)
    yield f
    f.close()
