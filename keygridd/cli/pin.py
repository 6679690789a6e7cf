"""Where PINs come from: ``--pin-file FILE``, else an environment variable, else a prompt on a terminal.

A PIN is never taken from the command line (it would show in ``ps`` and shell
history) and never printed or logged. A PIN file holds the PIN on its first
line; one trailing newline is dropped. Without a file, a variable or a
terminal, asking for a PIN is an error that says how to give one.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from keygridd.cli.hints import CliError

USER_PIN_ENV = "KEYGRID_PIN"
SO_PIN_ENV = "KEYGRID_SO_PIN"

Prompt = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class PinSource:
    """Which PIN is wanted and where it may come from."""

    what: str  # "user PIN" or "SO PIN", for prompts and messages
    file: str | None  # --pin-file / --so-pin-file
    env_var: str  # KEYGRID_PIN / KEYGRID_SO_PIN
    option: str  # the option name, for messages


def read_pin_file(path: str) -> bytes:
    """The PIN in ``path``: its first line, without the line ending."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(4096)
    except OSError as exc:
        raise CliError(f"cannot read PIN file {path}: {exc.strerror or exc}") from None
    pin = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not pin:
        raise CliError(f"PIN file {path} is empty")
    return pin


def find_pin(
    source: PinSource,
    environ: Mapping[str, str],
    *,
    stdin: TextIO | None = None,
    prompt: Prompt = getpass.getpass,
    interactive: bool = True,
    confirm: bool = False,
) -> bytes | None:
    """The PIN from the file, the variable or (when ``interactive`` and stdin is a TTY) a prompt; else None."""
    if source.file is not None:
        return read_pin_file(source.file)
    value = environ.get(source.env_var)
    if value:
        return value.encode("utf-8")
    stream = sys.stdin if stdin is None else stdin
    if not interactive or not _is_tty(stream):
        return None
    pin = prompt(f"{source.what}: ")
    if not pin:
        raise CliError(f"no {source.what} entered")
    if confirm and prompt(f"{source.what} again: ") != pin:
        raise CliError(f"the two {source.what}s differ")
    return pin.encode("utf-8")


def require_pin(
    source: PinSource,
    environ: Mapping[str, str],
    *,
    stdin: TextIO | None = None,
    prompt: Prompt = getpass.getpass,
    confirm: bool = False,
) -> bytes:
    """Like ``find_pin`` but a missing PIN is an error saying how to give one."""
    pin = find_pin(source, environ, stdin=stdin, prompt=prompt, confirm=confirm)
    if pin is None:
        raise CliError(
            f"this needs the {source.what}",
            f"use {source.option} FILE, set {source.env_var}, or run on a terminal to be asked",
        )
    return pin


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
