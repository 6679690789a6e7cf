"""Provider ``software``: KeyGrid's own token, objects encrypted at rest in a raw store.

The embedded default. Each slot's token lives in one namespace of a raw store
(``backend``: lmdb, filesystem, postgresql, memory) as:

* one metadata record, ``meta``: format, token uuid, label, the master key
  wrapped under the SO PIN, the user PIN and optionally an unlock key, and the
  PIN failure counters. Nothing in it is secret without a PIN;
* one record per token object, ``obj/<oid>``: a private object is sealed whole;
  a public object keeps its non-secret attributes in clear (readable before
  login) and seals its secret attributes (``CKA_VALUE``, private exponents:
  whatever the attribute policy marks sensitive), with its clear part bound
  into the seal's associated data, so the clear part is checked at unlock.

Sealing and PIN wrapping are ``keygridd.storage.sealed``; the raw store never
sees plaintext key material or a PIN.

Lock state: the master key is in memory only while the token is *unlocked*:
after a right user or SO PIN until ``lock()`` (the core calls it when no
application is logged in any more), or for good when the slot is unattended.
``objects()`` returns what can be read now: public objects without secret
attributes while locked, everything while unlocked; it never does I/O (the
unlock reads and opens every record in ``check_pin``, in a worker thread).
Writing a token object needs the master key: while the token is locked,
``put_object`` raises ``UserNotLoggedIn``.

PIN policy: PINs of ``min_pin_len`` .. ``max_pin_len`` bytes; every attempt
is counted in the metadata record *before* the key derivation runs (a crash or
parallel guesses cannot get free tries) and the count is reset by a right PIN;
at ``max_pin_failures`` the PIN is locked (CKR_PIN_LOCKED) until the SO sets a
new user PIN with C_InitPIN. A locked SO PIN cannot be reset: re-create the token.

Unattended tokens (``unlock_key_file`` or ``unlock_credential``): the master key
is also wrapped under an unlock key (at least 16 random bytes) and the token is
unlocked from start. Trade-off: the keys at rest are then only as safe as the
unlock key: whoever can read both the store and the unlock key has every key,
PIN or not. PINs still gate every PKCS#11 use. Keep the key in a systemd
credential (``LoadCredentialEncrypted=``, sealed to the host's TPM) rather than
a plain file, and never next to the store or in its backups.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from keygridd.core.store import Attributes, TokenDescription, TokenStore
from keygridd.pkcs11 import CKA, CKU, TokenFlag
from keygridd.pkcs11.errors import (
    DeviceError,
    PinIncorrect,
    PinLenRange,
    PinLocked,
    UserNotLoggedIn,
    UserPinNotInitialized,
)
from keygridd.providers.base import Provider
from keygridd.providers.software_records import Entry, Meta, ObjectRecord, is_secret
from keygridd.storage.base import ABSENT, RawStore, Record, StoreError, VersionConflict
from keygridd.storage.registry import close_stores, open_store
from keygridd.storage.sealed import (
    Argon2Cost,
    KdfParams,
    ScryptCost,
    Sealer,
    SealError,
    WrongSecret,
    new_master_key,
    new_token_uuid,
    unwrap_with_pin,
    unwrap_with_unlock_key,
    wrap_with_pin,
    wrap_with_unlock_key,
)

log = logging.getLogger("keygridd.software")

META_KEY = b"meta"
OBJECT_PREFIX = b"obj/"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
_META_RETRIES = 16


# --- options -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoftwareOptions:
    backend: Literal["lmdb", "filesystem", "memory", "postgresql"] = "lmdb"
    path: str | None = None
    dsn: str | None = None
    namespace: str | None = None
    kdf: Literal["argon2id", "scrypt"] = "argon2id"
    argon2id: Argon2Cost = field(default_factory=Argon2Cost)
    scrypt: ScryptCost = field(default_factory=ScryptCost)
    min_pin_len: int = 4
    max_pin_len: int = 255
    max_pin_failures: int = 10
    unlock_key_file: str | None = None
    unlock_credential: str | None = None
    serial: str = ""

    def __post_init__(self) -> None:
        if self.backend in ("lmdb", "filesystem") and not self.path:
            raise ValueError(f"backend {self.backend} needs a path")
        if self.backend == "postgresql" and not self.dsn:
            raise ValueError("backend postgresql needs a dsn")
        if self.namespace is not None and not 1 <= len(self.namespace.encode()) <= 80:
            raise ValueError("namespace must be 1 to 80 bytes of UTF-8")
        if not 1 <= self.min_pin_len <= self.max_pin_len <= 255:
            raise ValueError("PIN lengths must satisfy 1 <= min_pin_len <= max_pin_len <= 255")
        if self.max_pin_failures < 1:
            raise ValueError("max_pin_failures must be >= 1")
        if self.unlock_key_file and self.unlock_credential:
            raise ValueError("give unlock_key_file or unlock_credential, not both")
        if self.unlock_credential is not None and (
            not self.unlock_credential or "/" in self.unlock_credential or self.unlock_credential in (".", "..")
        ):
            raise ValueError("unlock_credential is a credential name, not a path")
        if len(self.serial) > 16:
            raise ValueError("serial is at most 16 characters")


def read_unlock_key(options: SoftwareOptions, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The unlock key from ``unlock_key_file`` or ``$CREDENTIALS_DIRECTORY/<unlock_credential>``, or None."""
    if options.unlock_key_file:
        path = Path(options.unlock_key_file)
        what = f"unlock_key_file {path}"
    elif options.unlock_credential:
        directory = environ.get(CREDENTIALS_ENV)
        if not directory:
            raise UnlockKeyError(
                f"unlock_credential {options.unlock_credential!r}: ${CREDENTIALS_ENV} is not set "
                "(LoadCredential= or LoadCredentialEncrypted= in the systemd unit)"
            )
        path = Path(directory) / options.unlock_credential
        what = f"unlock credential {options.unlock_credential!r}"
    else:
        return None
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise UnlockKeyError(f"{what}: cannot read: {exc.strerror or exc}") from None
    if len(key) < 16:
        raise UnlockKeyError(f"{what}: an unlock key has at least 16 bytes, got {len(key)}")
    return key


class UnlockKeyError(Exception):
    """The unlock key of an unattended token is missing, too short or wrong."""


# --- the token store -------------------------------------------------------------------------------------------------------


class SoftwareStore(TokenStore):
    """One software token over a raw store namespace. Methods block (store I/O, key derivation)."""

    blocking = True

    def __init__(
        self,
        raw: RawStore,
        namespace: str,
        options: SoftwareOptions,
        *,
        unlock_key: bytes | None = None,
        serial: str = "",
        owns_raw: bool = True,
    ) -> None:
        self.raw = raw
        self._owns_raw = owns_raw
        self.namespace = namespace
        self.options = options
        self._unlock_key = unlock_key
        self._serial = serial
        self._lock = threading.RLock()
        self._sealer: Sealer | None = None
        self._login_holds_key = False  # unlocked by a PIN (kept until lock()), not only by init_token
        self._entries: dict[bytes, Entry] = {}
        self._meta = self._read_meta()
        self._describe()
        self._load_entries()
        if unlock_key is not None:
            self._start_unattended(unlock_key)
        elif self._meta.unlock is not None:
            # Unattended before, not any more: do not leave a wrap for a key nobody configures.
            self._update_meta(lambda m: setattr(m, "unlock", None))

    # --- metadata ------------------------------------------------------------------------------------------------------

    def _describe(self) -> None:
        serial = self._serial or (self._meta.uuid.hex()[:16] if self._meta.uuid else "")
        self.description = TokenDescription(
            model="software",
            serial=serial,
            min_pin_len=self.options.min_pin_len,
            max_pin_len=self.options.max_pin_len,
        )

    def _read_meta(self) -> Meta:
        record = self.raw.get(self.namespace, META_KEY)
        return Meta() if record is None else Meta.decode(record)

    def _update_meta(self, change: Callable[[Meta], None]) -> Meta:
        """Read, change and write the metadata record, again if another writer got there first."""
        for _ in range(_META_RETRIES):
            meta = self._read_meta()
            change(meta)
            try:
                meta.version = self.raw.put(self.namespace, META_KEY, meta.encode(), meta.version)
            except VersionConflict:
                continue
            with self._lock:
                self._meta = meta
            return meta
        raise DeviceError("the token's metadata keeps changing under this daemon")

    def _kdf_params(self) -> KdfParams:
        return KdfParams.new(self.options.kdf, self.options.argon2id, self.options.scrypt)

    def _check_length(self, pin: bytes) -> None:
        if not self.options.min_pin_len <= len(pin) <= self.options.max_pin_len:
            raise PinLenRange(f"PINs are {self.options.min_pin_len} to {self.options.max_pin_len} bytes")

    # --- objects -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _record_key(oid: bytes) -> bytes:
        return OBJECT_PREFIX + oid

    def _read_entry(self, key: bytes, record: Record, sealer: Sealer | None) -> Entry:
        """An entry for a stored record: opened with ``sealer`` when given, else what is public."""
        try:
            obj = ObjectRecord.decode(record.value)
            attrs = obj.open(sealer, key, record.version) if sealer is not None else obj.public_view()
        except (SealError, StoreError, ValueError, TypeError, KeyError) as exc:
            log.error("token %s: object record %s is damaged or was tampered with: %s", self.namespace, key.hex(), exc)
            attrs = None
        except Exception as exc:  # a decoding error of the attribute codec (AttributeValueInvalid)
            log.error("token %s: object record %s cannot be decoded: %s", self.namespace, key.hex(), exc)
            attrs = None
        return Entry(record.version, attrs)

    def _load_entries(self) -> None:
        with self._lock:
            sealer = self._sealer
        entries: dict[bytes, Entry] = {}
        for key, record in self.raw.scan(self.namespace):
            if key.startswith(OBJECT_PREFIX):
                entry = self._read_entry(key, record, sealer)
                seen = self._entries.get(key[len(OBJECT_PREFIX) :])
                if seen is not None and record.version < seen.version:
                    log.error("token %s: object record %s went back in version: ignored", self.namespace, key.hex())
                    entry = Entry(seen.version, None)
                entries[key[len(OBJECT_PREFIX) :]] = entry
        with self._lock:
            self._entries = entries

    def _unlock(self, master: bytearray, uuid: bytes) -> None:
        sealer = Sealer(master, uuid)
        for i in range(len(master)):
            master[i] = 0
        with self._lock:
            if self._sealer is not None:
                sealer.wipe()
                return
            self._sealer = sealer
        self._load_entries()

    def _start_unattended(self, unlock_key: bytes) -> None:
        meta = self._meta
        if not meta.initialized:
            return  # init_token wraps the new master key under the unlock key
        if meta.unlock is None:
            log.warning("token %s: unattended, but no unlock wrap yet: it unlocks at the first login", self.namespace)
            return
        try:
            master = unwrap_with_unlock_key(meta.unlock, unlock_key, meta.uuid)
        except WrongSecret:
            raise UnlockKeyError(f"token {self.namespace}: the unlock key does not open this token") from None
        self._unlock(master, meta.uuid)

    # --- TokenStore: state ---------------------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self._meta.initialized

    @property
    def label(self) -> bytes:
        return self._meta.label

    @property
    def user_pin_initialized(self) -> bool:
        return self._meta.user is not None

    @property
    def unlocked(self) -> bool:
        return self._sealer is not None

    @property
    def unattended(self) -> bool:
        return self._unlock_key is not None

    def pin_flags(self) -> int:
        meta = self._meta
        limit = self.options.max_pin_failures
        flags = 0
        for wrap, failures, low, final, locked in (
            (meta.user, meta.user_failures, TokenFlag.USER_PIN_COUNT_LOW, TokenFlag.USER_PIN_FINAL_TRY,
             TokenFlag.USER_PIN_LOCKED),
            (meta.so, meta.so_failures, TokenFlag.SO_PIN_COUNT_LOW, TokenFlag.SO_PIN_FINAL_TRY,
             TokenFlag.SO_PIN_LOCKED),
        ):  # fmt: skip
            if wrap is None or failures == 0:
                continue
            if failures >= limit:
                flags |= locked
            elif failures == limit - 1:
                flags |= final | low
            else:
                flags |= low
        return int(flags)

    # --- TokenStore: PINs --------------------------------------------------------------------------------------------

    def _verify(self, role: Literal["user", "so"], pin: bytes) -> tuple[bytearray, bytes]:
        """The master key and token uuid when ``pin`` is right; counts the attempt in the store."""
        limit = self.options.max_pin_failures

        def reserve(meta: Meta) -> None:
            if meta.wrap(role) is None:
                if role == "user":
                    raise UserPinNotInitialized()
                raise PinIncorrect("the token is not initialised")
            if meta.failures(role) >= limit:
                raise PinLocked("too many wrong PINs" + (": the SO must set a new one" if role == "user" else ""))
            meta.set_failures(role, meta.failures(role) + 1)

        meta = self._update_meta(reserve)
        wrap = meta.wrap(role)
        assert wrap is not None and wrap.kdf is not None
        try:
            master = unwrap_with_pin(wrap, pin, meta.uuid, role)
        except WrongSecret:
            raise PinIncorrect() from None
        except SealError as exc:
            raise DeviceError("the token's PIN wrap is damaged") from exc
        upgrade = None
        wanted = self._kdf_params()
        if not wrap.kdf.same_cost(wanted):
            upgrade = wrap_with_pin(master, pin, meta.uuid, role, wanted)
        unlock_wrap = None
        if self._unlock_key is not None and meta.unlock is None:
            unlock_wrap = wrap_with_unlock_key(master, self._unlock_key, meta.uuid)

        def succeed(current: Meta) -> None:
            if current.uuid != meta.uuid:
                raise PinIncorrect("the token was re-initialised")
            current.set_failures(role, 0)
            if upgrade is not None and current.wrap(role) == wrap:
                if role == "so":
                    current.so = upgrade
                else:
                    current.user = upgrade
            if unlock_wrap is not None and current.unlock is None:
                current.unlock = unlock_wrap

        self._update_meta(succeed)
        return master, meta.uuid

    @staticmethod
    def _role(user_type: int) -> Literal["user", "so"]:
        return "so" if user_type == CKU.SO else "user"

    def check_pin(self, user_type: int, pin: bytes) -> None:
        master, uuid = self._verify(self._role(user_type), pin)
        self._unlock(master, uuid)
        self._login_holds_key = True

    def init_token(self, so_pin: bytes, label: bytes) -> None:
        self._check_length(so_pin)
        previous = self._read_meta()
        if previous.initialized:
            master, _ = self._verify("so", so_pin)
            for i in range(len(master)):
                master[i] = 0
            previous = self._read_meta()
        # Objects go first: a crash half-way leaves the old token without objects, never a mix.
        for key, record in list(self.raw.scan(self.namespace)):
            if key != META_KEY:
                try:
                    self.raw.delete(self.namespace, key, record.version)
                except VersionConflict:
                    raise DeviceError("the token changed while it was being initialised") from None
        uuid = new_token_uuid()
        master = new_master_key()
        meta = Meta(
            uuid=uuid,
            label=label.ljust(32, b" ")[:32],
            so=wrap_with_pin(master, so_pin, uuid, "so", self._kdf_params()),
            unlock=None if self._unlock_key is None else wrap_with_unlock_key(master, self._unlock_key, uuid),
            version=previous.version,
        )
        try:
            meta.version = self.raw.put(self.namespace, META_KEY, meta.encode(), previous.version)
        except VersionConflict:
            raise DeviceError("the token changed while it was being initialised") from None
        with self._lock:
            if self._sealer is not None:
                self._sealer.wipe()
            # The new master key stays in memory for C_InitPIN: until it (unless a login holds the key) or lock().
            self._sealer = Sealer(master, uuid)
            self._login_holds_key = False
            self._entries = {}
            self._meta = meta
        for i in range(len(master)):
            master[i] = 0
        self._describe()

    def init_pin(self, pin: bytes) -> None:
        self._check_length(pin)
        with self._lock:
            sealer = self._sealer
        if sealer is None:
            raise UserNotLoggedIn("the token is locked: the SO logs in first")
        wrap = wrap_with_pin(sealer.master_key, pin, sealer.token_uuid, "user", self._kdf_params())

        def change(meta: Meta) -> None:
            if meta.uuid != sealer.token_uuid:
                raise DeviceError("the token was re-initialised")
            meta.user = wrap
            meta.user_failures = 0

        self._update_meta(change)
        if not self._login_holds_key:
            self.lock()  # the start-up initialisation (init_token, init_pin) leaves the token locked

    def set_pin(self, user_type: int, old_pin: bytes, new_pin: bytes) -> None:
        self._check_length(new_pin)
        role = self._role(user_type)
        master, uuid = self._verify(role, old_pin)
        try:
            wrap = wrap_with_pin(master, new_pin, uuid, role, self._kdf_params())
        finally:
            for i in range(len(master)):
                master[i] = 0

        def change(meta: Meta) -> None:
            if meta.uuid != uuid:
                raise DeviceError("the token was re-initialised")
            if role == "so":
                meta.so = wrap
            else:
                meta.user = wrap

        self._update_meta(change)

    def lock(self) -> None:
        if self._unlock_key is not None:
            return  # unattended: stays unlocked
        with self._lock:
            sealer, self._sealer = self._sealer, None
            self._login_holds_key = False
            if sealer is None:
                return
            sealer.wipe()
            # Forget what only the master key could read; public objects stay.
            self._entries = {
                oid: entry if entry.attrs is None or not self._needs_key(entry.attrs) else Entry(entry.version, None)
                for oid, entry in self._entries.items()
            }

    @staticmethod
    def _needs_key(attrs: Attributes) -> bool:
        return attrs.get(CKA.PRIVATE) is True or any(is_secret(attrs, a) for a in attrs)

    # --- TokenStore: objects -------------------------------------------------------------------------------------

    def objects(self) -> Mapping[bytes, Attributes]:
        with self._lock:
            return {oid: dict(e.attrs) for oid, e in self._entries.items() if e.attrs is not None}

    def load_object(self, oid: bytes) -> Attributes | None:
        key = self._record_key(oid)
        record = self.raw.get(self.namespace, key)
        with self._lock:
            sealer = self._sealer
        if record is None:
            with self._lock:
                self._entries.pop(oid, None)
            return None
        entry = self._read_entry(key, record, sealer)
        with self._lock:
            seen = self._entries.get(oid)
            if seen is not None and record.version < seen.version:
                # A re-read that raced with a newer write (or a record that went back): keep the newer state.
                if record.version < seen.version - 1 or seen.attrs is None:
                    log.error("token %s: object record %s went back in version: ignored", self.namespace, key.hex())
                return None if seen.attrs is None else dict(seen.attrs)
            self._entries[oid] = entry
        return None if entry.attrs is None else dict(entry.attrs)

    def current(self, oid: bytes) -> Attributes | None:
        with self._lock:
            entry = self._entries.get(oid)
            return None if entry is None or entry.attrs is None else dict(entry.attrs)

    def put_object(self, oid: bytes, attrs: Attributes) -> None:
        key = self._record_key(oid)
        with self._lock:
            sealer = self._sealer
            if sealer is None:
                raise UserNotLoggedIn("the token is locked: log in to write token objects")
            seen = self._entries.get(oid)
            expected = ABSENT if seen is None else seen.version
            value = ObjectRecord.seal(sealer, key, expected + 1, attrs).encode()
            version = self.raw.put(self.namespace, key, value, expected)
            self._entries[oid] = Entry(version, dict(attrs))

    def delete_object(self, oid: bytes) -> None:
        with self._lock:
            seen = self._entries.get(oid)
            if seen is None:
                return
            self.raw.delete(self.namespace, self._record_key(oid), seen.version)
            del self._entries[oid]

    def watch(self, callback: Callable[[bytes], None]) -> None:
        def changed(namespace: str, key: bytes) -> None:
            if namespace != self.namespace:
                return
            if key == META_KEY:
                try:
                    meta = self._read_meta()
                except Exception:
                    log.exception("token %s: cannot re-read the metadata", self.namespace)
                    return
                with self._lock:
                    self._meta = meta
            elif key.startswith(OBJECT_PREFIX):
                callback(key[len(OBJECT_PREFIX) :])

        self.raw.subscribe(changed)

    def close(self) -> None:
        with self._lock:
            if self._sealer is not None:
                self._sealer.wipe()
                self._sealer = None
        if self._owns_raw:
            self.raw.close()


# --- the provider ------------------------------------------------------------------------------------------------------------


def open_raw_store(options: SoftwareOptions) -> RawStore:
    """The raw store the options name (``backend`` with ``path`` or ``dsn``)."""
    if options.backend == "postgresql":
        return open_store(options.backend, {"dsn": options.dsn})
    if options.backend == "memory":
        return open_store(options.backend, {"name": options.path or ""})
    return open_store(options.backend, {"path": options.path})


def default_namespace(slot_id: int) -> str:
    return f"slot-{slot_id}"


class SoftwareProvider(Provider):
    name = "software"
    options_type = SoftwareOptions

    def __init__(self, slot_id: int, options: SoftwareOptions) -> None:
        super().__init__(slot_id, options)
        self.options: SoftwareOptions = options

    def open_store(self) -> TokenStore:
        unlock_key = read_unlock_key(self.options)
        raw = open_raw_store(self.options)
        try:
            return SoftwareStore(
                raw,
                self.options.namespace or default_namespace(self.slot_id),
                self.options,
                unlock_key=unlock_key,
                serial=self.options.serial,
                owns_raw=False,  # shared by every slot on the same store: closed by close()
            )
        except BaseException:
            close_stores()
            raise

    def close(self) -> None:
        close_stores()
