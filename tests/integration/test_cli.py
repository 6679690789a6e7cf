"""The keygrid CLI against a real keygridd (the ``daemon`` fixture: slot 0 initialised with a memory token)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keygridd.cli import main


@pytest.fixture
def cli(daemon: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> object:
    monkeypatch.setenv("KEYGRID_SOCKET", daemon.socket)  # type: ignore[attr-defined]
    monkeypatch.setenv("KEYGRID_PIN", daemon.user_pin.decode())  # type: ignore[attr-defined]
    capsys.readouterr()

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def label(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_status_and_slots(cli) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = cli("status")
    assert rc == 0, err
    assert "keygridd" in out and "memory" in out
    rc, out, err = cli("slots")
    assert rc == 0, err
    assert "SLOT" in out and "initialised" in out


def test_status_json(cli) -> None:  # type: ignore[no-untyped-def]
    import json

    rc, out, _ = cli("--json", "status")
    assert rc == 0
    doc = json.loads(out)
    assert "uptime" in doc and doc["slots"]


@pytest.mark.parametrize(
    ("key_type", "public_type"), [("ec:P-256", ec.EllipticCurvePublicKey), ("rsa:2048", rsa.RSAPublicKey)]
)
def test_generate_list_public_sign_verify(cli, tmp_path: Path, key_type: str, public_type: type) -> None:  # type: ignore[no-untyped-def]
    name = label("cli")
    rc, out, err = cli("keys", "generate", "--type", key_type, "--label", name)
    assert rc == 0, err
    assert f"object={name};type=private" in out

    rc, out, err = cli("keys", "list", f"pkcs11:object={name}")
    assert rc == 0, err
    assert "private" in out and "public" in out and key_type in out

    pem = tmp_path / "pub.pem"
    rc, _, err = cli("keys", "public", f"pkcs11:object={name}", "--out", str(pem))
    assert rc == 0, err
    assert isinstance(serialization.load_pem_public_key(pem.read_bytes()), public_type)

    data = tmp_path / "data.txt"
    data.write_bytes(b"sign me\n" * 100)
    sig = tmp_path / "data.sig"
    rc, _, err = cli("sign", f"pkcs11:object={name}", "--in", str(data), "--out", str(sig))
    assert rc == 0, err
    assert sig.stat().st_size > 0

    rc, out, err = cli("verify", f"pkcs11:object={name}", "--signature", str(sig), "--in", str(data))
    assert (rc, out.strip()) == (0, "Signature OK"), err

    data.write_bytes(b"sign me\n" * 99 + b"sign mE\n")
    rc, out, _ = cli("verify", f"pkcs11:object={name}", "--signature", str(sig), "--in", str(data))
    assert (rc, out.strip()) == (1, "Signature invalid")


@pytest.mark.parametrize("key_type", ["rsa:2048", "aes:256"])
def test_encrypt_decrypt_round_trip(cli, tmp_path: Path, key_type: str) -> None:  # type: ignore[no-untyped-def]
    name = label("crypt")
    assert cli("keys", "generate", "--type", key_type, "--label", name)[0] == 0
    plain = tmp_path / "plain"
    plain.write_bytes(b"secret message")
    ct, back = tmp_path / "ct", tmp_path / "back"
    rc, _, err = cli("encrypt", f"pkcs11:object={name}", "--in", str(plain), "--out", str(ct))
    assert rc == 0, err
    assert ct.read_bytes() != plain.read_bytes()
    rc, _, err = cli("decrypt", f"pkcs11:object={name}", "--in", str(ct), "--out", str(back))
    assert rc == 0, err
    assert back.read_bytes() == b"secret message"


def test_delete(cli) -> None:  # type: ignore[no-untyped-def]
    name = label("gone")
    assert cli("keys", "generate", "--type", "ec:P-256", "--label", name)[0] == 0
    rc, out, err = cli("keys", "delete", f"pkcs11:object={name}")
    assert rc == 0, err
    assert out.count(name) == 2
    rc, out, _ = cli("keys", "list", f"pkcs11:object={name}")
    assert rc == 0 and name not in out


def test_random(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = cli("random", "16")
    assert rc == 0, err
    assert len(bytes.fromhex(out.strip())) == 16
    target = tmp_path / "rnd"
    assert cli("random", "32", "--out", str(target))[0] == 0
    assert len(target.read_bytes()) == 32


def test_wrong_pin(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = label("pin")
    assert cli("keys", "generate", "--type", "ec:P-256", "--label", name)[0] == 0
    data = tmp_path / "d"
    data.write_bytes(b"x")
    monkeypatch.setenv("KEYGRID_PIN", "not-the-pin")
    rc, _, err = cli("sign", f"pkcs11:object={name}", "--in", str(data), "--out", str(tmp_path / "s"))
    assert rc == 1
    assert "CKR_PIN_INCORRECT" in err and "check the PIN" in err
    assert "not-the-pin" not in err


def test_missing_socket(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = cli("--socket", str(tmp_path / "none.sock"), "status")
    assert rc == 1
    assert "is keygridd running?" in err and "none.sock" in err


def test_subprocess(daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {**daemon.env, "KEYGRID_PIN": daemon.user_pin.decode()}
    result = subprocess.run([sys.executable, "-m", "keygridd.cli", "slots"], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"SLOT" in result.stdout
