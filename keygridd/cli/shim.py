"""``keygrid shim-path``: where the PKCS#11 module for unmodified consumers is installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keygridd.cli.hints import CliError

if TYPE_CHECKING:
    from keygridd.cli.app import Context

SHIM_NAME = "libkeygrid-pkcs11.so"


def register(commands: Any) -> None:
    p = commands.add_parser("shim-path", help=f"print the absolute path of {SHIM_NAME}")
    p.set_defaults(handler=print_shim_path)


def shim_path() -> Path:
    """The installed ``keygridd/lib/libkeygrid-pkcs11.so``; CliError when it is not there."""
    path = Path(str(resources.files("keygridd") / "lib" / SHIM_NAME)).resolve()
    if not path.is_file():
        raise CliError(f"{SHIM_NAME} is not installed (looked for {path})", "install a keygrid build with the C shim")
    return path


def print_shim_path(ctx: Context) -> int:
    path = shim_path()
    ctx.out.emit({"path": str(path)}, str(path))
    return 0
