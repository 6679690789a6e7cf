"""``keygrid token init``: initialise a token and set its user PIN (``export``/``import``: ``tokenio.py``).

The SO PIN comes from --so-pin-file, KEYGRID_SO_PIN or a prompt; the user PIN
from --pin-file, KEYGRID_PIN or a prompt. Both prompts ask twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keygridd.cli import tokenio
from keygridd.cli.hints import UsageError
from keygridd.cli.objects import open_session
from keygridd.pkcs11 import CKU

if TYPE_CHECKING:
    from keygridd.cli.app import Context


def register(commands: Any) -> None:
    p = commands.add_parser("token", help="token administration")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    init = actions.add_parser("init", help="initialise the token in a slot and set its user PIN")
    init.add_argument("--slot", type=int, required=True, metavar="N", help="slot id (see 'keygrid slots')")
    init.add_argument("--label", required=True, help="token label (at most 32 bytes of UTF-8)")
    init.add_argument("--so-pin-file", metavar="FILE", help="file holding the SO PIN (else KEYGRID_SO_PIN or a prompt)")
    init.add_argument("--pin-file", metavar="FILE", help="file holding the user PIN (else KEYGRID_PIN or a prompt)")
    init.set_defaults(handler=init_token)
    tokenio.register(actions)


def init_token(ctx: Context) -> int:
    label = ctx.args.label.encode("utf-8")
    if not label or len(label) > 32:
        raise UsageError(f"token label must be 1 to 32 bytes of UTF-8, got {len(label)}")
    so_pin = ctx.so_pin(confirm=True)
    user_pin = ctx.user_pin(confirm=True)
    client = ctx.client
    slot = ctx.args.slot
    client.C_InitToken(slot, so_pin, label)
    with open_session(client, slot, rw=True) as session:
        client.C_Login(session, CKU.SO, so_pin)
        client.C_InitPIN(session, user_pin)
        client.C_Logout(session)
    ctx.out.emit({"slot": slot, "label": ctx.args.label}, f"token {ctx.args.label!r} initialised in slot {slot}")
    return 0
