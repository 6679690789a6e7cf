"""The filesystem raw store: one file per record, written atomically.

Layout under the root directory (0700)::

    ROOT/<namespace, percent-encoded>/          0700, e.g. ``token%2F1b4e...``
    ROOT/<namespace>/<key as lowercase hex>     0600, version (8 bytes, big-endian) + payload
    ROOT/<namespace>/.lock                      0600, flock'ed by every writer of the namespace
    ROOT/<namespace>/.tmp-<random>              a write in progress (or left by a crash)

Rules:

- A write goes to a temporary file in the same directory, is fsync'ed, renamed
  over the record (``os.replace``) and the directory is fsync'ed: a reader
  sees the old record or the new one, never a torn one, and the write is
  durable when ``put`` returns. ``delete`` fsyncs the directory too.
- Compare-and-swap runs under a per-namespace thread lock plus an exclusive
  ``fcntl.flock`` on the namespace's lock file, so threads and processes
  sharing the directory cannot lose each other's updates. Reads take no lock.
- Temporary files left by a crash are removed when a store opens (under the
  namespace lock, so another process's write in progress is never touched);
  everything whose name starts with a dot is ignored otherwise.
- Namespace directories stay when their last record goes (another process may
  hold their lock file); ``namespaces()`` lists only those holding records.
- OS errors become ``StoreUnavailable`` naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
from collections.abc import Iterator
from urllib.parse import quote, unquote

from keygridd.storage.base import ABSENT, RawStore, Record, StoreError, StoreUnavailable, VersionConflict
from keygridd.storage.memory import check_name, check_version

LOCK_NAME = ".lock"
TEMP_PREFIX = ".tmp-"
_VERSION_BYTES = 8
_HEX = frozenset("0123456789abcdef")


def directory_name(namespace: str) -> str:
    """The namespace as one safe directory name: percent-encoded, never starting with a dot."""
    name = quote(namespace, safe="")
    return "%2E" + name[1:] if name.startswith(".") else name


def _namespace_of(name: str) -> str | None:
    """The namespace a directory name stands for, or None if it is not one we would write."""
    if name.startswith("."):
        return None
    try:
        namespace = unquote(name, errors="strict")
    except UnicodeDecodeError:
        return None
    return namespace if directory_name(namespace) == name else None


def _key_of(name: str) -> bytes | None:
    """The key a record file name stands for, or None for lock, temporary and foreign files."""
    if not name or len(name) % 2 or not _HEX.issuperset(name):
        return None
    return bytes.fromhex(name)


class _Namespace:
    """The writer lock of one namespace: a thread lock and the flock'ed lock file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd: int | None = None


class FilesystemStore(RawStore):
    """Versioned records as files under ``path`` (a directory, created 0700 if missing).

    ``durable=False`` skips every fsync: for bulk loads and benchmarks only.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.path = os.path.realpath(os.fspath(path))
        self._durable = durable
        self._lock = threading.Lock()
        self._namespaces: dict[str, _Namespace] = {}
        self.closed = False
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError(f"no write access to {self.path}")
            self._remove_temporary_files()
        except (OSError, ValueError) as exc:
            raise StoreUnavailable(f"cannot open filesystem store at {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FilesystemStore({self.path!r})"

    # -- records -------------------------------------------------------------------------------

    def get(self, namespace: str, key: bytes) -> Record | None:
        check_name(namespace, key)
        self._check_open()
        try:
            return self._read(self._record_path(namespace, key))
        except OSError as exc:
            raise self._unavailable("read", namespace, exc) from exc

    def put(self, namespace: str, key: bytes, value: bytes, expected: int) -> int:
        check_name(namespace, key)
        check_version(expected)
        self._check_open()
        value = bytes(value)
        try:
            with self._locked(namespace):
                current = self._read(self._record_path(namespace, key))
                found = ABSENT if current is None else current.version
                if found != expected:
                    raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
                self._write(namespace, key, expected + 1, value)
        except OSError as exc:
            raise self._unavailable("write", namespace, exc) from exc
        return expected + 1

    def delete(self, namespace: str, key: bytes, expected: int) -> None:
        check_name(namespace, key)
        check_version(expected)
        self._check_open()
        path = self._record_path(namespace, key)
        try:
            with self._locked(namespace):
                current = self._read(path)
                found = ABSENT if current is None else current.version
                if current is None or found != expected:
                    raise VersionConflict(f"{namespace}: record is at version {found}, not {expected}")
                os.unlink(path)
                self._sync_directory(os.path.dirname(path))
        except OSError as exc:
            raise self._unavailable("delete", namespace, exc) from exc

    def restore(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        check_name(namespace, key)
        check_version(version, "restored")
        if version < 1:
            raise ValueError(f"restored version must be >= 1, got {version}")
        self._check_open()
        value = bytes(value)
        try:
            with self._locked(namespace):
                current = self._read(self._record_path(namespace, key))
                if current is not None:
                    raise VersionConflict(f"{namespace}: record exists at version {current.version}")
                self._write(namespace, key, version, value)
        except OSError as exc:
            raise self._unavailable("write", namespace, exc) from exc

    def scan(self, namespace: str) -> Iterator[tuple[bytes, Record]]:
        check_name(namespace)
        self._check_open()
        directory = os.path.join(self.path, directory_name(namespace))
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return iter(())
        except OSError as exc:
            raise self._unavailable("scan", namespace, exc) from exc
        keys = sorted(key for key in map(_key_of, names) if key is not None)
        return self._scan(namespace, directory, keys)

    def _scan(self, namespace: str, directory: str, keys: list[bytes]) -> Iterator[tuple[bytes, Record]]:
        for key in keys:
            try:
                record = self._read(os.path.join(directory, key.hex()))
            except OSError as exc:
                raise self._unavailable("scan", namespace, exc) from exc
            if record is not None:  # deleted since the listing
                yield key, record

    def namespaces(self) -> list[str]:
        self._check_open()
        found: list[str] = []
        try:
            with os.scandir(self.path) as entries:
                directories = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
            for entry in directories:
                namespace = _namespace_of(entry.name)
                if namespace is None:
                    continue
                with os.scandir(entry.path) as records:
                    if any(_key_of(record.name) is not None for record in records):
                        found.append(namespace)
        except OSError as exc:
            raise StoreUnavailable(f"filesystem store at {self.path}: listing failed: {exc}") from exc
        return sorted(found)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            namespaces = list(self._namespaces.values())
        for ns in namespaces:
            with ns.lock:
                if ns.fd is not None:
                    os.close(ns.fd)
                    ns.fd = None

    # -- internals -----------------------------------------------------------------------------

    def _record_path(self, namespace: str, key: bytes) -> str:
        return os.path.join(self.path, directory_name(namespace), key.hex())

    def _read(self, path: str) -> Record | None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) < _VERSION_BYTES:
            raise StoreError(f"{path}: corrupt record ({len(raw)} bytes)")
        return Record(int.from_bytes(raw[:_VERSION_BYTES], "big"), raw[_VERSION_BYTES:])

    def _write(self, namespace: str, key: bytes, version: int, value: bytes) -> None:
        """Atomically replace the record file; the caller holds the namespace lock."""
        directory = os.path.join(self.path, directory_name(namespace))
        name = key.hex()
        temporary = os.path.join(directory, TEMP_PREFIX + secrets.token_hex(8))
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                data = memoryview(version.to_bytes(_VERSION_BYTES, "big") + value)
                while data:
                    data = data[os.write(fd, data) :]
                if self._durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, os.path.join(directory, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._sync_directory(directory)

    def _sync_directory(self, directory: str) -> None:
        if not self._durable:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, namespace: str) -> Iterator[None]:
        """Hold the namespace's writer lock (thread lock + flock), creating its directory if needed."""
        with self._lock:
            ns = self._namespaces.setdefault(namespace, _Namespace())
        with ns.lock:
            self._check_open()
            if ns.fd is None:
                ns.fd = self._open_lock_file(namespace)
            fcntl.flock(ns.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(ns.fd, fcntl.LOCK_UN)

    def _open_lock_file(self, namespace: str) -> int:
        directory = os.path.join(self.path, directory_name(namespace))
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        else:
            self._sync_directory(self.path)
        return os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _remove_temporary_files(self) -> None:
        with os.scandir(self.path) as entries:
            directories = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
        for entry in directories:
            namespace = _namespace_of(entry.name)
            if namespace is None:
                continue
            if not any(name.startswith(TEMP_PREFIX) for name in os.listdir(entry.path)):
                continue
            with self._locked(namespace):  # a writer in another process holds it while its temp file exists
                for name in os.listdir(entry.path):
                    if name.startswith(TEMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(entry.path, name))
                self._sync_directory(entry.path)

    def _check_open(self) -> None:
        if self.closed:
            raise StoreUnavailable(f"filesystem store at {self.path} is closed")

    def _unavailable(self, action: str, namespace: str, exc: OSError) -> StoreUnavailable:
        where = os.path.join(self.path, directory_name(namespace))
        return StoreUnavailable(f"filesystem store at {where}: {action} failed: {type(exc).__name__}: {exc}")
