"""The software token through a real keygridd: LMDB and filesystem stores, PINs, encryption at rest, export/import."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keygridd.cli import main as cli_main
from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKK, CKM, CKO, CKR, CKU, TokenFlag
from keygridd.pkcs11.params import Mechanism
from tests.conformance.conftest import RO, RW, ckr

SO_PIN = b"so-Quartz-7741"
USER_PIN = b"user-Walnut-2209"
AES_KEY = bytes.fromhex("c0ffee00deadbeef0123456789abcdeffedcba9876543210a5a5a5a55a5a5a5a")
P256 = bytes.fromhex("06082a8648ce3d030107")

FAST_KDF = "argon2id: {memory_cost: 4096, iterations: 1, lanes: 1}"


def config(slot_id: int, options: str, *, init: bool = True) -> str:
    token = f'token: {{label: soft, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}' if init else ""
    return f"""
server: {{socket: "{{socket}}", shutdown_grace_seconds: 5}}
slots:
  - id: {slot_id}
    provider: software
    {token}
    options: {{{options}}}
"""


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def assert_no_secrets(root: Path) -> None:
    data = every_byte(root)
    assert data, f"nothing stored under {root}"
    for secret in (AES_KEY, SO_PIN, USER_PIN):
        for form in (secret, secret.hex().encode(), secret.hex().upper().encode()):
            assert form not in data, f"{form!r} found at rest under {root}"


def find(c: Client, s: int, template: dict[int, Any]) -> list[int]:
    c.C_FindObjectsInit(s, template)
    try:
        return list(c.C_FindObjects(s, 100))
    finally:
        c.C_FindObjectsFinal(s)


def create_keys(c: Client, s: int) -> None:
    c.C_GenerateKeyPair(
        s, Mechanism(CKM.EC_KEY_PAIR_GEN),
        {CKA.EC_PARAMS: P256, CKA.TOKEN: True, CKA.LABEL: b"signer"},
        {CKA.TOKEN: True, CKA.LABEL: b"signer", CKA.SENSITIVE: True},
    )  # fmt: skip
    c.C_CreateObject(s, {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: AES_KEY, CKA.TOKEN: True,
                         CKA.LABEL: b"known-aes", CKA.ENCRYPT: True, CKA.DECRYPT: True})  # fmt: skip
    c.C_CreateObject(s, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: False, CKA.LABEL: b"notice",
                         CKA.VALUE: b"public data"})  # fmt: skip


def sign_and_verify(c: Client, s: int, message: bytes = b"payload") -> None:
    (private,) = find(c, s, {CKA.CLASS: CKO.PRIVATE_KEY, CKA.LABEL: b"signer"})
    (public,) = find(c, s, {CKA.CLASS: CKO.PUBLIC_KEY, CKA.LABEL: b"signer"})
    c.C_SignInit(s, Mechanism(CKM.ECDSA_SHA256), private)
    signature = c.C_Sign(s, message)
    c.C_VerifyInit(s, Mechanism(CKM.ECDSA_SHA256), public)
    c.C_Verify(s, message, signature)


def labels(c: Client, s: int) -> set[bytes]:
    return {c.C_GetAttributeValue(s, h, [CKA.LABEL])[0] for h in find(c, s, {})}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli_main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    yield run


def test_lmdb_token_survives_restart_and_is_encrypted_at_rest(daemon_factory: Any, tmp_path: Path) -> None:
    store = tmp_path / "lmdb"
    text = config(0, f'backend: lmdb, path: "{store}"')  # default Argon2id cost: the real login time
    first = daemon_factory(text, name="soft-lmdb1")
    with Client(first.socket) as c:
        info = c.C_GetTokenInfo(0)
        assert (info["label"], info["model"]) == ("soft", "software")
        assert info["flags"] & TokenFlag.TOKEN_INITIALIZED and info["flags"] & TokenFlag.USER_PIN_INITIALIZED
        s = c.C_OpenSession(0, RW)
        started = time.monotonic()
        c.C_Login(s, CKU.USER, USER_PIN)
        login_seconds = time.monotonic() - started
        create_keys(c, s)
        sign_and_verify(c, s)
        assert labels(c, s) == {b"signer", b"known-aes", b"notice"}
        c.C_Logout(s)
        # Logged out: public objects only.
        assert labels(c, s) == {b"signer", b"notice"}  # the public key and the data object
        assert not find(c, s, {CKA.CLASS: CKO.PRIVATE_KEY})
        # Nobody logged in: the master key is gone, so no token object can be sealed.
        with ckr(CKR.USER_NOT_LOGGED_IN):
            c.C_CreateObject(s, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: False, CKA.LABEL: b"late"})
    assert login_seconds < 1.0, f"C_Login took {login_seconds:.2f} s"
    assert first.stop() == 0
    assert_no_secrets(store)

    second = daemon_factory(text, name="soft-lmdb2")
    with Client(second.socket) as c, Client(second.socket) as other:
        s = c.C_OpenSession(0, RO)
        assert labels(c, s) == {b"signer", b"notice"}  # before any login
        c.C_Login(s, CKU.USER, USER_PIN)
        sign_and_verify(c, s, b"after restart")
        (aes,) = find(c, s, {CKA.LABEL: b"known-aes"})
        # A second application logs in and out: the first one still sees everything.
        t = other.C_OpenSession(0, RO)
        other.C_Login(t, CKU.USER, USER_PIN)
        other.C_Logout(t)
        assert labels(c, s) == {b"signer", b"known-aes", b"notice"}
        c.C_EncryptInit(s, Mechanism(CKM.AES_ECB), aes)
        assert len(c.C_Encrypt(s, b"\x00" * 16)) == 16
        # The last application logs out: private objects are gone from view.
        c.C_Logout(s)
        assert labels(c, s) == {b"signer", b"notice"}
        assert labels(other, t) == {b"signer", b"notice"}
        with ckr(CKR.OBJECT_HANDLE_INVALID):
            c.C_GetAttributeValue(s, aes, [CKA.LABEL])
    second.stop()
    assert_no_secrets(store)


def test_filesystem_token_init_pin_lockout_and_so_reset(daemon_factory: Any, tmp_path: Path) -> None:
    store = tmp_path / "fs"
    options = f'backend: filesystem, path: "{store}", max_pin_failures: 3, min_pin_len: 6, {FAST_KDF}'
    running = daemon_factory(config(2, options, init=False), name="soft-fs")
    with Client(running.socket) as c:
        assert not c.C_GetTokenInfo(2)["flags"] & TokenFlag.TOKEN_INITIALIZED
        with ckr(CKR.PIN_LEN_RANGE):
            c.C_InitToken(2, b"12345", b"fs")
        c.C_InitToken(2, SO_PIN, b"fs")
        s = c.C_OpenSession(2, RW)
        c.C_Login(s, CKU.SO, SO_PIN)
        c.C_InitPIN(s, USER_PIN)
        c.C_Logout(s)
        c.C_Login(s, CKU.USER, USER_PIN)
        create_keys(c, s)
        c.C_Logout(s)

        def flags() -> int:
            return int(c.C_GetTokenInfo(2)["flags"]) & (
                TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_FINAL_TRY | TokenFlag.USER_PIN_LOCKED
            )

        assert flags() == 0
        with ckr(CKR.PIN_INCORRECT):
            c.C_Login(s, CKU.USER, b"wrong-pin-1")
        assert flags() == TokenFlag.USER_PIN_COUNT_LOW
        with ckr(CKR.PIN_INCORRECT):
            c.C_Login(s, CKU.USER, b"wrong-pin-2")
        assert flags() == TokenFlag.USER_PIN_COUNT_LOW | TokenFlag.USER_PIN_FINAL_TRY
        with ckr(CKR.PIN_INCORRECT):
            c.C_Login(s, CKU.USER, b"wrong-pin-3")
        assert flags() == TokenFlag.USER_PIN_LOCKED
        with ckr(CKR.PIN_LOCKED):
            c.C_Login(s, CKU.USER, USER_PIN)
        # The SO resets the user PIN.
        c.C_Login(s, CKU.SO, SO_PIN)
        c.C_InitPIN(s, b"fresh-user-pin")
        c.C_Logout(s)
        assert flags() == 0
        c.C_Login(s, CKU.USER, b"fresh-user-pin")
        sign_and_verify(c, s)
        c.C_SetPIN(s, b"fresh-user-pin", USER_PIN)
        c.C_Logout(s)
        c.C_Login(s, CKU.USER, USER_PIN)
        sign_and_verify(c, s)
    running.stop()
    assert_no_secrets(store)


def test_unattended_token_with_systemd_credential(daemon_factory: Any, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "kg-unlock").write_bytes(bytes(range(32)))
    options = f'backend: lmdb, path: "{tmp_path / "lmdb"}", unlock_credential: kg-unlock, {FAST_KDF}'
    text = config(0, options)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    first = daemon_factory(text, name="soft-unattended1", env=env)
    public_aes = {CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: CKK.AES, CKA.VALUE: AES_KEY, CKA.TOKEN: True,
                  CKA.PRIVATE: False, CKA.LABEL: b"public-aes", CKA.ENCRYPT: True}  # fmt: skip
    with Client(first.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        c.C_CreateObject(s, public_aes)
    first.stop()
    assert_no_secrets(tmp_path / "lmdb")
    # Unlocked from start: a public object whose secret is sealed is usable without any login.
    second = daemon_factory(text, name="soft-unattended2", env=env)
    with Client(second.socket) as c:
        s = c.C_OpenSession(0, RO)
        (aes,) = find(c, s, {CKA.LABEL: b"public-aes"})
        c.C_EncryptInit(s, Mechanism(CKM.AES_ECB), aes)
        assert len(c.C_Encrypt(s, b"\x01" * 16)) == 16
    second.stop()
    # Without the credential the daemon refuses to start, naming the problem.
    third = daemon_factory(text, name="soft-unattended3", wait=False)
    assert third.process.wait(20) != 0
    assert "CREDENTIALS_DIRECTORY" in third.log()


def test_export_from_lmdb_import_into_filesystem(daemon_factory: Any, tmp_path: Path, cli: Any) -> None:
    source_text = config(0, f'backend: lmdb, path: "{tmp_path / "lmdb"}", {FAST_KDF}')
    source = daemon_factory(source_text, name="soft-export")
    with Client(source.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        create_keys(c, s)
    source.stop()

    export = tmp_path / "token.export"
    rc, out, err = cli("token", "export", "--config", source.config_path, "--slot", "0", str(export))
    assert rc == 0, err
    assert "4 objects" in out
    assert export.stat().st_mode & 0o077 == 0
    data = export.read_bytes()
    for secret in (AES_KEY, SO_PIN, USER_PIN):
        assert secret not in data and secret.hex().encode() not in data

    target_options = f'backend: filesystem, path: "{tmp_path / "fs"}", namespace: moved, {FAST_KDF}'
    target_config = tmp_path / "target.yaml"
    target_config.write_text(config(9, target_options, init=False).replace("{socket}", str(tmp_path / "t.sock")))
    rc, out, err = cli("token", "import", "--config", str(target_config), "--slot", "9", str(export))
    assert rc == 0, err
    rc, out, err = cli("token", "import", "--config", str(target_config), "--slot", "9", str(export))
    assert rc == 1 and "already holds a token" in err and "--force" in err
    rc, out, err = cli("token", "import", "--force", "--config", str(target_config), "--slot", "9", str(export))
    assert rc == 0, err
    rc, out, err = cli("token", "export", "--config", source.config_path, "--slot", "4", str(export))
    assert rc == 2 and "no slot 4" in err

    target = daemon_factory(config(9, target_options, init=False), name="soft-import")
    with Client(target.socket) as c:
        assert c.C_GetTokenInfo(9)["label"] == "soft"
        s = c.C_OpenSession(9, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        sign_and_verify(c, s, b"moved")
        assert labels(c, s) == {b"signer", b"known-aes", b"notice"}
    target.stop()
    assert_no_secrets(tmp_path / "fs")


def test_export_from_lmdb_import_into_postgresql(daemon_factory: Any, tmp_path: Path, cli: Any, pg_dsn: str) -> None:
    source_text = config(0, f'backend: lmdb, path: "{tmp_path / "lmdb"}", {FAST_KDF}')
    source = daemon_factory(source_text, name="soft-pg-source")
    with Client(source.socket) as c:
        s = c.C_OpenSession(0, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        create_keys(c, s)
    source.stop()
    export = tmp_path / "token.export"
    rc, _, err = cli("token", "export", "--config", source.config_path, "--slot", "0", str(export))
    assert rc == 0, err

    target_text = config(1, f'backend: postgresql, dsn: "{pg_dsn}", {FAST_KDF}', init=False)
    target_config = tmp_path / "pg.yaml"
    target_config.write_text(target_text.replace("{socket}", str(tmp_path / "pg.sock")))
    rc, _, err = cli("token", "import", "--config", str(target_config), "--slot", "1", str(export))
    assert rc == 0, err
    target = daemon_factory(target_text, name="soft-pg-target")
    with Client(target.socket) as c:
        s = c.C_OpenSession(1, RW)
        c.C_Login(s, CKU.USER, USER_PIN)
        sign_and_verify(c, s, b"in postgresql")
    target.stop()
