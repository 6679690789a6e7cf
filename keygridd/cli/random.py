"""``keygrid random N``: N random bytes from a token's RNG (hex on stdout, raw bytes with --out)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keygridd.cli.hints import UsageError
from keygridd.cli.objects import one_token, open_session
from keygridd.cli.output import write_output

if TYPE_CHECKING:
    from keygridd.cli.app import Context

MAX_RANDOM = 1024 * 1024


def register(commands: Any) -> None:
    p = commands.add_parser("random", help="random bytes from a token")
    p.add_argument("length", type=int, metavar="N", help="number of bytes")
    p.add_argument("--out", metavar="FILE", help="write raw bytes to FILE ('-' = stdout); default: hex on stdout")
    p.add_argument("--slot", type=int, metavar="N", help="slot to use (default: the only initialised token)")
    p.set_defaults(handler=generate_random)


def generate_random(ctx: Context) -> int:
    length = ctx.args.length
    if not 1 <= length <= MAX_RANDOM:
        raise UsageError(f"N must be between 1 and {MAX_RANDOM}, got {length}")
    client = ctx.client
    token = one_token(client, None, ctx.args.slot)
    with open_session(client, token.slot) as session:
        data = client.C_GenerateRandom(session, length)
    if ctx.args.out is not None:
        write_output(ctx.args.out, data)
    else:
        ctx.out.emit({"random": data.hex()}, data.hex())
    return 0
