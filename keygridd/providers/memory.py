"""Provider ``memory``: tokens in memory, optionally saved to a file; scenarios.

The mock HSM for development and for testing applications. Options:

* ``persist`` — path of a file the token is saved to after every change
  (written atomically: temp file, fsync, rename). The file holds key material
  unencrypted (mode 0600): development only; use the software token for keys
  that matter.
* ``scenarios`` — behaviour injected per call, so a team can test its
  application against a slow or failing HSM: ``latency_ms`` before the call,
  ``error_rate`` (0..1) chance of failing with ``error`` (a CKR name).

PINs are kept as scrypt hashes; ``max_pin_failures`` wrong PINs in a row lock it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import random
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import msgpack

from keygridd.core.store import Attributes, TokenDescription, TokenStore
from keygridd.pkcs11 import CKR, CKU, TokenFlag
from keygridd.pkcs11.errors import PinIncorrect, PinLocked, UserPinNotInitialized
from keygridd.protocol.codec import decode_value, encode_value
from keygridd.providers.base import Effect, Provider


@dataclass(frozen=True)
class Scenario:
    operations: tuple[str, ...] = ()
    latency_ms: float = 0.0
    error_rate: float = 0.0
    error: str = "CKR_DEVICE_ERROR"

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if not self.error.startswith("CKR_") or self.error[4:] not in CKR.__members__:
            raise ValueError(f"error: {self.error!r} is not a CKR_* name")


@dataclass(frozen=True)
class MemoryOptions:
    persist: str | None = None
    scenarios: tuple[Scenario, ...] = ()
    max_pin_failures: int = 10
    serial: str = ""

    def __post_init__(self) -> None:
        if self.max_pin_failures < 1:
            raise ValueError("max_pin_failures must be >= 1")


def _hash(pin: bytes, salt: bytes) -> bytes:
    return hashlib.scrypt(pin, salt=salt, n=1 << 14, r=8, p=1, maxmem=64 << 20)


@dataclass
class _Pin:
    salt: bytes
    digest: bytes
    failures: int = 0

    @classmethod
    def make(cls, pin: bytes) -> _Pin:
        salt = os.urandom(16)
        return cls(salt, _hash(pin, salt))


@dataclass
class _State:
    label: bytes = b" " * 32
    so_pin: _Pin | None = None
    user_pin: _Pin | None = None
    objects: dict[bytes, Attributes] = field(default_factory=dict)


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: Any) -> Any:
        with self._lock:
            return method(self, *args)

    return cast(F, wrapper)


class MemoryStore(TokenStore):
    def __init__(self, options: MemoryOptions, slot_id: int) -> None:
        self.options = options
        self.path = Path(options.persist) if options.persist else None
        self.blocking = self.path is not None
        self.description = TokenDescription(model="memory", serial=options.serial or f"kg-mem-{slot_id}")
        self.state = self._read() if self.path is not None and self.path.exists() else _State()
        # Store methods run in worker threads when persisting: one at a time.
        self._lock = threading.RLock()

    # --- persistence -------------------------------------------------------------------------

    def _read(self) -> _State:
        assert self.path is not None
        raw = msgpack.unpackb(self.path.read_bytes(), raw=False, strict_map_key=False)

        def pin(v: Any) -> _Pin | None:
            return _Pin(v[0], v[1], v[2]) if v else None

        objects = {
            oid: {attr: decode_value(attr, value) for attr, value in pairs} for oid, pairs in raw["objects"].items()
        }
        return _State(raw["label"], pin(raw["so_pin"]), pin(raw["user_pin"]), objects)

    def _save(self) -> None:
        if self.path is None:
            return

        def pin(p: _Pin | None) -> Any:
            return [p.salt, p.digest, p.failures] if p else None

        data = msgpack.packb(
            {
                "version": 1,
                "label": self.state.label,
                "so_pin": pin(self.state.so_pin),
                "user_pin": pin(self.state.user_pin),
                "objects": {
                    oid: [[a, encode_value(v)] for a, v in attrs.items()] for oid, attrs in self.state.objects.items()
                },
            },
            use_bin_type=True,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    # --- TokenStore ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self.state.so_pin is not None

    @property
    def label(self) -> bytes:
        return self.state.label

    @property
    def user_pin_initialized(self) -> bool:
        return self.state.user_pin is not None

    def pin_flags(self) -> int:
        flags = 0
        limit = self.options.max_pin_failures
        for pin, low, final, locked in (
            (
                self.state.user_pin,
                TokenFlag.USER_PIN_COUNT_LOW,
                TokenFlag.USER_PIN_FINAL_TRY,
                TokenFlag.USER_PIN_LOCKED,
            ),
            (self.state.so_pin, TokenFlag.SO_PIN_COUNT_LOW, TokenFlag.SO_PIN_FINAL_TRY, TokenFlag.SO_PIN_LOCKED),
        ):
            if pin is None or pin.failures == 0:
                continue
            if pin.failures >= limit:
                flags |= locked
            elif pin.failures == limit - 1:
                flags |= final | low
            else:
                flags |= low
        return int(flags)

    def _verify(self, record: _Pin, pin: bytes) -> None:
        if record.failures >= self.options.max_pin_failures:
            raise PinLocked("too many wrong PINs: the SO must reset it")
        if hmac.compare_digest(_hash(pin, record.salt), record.digest):
            if record.failures:
                record.failures = 0
                self._save()
            return
        record.failures += 1
        self._save()
        raise PinIncorrect()

    @_locked
    def init_token(self, so_pin: bytes, label: bytes) -> None:
        if self.state.so_pin is not None:
            self._verify(self.state.so_pin, so_pin)
        self.state = _State(label=label, so_pin=_Pin.make(so_pin))
        self._save()

    @_locked
    def check_pin(self, user_type: int, pin: bytes) -> None:
        record = self.state.so_pin if user_type == CKU.SO else self.state.user_pin
        if record is None:
            raise UserPinNotInitialized()
        self._verify(record, pin)

    @_locked
    def init_pin(self, pin: bytes) -> None:
        self.state.user_pin = _Pin.make(pin)
        self._save()

    @_locked
    def set_pin(self, user_type: int, old_pin: bytes, new_pin: bytes) -> None:
        self.check_pin(user_type, old_pin)
        if user_type == CKU.SO:
            self.state.so_pin = _Pin.make(new_pin)
        else:
            self.state.user_pin = _Pin.make(new_pin)
        self._save()

    def objects(self) -> Mapping[bytes, Attributes]:
        return self.state.objects

    @_locked
    def put_object(self, oid: bytes, attrs: Attributes) -> None:
        self.state.objects[oid] = dict(attrs)
        self._save()

    @_locked
    def delete_object(self, oid: bytes) -> None:
        self.state.objects.pop(oid, None)
        self._save()


class MemoryProvider(Provider):
    name = "memory"
    options_type = MemoryOptions

    def __init__(self, slot_id: int, options: MemoryOptions) -> None:
        super().__init__(slot_id, options)
        self._random = random.Random()

    def open_store(self) -> TokenStore:
        return MemoryStore(self.options, self.slot_id)

    def injects_effects(self) -> bool:
        return bool(self.options.scenarios)

    def effect(self, method: str) -> Effect | None:
        for scenario in self.options.scenarios:
            if scenario.operations and method not in scenario.operations:
                continue
            error = None
            if scenario.error_rate and self._random.random() < scenario.error_rate:
                error = int(CKR[scenario.error[4:]])
            return Effect(scenario.latency_ms / 1000.0, error)
        return None
