"""bench/bench_rpc.py runs end to end and prints its one table (a short run)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_rpc.py"
OPS = ("ping", "ecdsa-p256-sign", "ecdsa-p256-pipelined", "rsa2048-sha256-sign", "aes256-gcm-encrypt-1k")

pytestmark = pytest.mark.slow


def daemon_available() -> bool:
    try:
        return importlib.util.find_spec("keygridd.daemon") is not None
    except ImportError:
        return False


def test_short_run_prints_every_cell() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "0.1", "--conns", "1", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in OPS]
    assert sorted((row[0], row[1]) for row in rows) == sorted((op, n) for op in OPS for n in ("1", "2"))
    for row in rows:
        echo, crypto = row[3], row[4]
        assert echo != "-"
        assert (crypto == "-") == (row[0] == "ping")
    assert "keygridd cell failed" not in result.stdout
    if daemon_available():
        assert "keygridd part skipped" not in result.stdout, result.stdout
        assert all(row[2] != "-" for row in rows)
    else:
        assert "keygridd part skipped: keygridd.daemon cannot be imported" in result.stdout
