"""``keygrid token export`` / ``keygrid token import``: move a software token between stores, offline.

Both read the daemon's configuration (``--config``) to find the slot's store,
then copy the token's raw records (still sealed: no PIN is asked and nothing is
decrypted) with their versions. The record seals bind the token uuid, the
record key and the version, not the store or namespace, so a token exported
from LMDB imports into PostgreSQL or another slot's filesystem store as is.

Rules:

* run them with the daemon stopped (or at least not writing to that token);
* the export file (mode 0600) holds the sealed records and the wrapped master
  key: treat it like the store itself, as it opens with the token's PINs;
* import refuses a target namespace that holds records unless ``--force``,
  which deletes them first; records keep their versions (``RawStore.restore``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from keygridd.cli.hints import CliError, UsageError
from keygridd.config import ConfigError, build, load_config
from keygridd.storage.base import RawStore, StoreError

if TYPE_CHECKING:
    from keygridd.cli.app import Context
    from keygridd.providers.software import SoftwareOptions

META_KEY = b"meta"  # keygridd.providers.software.META_KEY, not imported: the CLI starts without the token code

EXPORT_FORMAT = "keygrid-token-export"
EXPORT_VERSION = 1


def register(actions: Any) -> None:
    """Add ``export`` and ``import`` to the ``token`` actions."""
    exp = actions.add_parser("export", help="copy a software token's sealed records to a file (daemon stopped)")
    imp = actions.add_parser("import", help="write a token exported by 'token export' into a slot's store")
    for p in (exp, imp):
        p.add_argument("--config", required=True, metavar="FILE", help="keygridd configuration naming the slot")
        p.add_argument("--slot", type=int, required=True, metavar="N", help="slot id of a software token")
    exp.add_argument("output", metavar="OUT", help="file to write (mode 0600)")
    exp.set_defaults(handler=export_token)
    imp.add_argument("input", metavar="IN", help="file written by 'keygrid token export'")
    imp.add_argument("--force", action="store_true", help="replace the token already in the slot's store")
    imp.set_defaults(handler=import_token)


def software_slot(config: str, slot_id: int) -> SoftwareOptions:
    """The options of software slot ``slot_id`` in the configuration ``config`` (UsageError naming the problem)."""
    from keygridd.providers.software import SoftwareOptions

    try:
        settings = load_config(config)
    except ConfigError as exc:
        raise UsageError(f"configuration error: {exc}") from None
    for i, slot in enumerate(settings.slots):
        if slot.id != slot_id:
            continue
        if slot.provider != "software":
            raise UsageError(f"slot {slot_id} is served by provider {slot.provider!r}, not 'software'")
        try:
            return build(SoftwareOptions, slot.options, f"slots[{i}].options")
        except ConfigError as exc:
            raise UsageError(f"configuration error: {exc.with_source(config)}") from None
    raise UsageError(f"{config}: no slot {slot_id}")


def slot_store(config: str, slot_id: int) -> tuple[RawStore, str]:
    """The raw store and namespace of software slot ``slot_id`` in the configuration ``config``."""
    from keygridd.providers.software import default_namespace, open_raw_store

    options = software_slot(config, slot_id)
    try:
        raw = open_raw_store(options)
    except StoreError as exc:
        raise CliError(f"cannot open the store of slot {slot_id}: {exc}") from None
    return raw, options.namespace or default_namespace(slot_id)


def close_stores() -> None:
    from keygridd.storage.registry import close_stores

    close_stores()


def export_token(ctx: Context) -> int:
    raw, namespace = slot_store(ctx.args.config, ctx.args.slot)
    try:
        records = [[key, record.version, record.value] for key, record in raw.scan(namespace)]
    except StoreError as exc:
        raise CliError(f"cannot read the token: {exc}") from None
    finally:
        close_stores()
    if not any(key == META_KEY for key, _, _ in records):
        raise CliError(f"slot {ctx.args.slot} holds no token (namespace {namespace!r} has no metadata record)")
    doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "namespace": namespace, "records": records}
    _write_private(Path(ctx.args.output), msgpack.packb(doc, use_bin_type=True))
    count = len(records) - 1
    ctx.out.emit(
        {"slot": ctx.args.slot, "namespace": namespace, "objects": count, "file": ctx.args.output},
        f"exported the token of slot {ctx.args.slot} ({count} objects) to {ctx.args.output}",
    )
    return 0


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=".tmp-export-")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates it 0600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_export(path: str) -> list[tuple[bytes, int, bytes]]:
    """The records of an export file, checked for shape."""
    try:
        doc = msgpack.unpackb(Path(path).read_bytes(), raw=False)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, msgpack.ExtraData, msgpack.UnpackException):
        raise CliError(f"{path} is not a token export") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise CliError(f"{path} is not a token export")
    if doc.get("version") != EXPORT_VERSION:
        raise CliError(f"{path}: export version {doc.get('version')!r} is not supported")
    records: list[tuple[bytes, int, bytes]] = []
    for item in doc.get("records", ()):
        if not (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], bytes)
            and isinstance(item[1], int)
            and item[1] >= 1
            and isinstance(item[2], bytes)
        ):
            raise CliError(f"{path}: malformed record")
        records.append((item[0], item[1], item[2]))
    if not any(key == META_KEY for key, _, _ in records):
        raise CliError(f"{path}: no token metadata record")
    return records


def import_token(ctx: Context) -> int:
    records = read_export(ctx.args.input)
    raw, namespace = slot_store(ctx.args.config, ctx.args.slot)
    try:
        existing = list(raw.scan(namespace))
        if existing and not ctx.args.force:
            raise CliError(
                f"slot {ctx.args.slot} already holds a token (namespace {namespace!r}, {len(existing)} records)",
                "use --force to replace it (its keys are lost)",
            )
        for key, record in existing:
            raw.delete(namespace, key, record.version)
        # Objects first, the metadata last: an interrupted import leaves no half-token that looks whole.
        for key, version, value in sorted(records, key=lambda r: r[0] == META_KEY):
            raw.restore(namespace, key, version, value)
    except StoreError as exc:
        raise CliError(f"cannot write the token: {exc}") from None
    finally:
        close_stores()
    count = len(records) - 1
    ctx.out.emit(
        {"slot": ctx.args.slot, "namespace": namespace, "objects": count},
        f"imported {count} objects into slot {ctx.args.slot} (namespace {namespace!r})",
    )
    return 0
