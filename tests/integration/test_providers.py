"""Providers: registration by entry point, the memory provider's persistence and scenarios."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKM, CKO, CKR, CKU
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RW, ckr

OUTSIDE_PROVIDER = '''
"""A provider that lives outside KeyGrid, registered only by its entry point."""
from dataclasses import dataclass

from keygridd.providers.memory import MemoryOptions, MemoryStore
from keygridd.providers.base import Provider
from keygridd.core.store import TokenDescription


@dataclass(frozen=True)
class Options:
    model: str


class OutsideProvider(Provider):
    name = "outside"
    options_type = Options

    def open_store(self):
        store = MemoryStore(MemoryOptions(), self.slot_id)
        store.description = TokenDescription(manufacturer="Outside Inc.", model=self.options.model, serial="X1")
        return store

    def mechanisms(self):
        from keygridd.mechanisms import REGISTRY
        from keygridd.pkcs11 import CKM
        return {m: REGISTRY[m].info for m in (CKM.EC_KEY_PAIR_GEN, CKM.ECDSA)}
'''


def install_outside_provider(root: Path) -> dict[str, str]:
    (root / "outside_provider.py").write_text(OUTSIDE_PROVIDER)
    dist = root / "outside_provider-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-provider\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[keygrid.providers]\noutside = outside_provider:OutsideProvider\n")
    repo = Path(__file__).resolve().parents[2]
    return {"PYTHONPATH": f"{root}:{repo}"}


def test_provider_registered_by_entry_point(daemon_factory: Any, tmp_path: Path) -> None:
    env = install_outside_provider(tmp_path)
    config = textwrap.dedent(
        """
        server: {socket: "{socket}"}
        slots:
          - id: 5
            provider: outside
            options: {model: "Model 9"}
            token: {label: outside, so_pin: "so-pin-1", user_pin: "user-pin-1"}
        """
    )
    running = daemon_factory(config, name="outside", env=env)
    with Client(running.socket) as c:
        info = c.C_GetTokenInfo(5)
        assert (info["manufacturer_id"], info["model"], info["label"]) == ("Outside Inc.", "Model 9", "outside")
        assert sorted(c.C_GetMechanismList(5)) == sorted([CKM.EC_KEY_PAIR_GEN, CKM.ECDSA])
        s = c.C_OpenSession(5, RW)
        c.C_Login(s, CKU.USER, b"user-pin-1")
        with ckr(CKR.MECHANISM_INVALID):
            c.C_GenerateKey(s, Mechanism(CKM.AES_KEY_GEN), {CKA.VALUE_LEN: 16})
    running.stop()


def test_provider_options_are_validated_at_start(daemon_factory: Any, tmp_path: Path) -> None:
    env = install_outside_provider(tmp_path)
    config = 'server: {socket: "{socket}"}\nslots:\n  - {id: 5, provider: outside, options: {modl: x}}\n'
    running = daemon_factory(config, name="badopts", env=env, wait=False)
    assert running.process.wait(20) == 2
    assert "slots[0].options" in running.log() and "modl" in running.log()


def test_memory_tokens_persist_across_restarts(daemon_factory: Any, tmp_path: Path) -> None:
    config = f"""
server: {{socket: "{{socket}}"}}
slots:
  - id: 0
    provider: memory
    options: {{persist: "{tmp_path / "tokens.msgpack"}"}}
    token: {{label: kept, so_pin: "so-pin-1", user_pin: "user-pin-1"}}
"""
    first = daemon_factory(config, name="persist1")
    with Client(first.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, b"user-pin-1")
        c.C_GenerateKeyPair(
            s, Mechanism(CKM.EC_KEY_PAIR_GEN),
            {CKA.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"), CKA.TOKEN: True, CKA.LABEL: b"survivor"},
            {CKA.TOKEN: True, CKA.LABEL: b"survivor"},
        )  # fmt: skip
        c.C_SetPIN(s, b"user-pin-1", b"user-pin-2")
    assert first.stop() == 0
    assert (tmp_path / "tokens.msgpack").stat().st_mode & 0o077 == 0
    second = daemon_factory(config, name="persist2")
    with Client(second.socket) as c:
        s = c.C_OpenSession(0, RW)
        with ckr(CKR.PIN_INCORRECT):
            c.C_Login(s, CKU.USER, b"user-pin-1")
        c.C_Login(s, CKU.USER, b"user-pin-2")
        c.C_FindObjectsInit(s, {CKA.LABEL: b"survivor", CKA.CLASS: CKO.PRIVATE_KEY})
        (key,) = c.C_FindObjects(s, 10)
        c.C_FindObjectsFinal(s)
        c.C_SignInit(s, Mechanism(CKM.ECDSA_SHA256), key)
        assert len(c.C_Sign(s, b"still here")) == 64
    second.stop()


@pytest.fixture(scope="module")
def scenario_daemon(daemon_factory: Any) -> Any:
    config = """
server: {socket: "{socket}"}
slots:
  - id: 0
    provider: memory
    token: {label: flaky, so_pin: "so-pin-1", user_pin: "user-pin-1"}
    options:
      scenarios:
        - {operations: [C_GenerateRandom], error_rate: 1.0, error: CKR_DEVICE_MEMORY}
        - {operations: [C_Digest], latency_ms: 300}
        - {operations: [C_SeedRandom], error_rate: 0.5, error: CKR_FUNCTION_FAILED}
"""
    return daemon_factory(config, name="scenario")


def test_scenario_fixed_error(scenario_daemon: Any) -> None:
    with Client(scenario_daemon.socket) as c:
        s = c.C_OpenSession(0, RW)
        with ckr(CKR.DEVICE_MEMORY):
            c.C_GenerateRandom(s, 8)
        c.C_DigestInit(s, Mechanism(CKM.SHA256))  # other calls are untouched


def test_scenario_latency(scenario_daemon: Any) -> None:
    with Client(scenario_daemon.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_DigestInit(s, Mechanism(CKM.SHA256))
        start = time.monotonic()
        c.C_Digest(s, b"abc")
        assert time.monotonic() - start >= 0.3


def test_scenario_error_rate(scenario_daemon: Any) -> None:
    with Client(scenario_daemon.socket) as c:
        s = c.C_OpenSession(0, RW)
        codes = [c.call_raw("C_SeedRandom", s, b"x")[0] for _ in range(200)]
    failures = codes.count(CKR.FUNCTION_FAILED)
    assert codes.count(CKR.OK) + failures == 200
    assert 40 < failures < 160  # 0.5 of 200; P(outside) < 1e-18
