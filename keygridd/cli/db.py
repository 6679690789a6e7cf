"""``keygrid db migrate``: create or upgrade the PostgreSQL schema of the software token's shared store.

The database is named by ``--dsn`` or by a software slot of a keygridd
configuration (``--config FILE --slot N``, the slot's ``dsn`` option).
Running it again is harmless; several hosts running it at once are serialised
by the database (``keygridd.storage.migrations``). The DSN's password never
appears in the output: prefer ``PGPASSWORD`` or ``~/.pgpass`` to a password
on the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keygridd.cli.hints import CliError, UsageError
from keygridd.cli.tokenio import software_slot

if TYPE_CHECKING:
    from keygridd.cli.app import Context


def register(commands: Any) -> None:
    p = commands.add_parser("db", help="shared database administration (PostgreSQL store)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    migrate = actions.add_parser("migrate", help="create or upgrade the PostgreSQL schema (safe to run again)")
    migrate.add_argument("--dsn", help="libpq connection string or URI (else --config and --slot)")
    migrate.add_argument("--config", metavar="FILE", help="keygridd configuration naming the slot")
    migrate.add_argument("--slot", type=int, metavar="N", help="slot id of a software token on backend postgresql")
    migrate.set_defaults(handler=migrate_schema)


def slot_dsn(config: str, slot_id: int) -> str:
    """The ``dsn`` option of software slot ``slot_id`` on backend postgresql in the configuration ``config``."""
    options = software_slot(config, slot_id)
    if options.backend != "postgresql" or not options.dsn:
        raise UsageError(f"slot {slot_id} stores its token on backend {options.backend!r}, not 'postgresql'")
    return options.dsn


def migrate_schema(ctx: Context) -> int:
    args = ctx.args
    if args.dsn is not None:
        if args.config is not None or args.slot is not None:
            raise UsageError("give --dsn, or --config with --slot, not both")
        dsn: str = args.dsn
    elif args.config is not None and args.slot is not None:
        dsn = slot_dsn(args.config, args.slot)
    else:
        raise UsageError("name the database: --dsn DSN, or --config FILE --slot N")

    import psycopg

    from keygridd.storage import migrations
    from keygridd.storage.registry import redact_dsn

    name = redact_dsn(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            before, after = migrations.migrate(conn)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CliError(
            f"cannot migrate {name}: {redact_dsn(first)}", "check the DSN and that the role may create tables"
        ) from None
    except RuntimeError as exc:
        raise CliError(f"cannot migrate {name}: {exc}", "upgrade keygrid") from None
    if before == after:
        text = f"schema of {name} is up to date (version {after})"
    else:
        text = f"schema of {name} migrated from version {before} to {after}"
    ctx.out.emit({"database": name, "from": before, "to": after}, text)
    return 0
