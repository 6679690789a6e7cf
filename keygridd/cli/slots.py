"""``keygrid slots``: every slot, its token and the token's state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keygridd.pkcs11 import TokenFlag

if TYPE_CHECKING:
    from keygridd.cli.app import Context


def register(commands: Any) -> None:
    p = commands.add_parser("slots", help="list slots and their tokens")
    p.set_defaults(handler=list_slots)


def token_state(flags: int) -> str:
    """A short summary of CK_TOKEN_INFO.flags for people."""
    if not flags & TokenFlag.TOKEN_INITIALIZED:
        return "not initialised"
    parts = ["initialised"]
    if not flags & TokenFlag.USER_PIN_INITIALIZED:
        parts.append("no user PIN")
    if flags & TokenFlag.USER_PIN_LOCKED:
        parts.append("user PIN locked")
    if flags & TokenFlag.SO_PIN_LOCKED:
        parts.append("SO PIN locked")
    if flags & TokenFlag.WRITE_PROTECTED:
        parts.append("read-only")
    return ", ".join(parts)


def list_slots(ctx: Context) -> int:
    client = ctx.client
    present = set(client.C_GetSlotList(True))
    data = []
    rows = []
    for slot in client.C_GetSlotList(False):
        info = dict(client.C_GetSlotInfo(slot))
        entry: dict[str, Any] = {"slot": slot, "slot_info": info, "token": None}
        if slot in present:
            token = dict(client.C_GetTokenInfo(slot))
            entry["token"] = token
            flags = int(token.get("flags", 0))
            rows.append((slot, token.get("label", ""), token.get("model", ""), token.get("serial_number", ""),
                         token_state(flags), info.get("slot_description", "")))  # fmt: skip
        else:
            rows.append((slot, "(no token)", "", "", "", info.get("slot_description", "")))
        data.append(entry)
    ctx.out.table(data, ("SLOT", "TOKEN", "MODEL", "SERIAL", "STATE", "DESCRIPTION"), rows)
    return 0
