"""Import boundaries: the sans-I/O layers never import trio, sockets or a backend SDK.

``keygridd/protocol/``, ``core/``, ``mechanisms/`` and ``pkcs11/`` are read as
source (AST), so a forbidden import is found even when it sits in a function
body or behind ``if TYPE_CHECKING``; ``__import__``/``importlib.import_module``
with a literal name count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "keygridd"
SANS_IO = ("protocol", "core", "mechanisms", "pkcs11")

# Top-level modules that mean I/O, an event loop, or a backend's SDK.
FORBIDDEN = {
    "trio", "anyio", "asyncio", "socket", "socketserver", "selectors", "ssl", "select",
    "http", "urllib3", "requests", "httpx", "aiohttp", "grpc",
    "azure", "boto3", "botocore", "google", "hvac", "pkcs11", "PyKCS11", "lmdb", "psycopg", "psycopg2",
}  # fmt: skip
# keygridd packages that sit above these layers.
FORBIDDEN_INTERNAL = ("keygridd.server", "keygridd.client", "keygridd.providers", "keygridd.cli",
                      "keygridd.daemon", "keygridd.middleware", "keygridd.storage")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            callee = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if callee in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def offences(source: str, module: str, is_package: bool = False) -> list[str]:
    bad = []
    for line, name in imported_names(ast.parse(source), module, is_package):
        top = name.split(".")[0]
        if top in FORBIDDEN or any(name == p or name.startswith(p + ".") for p in FORBIDDEN_INTERNAL):
            bad.append(f"{module}:{line}: imports {name}")
    return bad


def sans_io_files() -> list[Path]:
    files = sorted(p for layer in SANS_IO for p in (PACKAGE / layer).rglob("*.py"))
    assert len(files) > 20, "the layers were not found"
    return files


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sans_io_layers_do_not_import_io(path: Path) -> None:
    bad = offences(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source, module",
    [
        ("import trio", "keygridd.core.x"),
        ("import trio.lowlevel as t", "keygridd.core.x"),
        ("from socket import socket", "keygridd.protocol.x"),
        ("def f():\n    import socket", "keygridd.mechanisms.x"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio", "keygridd.core.x"),
        ("import azure.keyvault.keys", "keygridd.core.x"),
        ("import pkcs11", "keygridd.core.x"),
        ("from ..providers import memory", "keygridd.core.x"),
        ("from ..server.connection import Connection", "keygridd.protocol.x"),
        ("from keygridd import server", "keygridd.core.x"),
        ("import importlib\nimportlib.import_module('trio')", "keygridd.core.x"),
        ("__import__('socket')", "keygridd.core.x"),
    ],
)
def test_the_check_catches_offending_imports(source: str, module: str) -> None:
    assert offences(source, module)


@pytest.mark.parametrize(
    "source, module",
    [
        ("from keygridd import pkcs11", "keygridd.core.x"),
        ("from ..pkcs11 import CKA", "keygridd.core.x"),  # keygridd.pkcs11, not the python-pkcs11 SDK
        ("from . import pkcs11", "keygridd.x"),
        ("from .errors import ArgumentsBad", "keygridd.pkcs11.x"),
        ("import msgpack\nimport os\nimport cryptography", "keygridd.protocol.x"),
    ],
)
def test_the_check_allows_what_is_allowed(source: str, module: str) -> None:
    assert offences(source, module) == []
