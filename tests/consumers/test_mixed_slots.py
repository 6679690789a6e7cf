"""One keygridd serving three kinds of slot at once, seen by pkcs11-tool through the shim.

Slot 0 is KeyGrid's software token (LMDB), slot 1 a SoftHSM2 token behind the
``pkcs11`` provider, slot 2 the memory mock. pkcs11-tool lists all three and
makes, signs with and verifies a P-256 key in each (CKM_ECDSA over a
SHA-256 digest: SoftHSM2 2.6 has no CKM_ECDSA_SHA256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_kit import SHIM, SO_PIN, USER_PIN, Consumers, consumer_environment

from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens

pytestmark = [pytest.mark.shim, pytest.mark.softhsm]


def mixed_config(softhsm_conf: str) -> str:
    pins = f'so_pin: "{SO_PIN}", user_pin: "{USER_PIN}"'
    return f"""
server:
  socket: {{socket}}
  shutdown_grace_seconds: 2
slots:
  - id: 0
    description: software slot
    provider: software
    token: {{label: soft, {pins}}}
    options: {{backend: lmdb, path: "{{dir}}/store", kdf: scrypt, scrypt: {{log2_n: 12}}}}
  - id: 1
    description: softhsm slot
    provider: pkcs11
    options: {{module: {SOFTHSM_MODULE}, token_label: hsm, environment: {{SOFTHSM2_CONF: "{softhsm_conf}"}}}}
  - id: 2
    description: memory slot
    provider: memory
    token: {{label: mock, {pins}}}
"""


@pytest.fixture(scope="module")
def mixed(
    daemon_factory: Callable[..., Any], shim_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Consumers]:
    env = softhsm_tokens(tmp_path_factory.mktemp("mixed-softhsm"), ["hsm"], SO_PIN.encode(), USER_PIN.encode())
    running = daemon_factory(mixed_config(env["SOFTHSM2_CONF"]), name="mixed")
    yield Consumers(running.socket, consumer_environment(running.socket), running)
    running.stop()


def test_pkcs11_tool_lists_all_three_slots(mixed: Consumers) -> None:
    out = mixed.pkcs11_tool("--list-slots", login=False).stdout
    for slot, description, label in (
        (0, "software slot", "soft"),
        (1, "softhsm slot", "hsm"),
        (2, "memory slot", "mock"),
    ):
        assert f"Slot {slot} ({slot:#x}): {description}" in out, out
        assert f"token label        : {label}" in out, out
    assert "SoftHSM" in out  # the SoftHSM2 token's own manufacturer and model come through


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_pkcs11_tool_signs_in_each_slot(mixed: Consumers, slot: int, tmp_path: Path) -> None:
    def tool(*args: str) -> str:
        argv = ["pkcs11-tool", "--module", str(SHIM), "--slot", str(slot), "--login", "--pin", USER_PIN, *args]
        return mixed.run(argv, timeout=60).stdout

    key_id = f"3{slot}"
    out = tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", f"mixed-{slot}", "--id", key_id)
    assert "Key pair generated" in out
    data, signature = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(hashlib.sha256(b"signed in slot %d" % slot).digest())  # CKM_ECDSA signs a hash
    tool("--sign", "--id", key_id, "--mechanism", "ECDSA", "-i", str(data), "-o", str(signature))
    assert signature.stat().st_size == 64
    out = tool("--verify", "--id", key_id, "--mechanism", "ECDSA", "-i", str(data),
               "--signature-file", str(signature))  # fmt: skip
    assert "Signature is valid" in out
