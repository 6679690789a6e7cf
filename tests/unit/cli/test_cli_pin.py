"""Where the CLI gets PINs: --pin-file, then the environment, then a prompt on a terminal, else an error."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from keygridd.cli.hints import CliError
from keygridd.cli.pin import PinSource, find_pin, read_pin_file, require_pin

SOURCE = PinSource("user PIN", None, "KEYGRID_PIN", "--pin-file")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _prompt(*answers: str) -> tuple[list[str], object]:
    asked: list[str] = []
    replies = iter(answers)

    def prompt(text: str) -> str:
        asked.append(text)
        return next(replies)

    return asked, prompt


def test_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_bytes(b"from-file\n")
    source = PinSource("user PIN", str(path), "KEYGRID_PIN", "--pin-file")
    assert find_pin(source, {"KEYGRID_PIN": "from-env"}) == b"from-file"


@pytest.mark.parametrize(
    ("content", "pin"), [(b"1234", b"1234"), (b"1234\n", b"1234"), (b"12 34\r\nextra\n", b"12 34")]
)
def test_pin_file_first_line(tmp_path: Path, content: bytes, pin: bytes) -> None:
    path = tmp_path / "pin"
    path.write_bytes(content)
    assert read_pin_file(str(path)) == pin


def test_pin_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="cannot read PIN file"):
        read_pin_file(str(tmp_path / "missing"))
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(CliError, match="is empty"):
        read_pin_file(str(tmp_path / "empty"))


def test_environment() -> None:
    assert find_pin(SOURCE, {"KEYGRID_PIN": "from-env"}, stdin=_Tty()) == b"from-env"


def test_prompt_on_a_terminal() -> None:
    asked, prompt = _prompt("typed")
    assert find_pin(SOURCE, {}, stdin=_Tty(), prompt=prompt) == b"typed"  # type: ignore[arg-type]
    assert asked == ["user PIN: "]


def test_prompt_confirm() -> None:
    _, prompt = _prompt("one", "one")
    assert find_pin(SOURCE, {}, stdin=_Tty(), prompt=prompt, confirm=True) == b"one"  # type: ignore[arg-type]
    _, prompt = _prompt("one", "two")
    with pytest.raises(CliError, match="differ"):
        find_pin(SOURCE, {}, stdin=_Tty(), prompt=prompt, confirm=True)  # type: ignore[arg-type]


def test_no_prompt_without_terminal() -> None:
    asked, prompt = _prompt("never")
    assert find_pin(SOURCE, {}, stdin=io.StringIO(), prompt=prompt) is None  # type: ignore[arg-type]
    assert find_pin(SOURCE, {}, stdin=_Tty(), prompt=prompt, interactive=False) is None  # type: ignore[arg-type]
    assert asked == []


def test_required_pin_missing_is_an_error() -> None:
    with pytest.raises(CliError) as info:
        require_pin(SOURCE, {}, stdin=io.StringIO())
    assert info.value.message == "this needs the user PIN"
    assert info.value.hint is not None and "--pin-file" in info.value.hint and "KEYGRID_PIN" in info.value.hint


def test_cli_reports_missing_pin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from keygridd.cli import app

    monkeypatch.setattr("sys.stdin", io.StringIO())
    rc = app.main(["keys", "generate", "--type", "ec:P-256", "--label", "k"], environ={})
    assert rc == 1
    err = capsys.readouterr().err
    assert "this needs the user PIN" in err and "KEYGRID_PIN" in err
