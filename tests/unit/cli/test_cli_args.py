"""The keygrid command line without a daemon: parsing, usage errors, mechanisms, key types, error reporting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from keygridd.cli import app
from keygridd.cli.hints import CliError, UsageError
from keygridd.cli.keys import KeySpec
from keygridd.cli.mechanisms import (
    decryption_mechanism,
    default_mechanism,
    encryption_mechanism,
    parse_mechanism,
    signature_mechanism,
)
from keygridd.cli.objects import key_kind, parse_uri
from keygridd.cli.output import format_table
from keygridd.pkcs11 import CKK, CKM
from keygridd.pkcs11.errors import PinIncorrect, UserNotLoggedIn
from keygridd.pkcs11.params import GcmParams, OaepParams, PssParams


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["status"], "status"),
        (["--socket", "/tmp/s", "--json", "slots"], "slots"),
        (["token", "init", "--slot", "1", "--label", "t"], "token"),
        (["keys", "list"], "keys"),
        (["keys", "list", "pkcs11:object=a"], "keys"),
        (["keys", "generate", "--type", "ec:P-256", "--label", "k", "--slot", "0"], "keys"),
        (["keys", "generate", "--type", "ed25519", "--label", "k", "pkcs11:token=t"], "keys"),
        (["keys", "import", "--label", "k", "key.pem"], "keys"),
        (["keys", "delete", "pkcs11:object=a"], "keys"),
        (["keys", "public", "pkcs11:object=a"], "keys"),
        (["sign", "pkcs11:object=a", "--mechanism", "CKM_ECDSA", "--in", "f", "--out", "-"], "sign"),
        (["verify", "pkcs11:object=a", "--signature", "s"], "verify"),
        (["encrypt", "pkcs11:object=a"], "encrypt"),
        (["decrypt", "pkcs11:object=a", "--pin-file", "p"], "decrypt"),
        (["random", "8", "--out", "f"], "random"),
        (["shim-path"], "shim-path"),
    ],
)
def test_parse(argv: list[str], command: str) -> None:
    args = app.build_parser().parse_args(argv)
    assert args.command == command
    assert callable(args.handler)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["token", "init", "--label", "t"],  # --slot missing
        ["keys", "generate", "--label", "k"],  # --type missing
        ["keys", "generate", "--type", "ec:P-256", "--label", "k", "--slot", "0", "pkcs11:token=t"],  # both
        ["verify", "pkcs11:object=a"],  # --signature missing
        ["random", "many"],
        ["sign", "pkcs11:object=a", "--pin", "1234"],  # no PIN on the command line
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert app.main(argv, environ={}) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert app.main(["--help"], environ={}) == 0
    assert "sign" in capsys.readouterr().out


def test_bad_key_type_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = app.main(["keys", "generate", "--type", "dsa:1024", "--label", "k"], environ={"KEYGRID_PIN": "x"})
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown key type 'dsa:1024'" in err and "ec:P-256" in err


def test_pin_in_uri_refused() -> None:
    with pytest.raises(CliError, match="refusing a PIN"):
        parse_uri("pkcs11:object=a?pin-value=1234")
    with pytest.raises(CliError, match="unknown path attribute"):
        parse_uri("pkcs11:bogus=1")


def test_socket_path() -> None:
    assert app.socket_path("/x", {"KEYGRID_SOCKET": "/y"}) == "/x"
    assert app.socket_path(None, {"KEYGRID_SOCKET": "/y"}) == "/y"
    assert app.socket_path(None, {}) == "/run/keygrid/keygrid.sock"


class _Failing:
    """A client whose every call fails with one PKCS#11 error."""

    server_info: dict[str, Any] = {}

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise self.error

        return fail


def _fake(monkeypatch: pytest.MonkeyPatch, client: object) -> None:
    @contextmanager
    def open_client(path: str | None) -> Iterator[object]:
        yield client

    monkeypatch.setattr(app, "open_client", open_client)


@pytest.mark.parametrize(
    ("error", "name", "hint"),
    [
        (PinIncorrect(), "CKR_PIN_INCORRECT", "check the PIN"),
        (UserNotLoggedIn("sign needs a login"), "CKR_USER_NOT_LOGGED_IN: sign needs a login", "KEYGRID_PIN"),
    ],
)
def test_pkcs11_errors_print_ckr_and_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, name: str, hint: str
) -> None:
    _fake(monkeypatch, _Failing(error))
    assert app.main(["status"], environ={}) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"keygrid: {name}"
    assert err.splitlines()[1].startswith("hint: ") and hint in err


def test_errors_as_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    _fake(monkeypatch, _Failing(PinIncorrect()))
    assert app.main(["--json", "slots"], environ={}) == 1
    doc = json.loads(capsys.readouterr().err)
    assert doc["error"] == "CKR_PIN_INCORRECT" and "PIN" in doc["hint"]


def test_missing_daemon(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "none.sock")
    assert app.main(["--socket", sock, "status"], environ={}) == 1
    err = capsys.readouterr().err
    assert "cannot connect to keygridd" in err and f"is keygridd running? socket {sock}" in err


def test_shim_path_absent(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from keygridd.cli import shim

    monkeypatch.setattr(shim.resources, "files", lambda package: tmp_path)
    assert app.main(["shim-path"], environ={}) == 1
    assert "libkeygrid-pkcs11.so is not installed" in capsys.readouterr().err
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libkeygrid-pkcs11.so").write_bytes(b"\x7fELF")
    assert app.main(["shim-path"], environ={}) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "lib" / "libkeygrid-pkcs11.so")


@pytest.mark.parametrize(
    ("text", "number"),
    [("CKM_ECDSA_SHA256", CKM.ECDSA_SHA256), ("ecdsa-sha256", CKM.ECDSA_SHA256), ("0x1057", CKM.EDDSA), ("1", 1)],
)
def test_parse_mechanism(text: str, number: int) -> None:
    assert parse_mechanism(text) == number


def test_parse_mechanism_unknown() -> None:
    with pytest.raises(UsageError, match="unknown mechanism"):
        parse_mechanism("CKM_NOPE")


def test_default_mechanisms() -> None:
    assert default_mechanism("sign", CKK.EC) == CKM.ECDSA_SHA256
    assert default_mechanism("verify", CKK.RSA) == CKM.SHA256_RSA_PKCS
    assert default_mechanism("sign", CKK.EC_EDWARDS) == CKM.EDDSA
    assert default_mechanism("encrypt", CKK.RSA) == CKM.RSA_PKCS_OAEP
    assert default_mechanism("decrypt", CKK.AES) == CKM.AES_GCM
    with pytest.raises(CliError, match="no default encrypt mechanism"):
        default_mechanism("encrypt", CKK.EC)


def test_mechanism_parameters() -> None:
    pss = signature_mechanism(CKM.SHA384_RSA_PKCS_PSS).param
    assert isinstance(pss, PssParams) and pss.hash_alg == CKM.SHA384 and pss.s_len == 48
    assert signature_mechanism(CKM.ECDSA_SHA256).param is None
    oaep, prefix = encryption_mechanism(CKM.RSA_PKCS_OAEP)
    assert isinstance(oaep.param, OaepParams) and oaep.param.hash_alg == CKM.SHA256 and prefix == b""
    gcm, iv = encryption_mechanism(CKM.AES_GCM)
    assert isinstance(gcm.param, GcmParams) and gcm.param.iv == iv and len(iv) == 12
    back, rest = decryption_mechanism(CKM.AES_GCM, iv + b"ciphertext")
    assert back == gcm and rest == b"ciphertext"
    with pytest.raises(CliError, match="12-byte IV"):
        decryption_mechanism(CKM.AES_GCM, b"short")


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("ec:P-256", KeySpec("ec", curve="P-256")),
        ("ec:secp256k1", KeySpec("ec", curve="secp256k1")),
        ("rsa:2048", KeySpec("rsa", size=2048)),
        ("ed448", KeySpec("ed", curve="ed448")),
        ("aes:256", KeySpec("aes", size=256)),
    ],
)
def test_key_spec(text: str, spec: KeySpec) -> None:
    assert KeySpec.parse(text) == spec


def test_key_kind() -> None:
    assert key_kind(CKK.RSA, 2048, None, None) == "rsa:2048"
    assert key_kind(CKK.EC, None, bytes.fromhex("06052b81040022"), None) == "ec:P-384"
    assert key_kind(CKK.EC_EDWARDS, None, bytes.fromhex("06032b6570"), None) == "ed25519"
    assert key_kind(CKK.EC_EDWARDS, None, b"\x13\x0aedwards448", None) == "ed448"
    assert key_kind(CKK.AES, None, None, 16) == "aes:128"
    assert key_kind(None, None, None, None) == ""


def test_format_table() -> None:
    assert format_table(("A", "LONGER"), [(1, "x"), ("wide", None)]) == "A     LONGER\n1     x\nwide\n"
