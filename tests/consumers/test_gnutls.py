"""GnuTLS's p11tool through libkeygrid-pkcs11.so, directly (``--provider``) and as a p11-kit
registered module (a ``keygrid.module`` file in a temporary ``~/.config/pkcs11/modules``).

p11-kit reads user module files only for non-root users, so as root the
p11-kit route runs its commands as ``nobody`` (setpriv), against a daemon of
its own whose socket (mode 0666) lives in a world-readable temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from consumer_kit import (
    SHIM,
    TOKEN_LABEL,
    USER_PIN,
    Consumers,
    consumer_config,
    consumer_environment,
    run_command,
    start_daemon_at,
)

pytestmark = pytest.mark.shim

TOKEN_URI = f"pkcs11:token={TOKEN_LABEL}"


@pytest.fixture(scope="module")
def gnutls_keys(consumer_daemon: Consumers) -> Consumers:
    consumer_daemon.keypair("EC:prime256v1", "tls-p256", "31")
    consumer_daemon.keypair("RSA:2048", "tls-rsa", "32")
    consumer_daemon.env = {**consumer_daemon.env, "GNUTLS_PIN": USER_PIN}
    return consumer_daemon


def p11tool(consumers: Consumers, *args: str) -> str:
    return consumers.run(["p11tool", "--provider", str(SHIM), *args], timeout=60).stdout


def test_list_tokens(consumer_daemon: Consumers) -> None:
    out = p11tool(consumer_daemon, "--list-tokens")
    assert f"Label: {TOKEN_LABEL}" in out
    assert f"URL: pkcs11:model=memory;manufacturer=KeyGrid;serial=kg-mem-0;token={TOKEN_LABEL}" in out
    assert "Flags: RNG, Requires login" in out


def test_list_all_privkeys(gnutls_keys: Consumers) -> None:
    out = p11tool(gnutls_keys, "--list-all-privkeys", "--login", TOKEN_URI)
    assert "Type: Private key (EC/ECDSA-SECP256R1)" in out
    assert "Type: Private key (RSA-2048)" in out
    assert f"token={TOKEN_LABEL};id=%31;object=tls-p256;type=private" in out
    assert "CKA_SENSITIVE" in out


@pytest.mark.parametrize(("label", "algorithm"), [("tls-p256", "ECDSA-SHA256"), ("tls-rsa", "RSA-SHA256")])
def test_test_sign(gnutls_keys: Consumers, label: str, algorithm: str) -> None:
    out = gnutls_keys.run(
        ["p11tool", "--provider", str(SHIM), "--test-sign", "--login", f"{TOKEN_URI};object={label};type=private"],
        timeout=60,
    )
    text = out.stdout + out.stderr
    assert f"Signing using {algorithm}... ok" in text
    assert "Verifying against public key in the token... ok" in text


def test_p11_kit_module_file(daemon_factory: Callable[..., Any], shim_path: Path) -> None:
    # Everything this test's processes touch lives in one world-readable temporary folder.
    with tempfile.TemporaryDirectory(prefix="kg-p11kit-") as folder:
        root = Path(folder)
        root.chmod(0o755)
        sock = root / "kg.sock"
        running = start_daemon_at(daemon_factory, str(sock), consumer_config(str(sock), mode="0666"), "p11kit")
        try:
            home = root / "home"
            modules = home / ".config" / "pkcs11" / "modules"
            modules.mkdir(parents=True)
            (modules / "keygrid.module").write_text(f"module: {SHIM}\n")
            for path in [home, *home.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            env = {**consumer_environment(str(sock)), "HOME": str(home)}
            as_user: list[str] = []
            if os.geteuid() == 0:  # p11-kit ignores user module files for root
                as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            listed = run_command([*as_user, "p11-kit", "list-modules"], env, timeout=60).stdout
            assert f"keygrid: {SHIM}" in listed
            ours = listed.split(f"keygrid: {SHIM}", 1)[1]
            assert "library-manufacturer: KeyGrid\n" in ours
            assert f"    token: {TOKEN_LABEL}\n" in ours
            # p11tool without --provider loads the modules p11-kit registers.
            tokens = run_command([*as_user, "p11tool", "--list-tokens"], env, timeout=60).stdout
            assert f"Label: {TOKEN_LABEL}" in tokens
        finally:
            running.stop()
