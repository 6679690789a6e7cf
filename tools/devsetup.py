"""Prepare a development daemon for ``make run``.

Usage: ``python tools/devsetup.py VARDIR``

Writes ``VARDIR/keygrid.yaml`` if it is missing: the socket in ``VARDIR/run``,
one software-token slot on the embedded LMDB store ``VARDIR/tokens.lmdb`` with a token ``dev``
and PINs drawn at random for this checkout. The file holds the PINs, so it is
created with mode 0600 (and ``VARDIR`` with 0700). An existing file is never
rewritten: delete ``VARDIR`` to start over with new PINs and an empty token.

Then prints the socket, the slots with their token labels, the PINs, and the
commands to try from a second shell.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

CONFIG_NAME = "keygrid.yaml"
TOKEN_LABEL = "dev"


def random_digits(count: int) -> str:
    """A PIN of ``count`` decimal digits from the system CSPRNG."""
    return "".join(secrets.choice("0123456789") for _ in range(count))


def build_config(var_dir: Path) -> dict[str, Any]:
    """The development configuration, every path absolute."""
    return {
        "server": {"socket": str(var_dir / "run" / "keygrid.sock")},
        "slots": [
            {
                "provider": "software",
                "description": "KeyGrid software token (LMDB)",
                "options": {"backend": "lmdb", "path": str(var_dir / "tokens.lmdb")},
                "token": {
                    "label": TOKEN_LABEL,
                    "so_pin": random_digits(12),
                    "user_pin": random_digits(8),
                },
            }
        ],
    }


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Create ``path`` with mode 0600; fail if it already exists."""
    text = (
        "# Development configuration written by tools/devsetup.py for `make run`.\n"
        "# The PINs are random for this checkout. Delete var/ to start over.\n"
    ) + yaml.safe_dump(config, sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def load_config(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        loaded = yaml.safe_load(f)
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: expected a mapping at the top level")
    return loaded


def describe(config_path: Path, config: dict[str, Any]) -> str:
    """What a developer needs to talk to the development daemon."""
    socket = str((config.get("server") or {}).get("socket", ""))
    slots = config.get("slots") or []
    lines = [f"config:  {config_path}", f"socket:  {socket}", "slots:"]
    user_pin = ""
    label = TOKEN_LABEL
    for number, slot in enumerate(slots):
        token = slot.get("token") or {}
        lines.append(f"  {number}: provider={slot.get('provider')} token={token.get('label')!r}")
        if token.get("user_pin") and not user_pin:
            user_pin, label = str(token["user_pin"]), str(token.get("label", label))
            lines.append(f"     SO PIN: {token.get('so_pin')}  user PIN: {user_pin}  (development only)")
    uri = shlex.quote(f"pkcs11:token={label};object=demo")
    lines += [
        "",
        "In a second shell:",
        f"  export KEYGRID_SOCKET={shlex.quote(socket)}",
        f"  export KEYGRID_PIN={shlex.quote(user_pin)}",
        "  .venv/bin/keygrid status",
        "  .venv/bin/keygrid keys generate --type ec:P-256 --label demo",
        "  echo hello > /tmp/msg",
        f"  .venv/bin/keygrid sign {uri} --in /tmp/msg --out /tmp/msg.sig",
        f"  .venv/bin/keygrid verify {uri} --signature /tmp/msg.sig --in /tmp/msg",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python tools/devsetup.py VARDIR", file=sys.stderr)
        return 2
    var_dir = Path(argv[1]).resolve()
    (var_dir / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    var_dir.chmod(0o700)
    config_path = var_dir / CONFIG_NAME
    if config_path.exists():
        config = load_config(config_path)
    else:
        config = build_config(var_dir)
        write_config(config_path, config)
        print(f"wrote {config_path}")
    print(describe(config_path, config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
