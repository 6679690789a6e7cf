"""SoftHSM2 tokens for tests: a token directory of their own, made with ``softhsm2-util``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import SO_PIN, USER_PIN

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_tokens(
    directory: Path, labels: Iterable[str], so_pin: bytes = SO_PIN, pin: bytes = USER_PIN
) -> dict[str, str]:
    """Initialise one token per label in ``directory``; the environment that points SoftHSM2 at them."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in labels:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", so_pin.decode(), "--pin", pin.decode()],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
    return {"SOFTHSM2_CONF": str(conf)}


FAULT_SOURCE = Path(__file__).resolve().parent / "faultmodule" / "faultmod.c"


def build_fault_module(directory: Path) -> str:
    """tests/faultmodule/faultmod.c built with the project's C warnings: SoftHSM2 that can hang or abort."""
    out = directory / "libfaultmod.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-I/usr/include/p11-kit-1",
         "-o", str(out), str(FAULT_SOURCE), "-ldl", "-lpthread"],
        check=True,
    )  # fmt: skip
    return str(out)


def worker_pids(daemon_pid: int) -> list[int]:
    """The pkcs11 provider's worker processes of a keygridd."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"keygridd.providers.pkcs11.worker" in cmdline:
            pids.append(int(entry.name))
    return pids
