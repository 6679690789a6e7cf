"""The ``keygrid`` entry point: global options, the command table, and turning errors into messages and exit codes.

Each noun module has ``register(subparsers)`` adding its commands; a command is
a function ``(ctx: Context) -> int``. Errors are reported here once: the CKR
name and a one-line hint for PKCS#11 errors, "is keygridd running?" when the
socket cannot be reached; exit 1 for failures, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any

from keygridd import __version__
from keygridd.cli import crypto, db, keys, random, shim, slots, status, token
from keygridd.cli.contract import Client
from keygridd.cli.hints import EXIT_FAILURE, EXIT_USAGE, CliError, ckr_name, hint_for
from keygridd.cli.output import Output
from keygridd.cli.pin import SO_PIN_ENV, USER_PIN_ENV, PinSource, find_pin, require_pin
from keygridd.client import DEFAULT_SOCKET, ProtocolError, connect
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.uri import Pkcs11Uri

Handler = Callable[["Context"], int]


def open_client(socket_path: str | None) -> AbstractContextManager[Client]:
    """Connect to keygridd (tests replace this with a fake)."""
    return connect(socket_path)


def socket_path(option: str | None, environ: Mapping[str, str]) -> str:
    """The socket the CLI talks to: --socket, else $KEYGRID_SOCKET, else the default."""
    return option or environ.get("KEYGRID_SOCKET") or DEFAULT_SOCKET


class Context:
    """What a command gets: its arguments, the output, the client (connected on first use) and PINs."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str], stack: ExitStack) -> None:
        self.args = args
        self.environ = environ
        self.out = Output(bool(args.json))
        self.socket = socket_path(args.socket, environ)
        self._stack = stack
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = self._stack.enter_context(open_client(self.socket))
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise CliError(
                    f"cannot connect to keygridd: {reason}", f"is keygridd running? socket {self.socket}"
                ) from None
        return self._client

    def _user_pin_source(self, uri: Pkcs11Uri | None) -> PinSource:
        pin_file = getattr(self.args, "pin_file", None)
        if pin_file is None and uri is not None and uri.pin_source is not None:
            pin_file = uri.pin_source.removeprefix("file://").removeprefix("file:")
        return PinSource("user PIN", pin_file, USER_PIN_ENV, "--pin-file")

    def user_pin(self, uri: Pkcs11Uri | None = None, *, confirm: bool = False) -> bytes:
        """The user PIN from --pin-file, the URI's pin-source, KEYGRID_PIN or a prompt; an error when none."""
        return require_pin(self._user_pin_source(uri), self.environ, confirm=confirm)

    def optional_user_pin(self, uri: Pkcs11Uri | None = None) -> bytes | None:
        """The user PIN when one is given by file or environment (never prompts), else None."""
        return find_pin(self._user_pin_source(uri), self.environ, interactive=False)

    def so_pin(self, *, confirm: bool = False) -> bytes:
        source = PinSource("SO PIN", getattr(self.args, "so_pin_file", None), SO_PIN_ENV, "--so-pin-file")
        return require_pin(source, self.environ, confirm=confirm)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, and takes no abbreviations (``--pin`` is not ``--pin-file``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        raise _UsageExit(f"{self.prog}: error: {message}")


class _UsageExit(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The full ``keygrid`` argument parser."""
    parser = _Parser(prog="keygrid", description="Manage keys and use them through keygridd, the KeyGrid daemon.")
    parser.add_argument("--version", action="version", version=f"keygrid {__version__}")
    parser.add_argument(
        "--socket", metavar="PATH", help=f"daemon socket (default: $KEYGRID_SOCKET or {DEFAULT_SOCKET})"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in (status, slots, token, keys, crypto, random, shim, db):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run ``keygrid`` with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except _UsageExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    handler: Handler = args.handler
    with ExitStack() as stack:
        try:
            ctx = Context(args, env, stack)
            return handler(ctx)
        except CliError as exc:
            _report(args.json, None, exc.message, exc.hint)
            return exc.exit_code
        except PKCS11Error as exc:
            _report(args.json, ckr_name(exc), exc.message, hint_for(exc))
            return EXIT_FAILURE
        except (ConnectionError, ProtocolError) as exc:
            _report(args.json, None, f"lost the connection to keygridd: {exc}", "see the keygridd log")
            return EXIT_FAILURE
        except KeyboardInterrupt:
            return 130


def _report(json_mode: bool, error: str | None, message: str, hint: str | None) -> None:
    if json_mode:
        doc = {"error": error or "error", "message": message, "hint": hint}
        print(json.dumps(doc), file=sys.stderr)
        return
    text = f"{error}: {message}" if error and message else (error or message)
    print(f"keygrid: {text}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
