"""The PostgreSQL store's schema, as numbered migrations, and the one function that applies them.

``keygrid db migrate`` calls ``migrate``; ``PostgresStore`` calls
``schema_version`` at open and refuses a database whose schema is missing,
older or newer than ``SCHEMA_VERSION``. The daemon never changes the schema by
itself: its database role needs only ``SELECT, INSERT, UPDATE, DELETE`` on
``keygrid_records`` and ``SELECT`` on ``keygrid_schema``.

Rules:

- ``keygrid_schema`` holds one row, the version of the last migration applied
  (0: the table exists, nothing else does yet).
- Migrations only ever append to ``MIGRATIONS``; a released one is never edited.
- ``migrate`` runs every pending step and the version update in one
  transaction, under a transaction-level advisory lock, so two hosts running it
  at once are serialised and a failure leaves the schema as it was. Running it
  again is a no-op.
- Every change to ``keygrid_records`` sends ``NOTIFY keygrid_changes,
  '<namespace>\\t<key hex>'`` from a trigger, whoever writes (daemon or
  ``keygrid token import``); ``PostgresStore.subscribe`` listens on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHANNEL = "keygrid_changes"
_LOCK_ID = 0x4B657947726964  # pg_advisory_xact_lock key: "KeyGrid"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "records table with change notification",
        (
            # COLLATE "C": namespaces sort by their UTF-8 bytes, like every other backend.
            """
            CREATE TABLE keygrid_records (
                namespace text COLLATE "C" NOT NULL,
                key bytea NOT NULL,
                version bigint NOT NULL CHECK (version >= 1),
                value bytea NOT NULL,
                PRIMARY KEY (namespace, key)
            )
            """,
            f"""
            CREATE FUNCTION keygrid_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                changed keygrid_records;
            BEGIN
                IF TG_OP = 'DELETE' THEN changed := OLD; ELSE changed := NEW; END IF;
                PERFORM pg_notify('{CHANNEL}', changed.namespace || E'\\t' || encode(changed.key, 'hex'));
                RETURN NULL;
            END
            $$
            """,
            """
            CREATE TRIGGER keygrid_records_notify AFTER INSERT OR UPDATE OR DELETE ON keygrid_records
                FOR EACH ROW EXECUTE FUNCTION keygrid_notify_change()
            """,
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def schema_version(conn: Any) -> int | None:
    """The schema version of the database ``conn`` (a psycopg connection), or None when there is no schema."""
    cur = conn.execute("SELECT to_regclass('keygrid_schema') IS NOT NULL")
    row = cur.fetchone()
    if row is None or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM keygrid_schema").fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def migrate(conn: Any) -> tuple[int, int]:
    """Bring the database of ``conn`` to ``SCHEMA_VERSION``; returns (version before, version after).

    Raises ``RuntimeError`` if the database is newer than this code; database errors propagate (psycopg's).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS keygrid_schema (version integer NOT NULL)")
        before = schema_version(conn) or 0
        if before > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database schema is at version {before}, newer than this keygrid ({SCHEMA_VERSION})"
            )
        for step in MIGRATIONS:
            if step.version > before:
                for statement in step.statements:
                    conn.execute(statement)
        conn.execute("DELETE FROM keygrid_schema")
        conn.execute("INSERT INTO keygrid_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION
