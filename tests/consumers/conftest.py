"""Fixtures for the real-consumer tests (see consumer_kit.py for the pieces).

``shim_path`` runs ``make -C keygrid_pkcs11_shim`` once per session and fails
(never skips) when the module does not build. ``consumer_daemon`` is one
keygridd per test module, from ``consumer_config()``: slot 0 a memory token
labelled ``consumers`` initialised by the config, slot 1 blank for
``--init-token``.

Consumers that need a process of their own (python-pkcs11; ctypes for fork,
threads and restart) run ``driver.py`` as a subprocess: a PKCS#11 module is
initialised once per process, and the shim tests load the same library into
the pytest process.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_kit import SHIM, SHIM_DIR, Consumers, consumer_config, consumer_environment


@pytest.fixture(scope="session")
def shim_path() -> Path:
    build = subprocess.run(["make", "-C", str(SHIM_DIR)], capture_output=True, text=True, timeout=300, check=False)
    if build.returncode != 0 or not SHIM.exists():
        pytest.fail(f"libkeygrid-pkcs11.so does not build:\n{build.stdout}\n{build.stderr}")
    return SHIM


@pytest.fixture(scope="module")
def consumer_daemon(daemon_factory: Callable[..., Any], shim_path: Path) -> Iterator[Consumers]:
    running = daemon_factory(consumer_config(), name="consumers")
    yield Consumers(running.socket, consumer_environment(running.socket), running)
    running.stop()
