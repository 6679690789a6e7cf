"""``keygrid status``: the daemon's version, uptime and slots."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from keygridd.cli.output import format_table

if TYPE_CHECKING:
    from keygridd.cli.app import Context


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser("status", help="daemon version, uptime and slots")
    p.set_defaults(handler=show_status)


def show_status(ctx: Context) -> int:
    client = ctx.client
    status = dict(client.KG_Status())
    status["server_info"] = dict(client.server_info)
    rows = [
        (
            s.get("slot_id"),
            s.get("provider", ""),
            s.get("token_label", "") if s.get("token_present") else "(no token)",
            "yes" if s.get("initialized") else "no",
            "yes" if s.get("ready") else "no",
            s.get("description", ""),
        )
        for s in status.get("slots", [])
    ]
    server = status["server_info"].get("server", "keygridd")
    text = f"{server} (version {status.get('version', '?')}), up {_duration(float(status.get('uptime', 0)))}\n"
    text += f"socket: {ctx.socket}\n\n"
    text += format_table(("SLOT", "PROVIDER", "TOKEN", "INITIALISED", "READY", "DESCRIPTION"), rows)
    ctx.out.emit(status, text)
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"
