"""What the CLI writes: tables and lines for people, one JSON document for scripts (``--json``).

Text goes to ``sys.stdout`` as it is at call time (so tests can capture it);
binary results go to a file or, for ``-``, to ``sys.stdout.buffer``. Inputs are
read the same way (``-`` = stdin). Nothing secret is ever written here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from keygridd.cli.hints import CliError


class Output:
    """The CLI's output, in text or JSON mode."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode

    def emit(self, data: Any, text: str) -> None:
        """Print ``data`` as JSON in JSON mode, else ``text`` (a line or a block)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=_jsonable) + "\n")
        elif text:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")

    def table(self, data: Any, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Print ``rows`` as an aligned table (or ``data`` as JSON)."""
        self.emit(data, format_table(headers, rows))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned, plain-text table; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def read_input(path: str) -> bytes:
    """The bytes of ``path`` (``-`` = stdin)."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def write_output(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (``-`` = stdout), replacing the file."""
    if path == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_secret(path: str, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read (``-`` = stdout)."""
    if path == "-":
        write_output(path, data)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
