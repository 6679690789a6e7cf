"""OpenSC's pkcs11-tool through libkeygrid-pkcs11.so: slots, mechanisms, token and PIN
initialisation, key pair generation, sign/verify and its own ``--test``.

pkcs11-tool 0.23 ignores ``--label`` when it picks the key for ``--sign``
(it takes the first private key), so keys are chosen by ``--id``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from consumer_kit import SO_PIN, TOKEN_LABEL, Consumers

pytestmark = pytest.mark.shim

DATA = b"KeyGrid consumer test data\n"


@pytest.fixture(scope="module")
def signing_keys(consumer_daemon: Consumers) -> Consumers:
    """Token key pairs with ids 21 (P-256), 22 (P-384), 23 (RSA-2048)."""
    consumer_daemon.keypair("EC:prime256v1", "sign-p256", "21")
    consumer_daemon.keypair("EC:secp384r1", "sign-p384", "22")
    consumer_daemon.keypair("RSA:2048", "sign-rsa", "23")
    return consumer_daemon


def test_list_slots(consumer_daemon: Consumers) -> None:
    out = consumer_daemon.pkcs11_tool("--list-slots", login=False).stdout
    assert "Slot 0 (0x0): consumers slot" in out
    assert f"token label        : {TOKEN_LABEL}" in out
    assert "token initialized" in out and "PIN initialized" in out
    assert "Slot 1 (0x1): blank slot" in out


def test_list_mechanisms(consumer_daemon: Consumers) -> None:
    out = consumer_daemon.pkcs11_tool("--list-mechanisms", login=False).stdout
    lines = {line.split(",")[0].strip(): line for line in out.splitlines()}
    for name in ("ECDSA", "ECDSA-SHA256", "SHA256-RSA-PKCS", "RSA-PKCS-PSS", "SHA256-RSA-PKCS-PSS", "AES-GCM"):
        assert name in lines, f"{name} missing from:\n{out}"
    assert "sign" in lines["ECDSA"] and "verify" in lines["ECDSA"]
    assert "generate_key_pair" in lines["RSA-PKCS-KEY-PAIR-GEN"]
    assert "generate_key_pair" in lines["ECDSA-KEY-PAIR-GEN"]


def test_init_token_and_pin(consumer_daemon: Consumers, tmp_path: Path) -> None:
    run = consumer_daemon.pkcs11_tool
    out = run("--slot", "1", "--init-token", "--so-pin", SO_PIN, "--label", "fresh", login=False)
    assert "Token successfully initialized" in out.stdout
    out = run("--slot", "1", "--login", "--login-type", "so", "--so-pin", SO_PIN, "--init-pin", "--pin", "4444",
              login=False)  # fmt: skip
    assert "User PIN successfully initialized" in out.stdout
    assert "token label        : fresh" in run("--list-slots", login=False).stdout
    # The new user PIN logs in (random bytes drawn after C_Login); a wrong one is refused.
    random = tmp_path / "random"
    run("--slot", "1", "--login", "--pin", "4444", "--generate-random", "16", "-o", str(random), login=False)
    assert random.stat().st_size == 16
    wrong = run("--slot", "1", "--login", "--pin", "0000", "--list-objects", login=False, check=False)
    assert wrong.returncode != 0 and "CKR_PIN_INCORRECT" in wrong.stderr


@pytest.mark.parametrize(
    ("key_type", "key_id", "expect"),
    [("EC:prime256v1", "11", "EC_POINT 256 bits"), ("EC:secp384r1", "12", "EC_POINT 384 bits"),
     ("RSA:2048", "13", "RSA 2048 bits")],
)  # fmt: skip
def test_keypairgen(consumer_daemon: Consumers, key_type: str, key_id: str, expect: str) -> None:
    label = f"gen-{key_id}"
    out = consumer_daemon.pkcs11_tool("--keypairgen", "--key-type", key_type, "--label", label, "--id", key_id)
    assert "Key pair generated" in out.stdout
    assert expect in out.stdout
    assert "sensitive, always sensitive, never extractable, local" in out.stdout
    listed = consumer_daemon.pkcs11_tool("--list-objects", "--type", "privkey").stdout
    assert f"label:      {label}" in listed


@pytest.mark.parametrize(
    ("key_id", "mechanism", "extra", "prehash"),
    [
        ("21", "ECDSA-SHA256", (), False),
        ("22", "ECDSA-SHA256", (), False),
        ("23", "SHA256-RSA-PKCS", (), False),
        ("23", "SHA256-RSA-PKCS-PSS", (), False),
        ("23", "RSA-PKCS-PSS", ("--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256"), True),
    ],
)
def test_sign_verify(
    signing_keys: Consumers, tmp_path: Path, key_id: str, mechanism: str, extra: tuple[str, ...], prehash: bool
) -> None:
    def message(text: bytes) -> bytes:
        return hashlib.sha256(text).digest() if prehash else text

    data, sig = tmp_path / "data", tmp_path / "sig"
    data.write_bytes(message(DATA))
    common = ("-m", mechanism, *extra, "--id", key_id, "-i", str(data))
    signed = signing_keys.pkcs11_tool("--sign", *common, "-o", str(sig))
    assert f"Using signature algorithm {mechanism}" in signed.stderr
    assert sig.stat().st_size > 0
    assert "Signature is valid" in signing_keys.pkcs11_tool("--verify", *common, "--signature-file", str(sig)).stdout
    data.write_bytes(message(b"another message"))
    bad = signing_keys.pkcs11_tool("--verify", *common, "--signature-file", str(sig), check=False)
    assert "Invalid signature" in bad.stdout + bad.stderr


def test_self_test(signing_keys: Consumers) -> None:
    out = signing_keys.pkcs11_tool("--test", timeout=120)
    assert "C_SeedRandom() and C_GenerateRandom():\n  seems to be OK" in out.stdout
    assert "RSA-X-509: OK" in out.stdout
    assert out.stdout.rstrip().endswith("No errors"), out.stdout + out.stderr
