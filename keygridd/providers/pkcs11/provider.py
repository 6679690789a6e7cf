"""Provider ``pkcs11``: a token of any PKCS#11 module (an HSM's, SoftHSM2) as a KeyGrid slot.

Options (``keygrid.yaml.example`` documents each):

* ``module`` — path of the PKCS#11 module; ``environment`` — variables its
  worker process gets (``SOFTHSM2_CONF``, a vendor's config path).
* ``token_label`` or ``token_serial`` — which of the module's tokens.
* The user PIN, optionally, from one source: ``pin_file``, ``pin_env``,
  ``pin_credential`` (systemd ``LoadCredential=``) or ``pin`` (in the file).
  With a PIN the module is logged in from start (unattended) and clients'
  PINs are checked against it; without one the first client's PIN logs it in.
* ``max_concurrency`` — module calls at once (default: 4 when the module takes
  ``CKF_OS_LOCKING_OK``, else 1); ``call_timeout_seconds``;
  ``health_interval_seconds``.

Slots naming the same module and environment share one worker process. The
worker is supervised (``supervisor.py``); this provider checks the token's
health every interval: a module that does not answer makes the slot not
ready, a token that went away is looked for again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trio

from keygridd.core.model import Peer
from keygridd.core.offload import Forward, Offload
from keygridd.core.remote import RemoteToken
from keygridd.pkcs11.errors import (
    DeviceError,
    DeviceRemoved,
    PKCS11Error,
    SlotIdInvalid,
    TokenNotPresent,
    TokenNotRecognized,
)
from keygridd.providers.base import PassthroughProvider
from keygridd.providers.pkcs11.supervisor import START_TIMEOUT, ModuleWorker, WorkerFailed

log = logging.getLogger("keygridd.pkcs11")

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
_GONE = (TokenNotPresent, SlotIdInvalid, DeviceRemoved, TokenNotRecognized)


@dataclass(frozen=True)
class Pkcs11Options:
    module: str
    token_label: str | None = None
    token_serial: str | None = None
    pin: str | None = None
    pin_env: str | None = None
    pin_file: str | None = None
    pin_credential: str | None = None
    max_concurrency: int | None = None
    call_timeout_seconds: float = 30.0
    health_interval_seconds: float = 5.0
    environment: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.module:
            raise ValueError("module: the path of a PKCS#11 module is needed")
        if (self.token_label is None) == (self.token_serial is None):
            raise ValueError("give token_label or token_serial (exactly one)")
        sources = [s for s in (self.pin, self.pin_env, self.pin_file, self.pin_credential) if s is not None]
        if len(sources) > 1:
            raise ValueError("give at most one of pin, pin_env, pin_file, pin_credential")
        if self.pin_credential is not None and (
            not self.pin_credential or "/" in self.pin_credential or self.pin_credential in (".", "..")
        ):
            raise ValueError("pin_credential is a credential name, not a path")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.call_timeout_seconds <= 0 or self.health_interval_seconds <= 0:
            raise ValueError("call_timeout_seconds and health_interval_seconds must be > 0")


class PinSourceError(Exception):
    """The configured PIN source cannot be read."""


def read_pin(options: Pkcs11Options, environ: dict[str, str] | None = None) -> bytes | None:
    """The user PIN from the configured source, or None (clients log the module in)."""
    env = os.environ if environ is None else environ
    if options.pin is not None:
        return options.pin.encode()
    if options.pin_env is not None:
        value = env.get(options.pin_env)
        if value is None:
            raise PinSourceError(f"pin_env: ${options.pin_env} is not set")
        return value.encode()
    if options.pin_file is not None:
        path, what = Path(options.pin_file), f"pin_file {options.pin_file}"
    elif options.pin_credential is not None:
        directory = env.get(CREDENTIALS_ENV)
        if not directory:
            raise PinSourceError(f"pin_credential {options.pin_credential!r}: ${CREDENTIALS_ENV} is not set")
        path, what = Path(directory) / options.pin_credential, f"pin credential {options.pin_credential!r}"
    else:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise PinSourceError(f"{what}: cannot read: {exc.strerror or exc}") from None


async def drive(work: Generator[Offload | Forward, Any, Any]) -> Any:
    """Run a core generator whose requests are module calls (the provider's own, outside any client call)."""
    try:
        request = next(work)
        while True:
            if not isinstance(request, Forward):
                raise TypeError("only module calls are expected here")
            try:
                value = await request.backend.call(request.method, request.args)
            except Exception as exc:
                request = work.throw(exc)
            else:
                request = work.send(value)
    except StopIteration as stop:
        return stop.value


class Pkcs11Provider(PassthroughProvider):
    name = "pkcs11"
    options_type = Pkcs11Options

    # One worker per (module, environment), shared by the slots that name it; started by the first.
    workers: ClassVar[dict[tuple[str, tuple[tuple[str, str], ...]], ModuleWorker]] = {}
    started: ClassVar[set[tuple[str, tuple[tuple[str, str], ...]]]] = set()
    locks: ClassVar[dict[tuple[str, tuple[tuple[str, str], ...]], trio.Lock]] = {}

    def __init__(self, slot_id: int, options: Pkcs11Options) -> None:
        super().__init__(slot_id, options)
        self.options: Pkcs11Options = options
        self.key = (options.module, tuple(sorted(options.environment.items())))
        worker = self.workers.get(self.key)
        if worker is None:
            worker = ModuleWorker(
                options.module,
                lanes=options.max_concurrency,
                call_timeout=options.call_timeout_seconds,
                env=dict(options.environment),
            )
            self.workers[self.key] = worker
        self.worker = worker
        self.remote: RemoteToken | None = None
        self.recycled = 0.0  # when this slot last had the worker restarted to find its token

    def token(self, description: str, allows: Callable[[Peer], bool]) -> RemoteToken:
        options = self.options
        self.remote = RemoteToken(
            slot_id=self.slot_id,
            description=description,
            provider=self.name,
            allows=allows,
            backend=self.worker,
            label=options.token_label,
            serial=options.token_serial,
            configured_pin=read_pin(options),
        )
        return self.remote

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = self.remote
        assert token is not None, "token() first"
        try:
            with trio.move_on_after(START_TIMEOUT + self.options.call_timeout_seconds):
                await self.check(token)
            task_status.started()
            while True:
                await trio.sleep(self.options.health_interval_seconds)
                await self.check(token)
        finally:
            if self.workers.get(self.key) is self.worker:
                del self.workers[self.key]
                self.started.discard(self.key)
                with trio.CancelScope(shield=True):
                    await self.worker.aclose()

    async def _start_worker(self) -> bool:
        """Start the shared worker if no slot has yet; False (logged) when the module cannot be loaded."""
        async with self.locks.setdefault(self.key, trio.Lock()):
            if self.key in self.started:
                return True
            try:
                await self.worker.start()
            except WorkerFailed as exc:
                log.error("slot %d: module %s: %s", self.slot_id, self.options.module, exc)
                return False
            self.started.add(self.key)
            return True

    async def check(self, token: RemoteToken) -> None:
        """One health check: find the token (again) if needed, else ask the module about it."""
        was_ready = token.ready
        if not await self._start_worker():
            token.answering = False
            return
        try:
            # No deadline of our own: the supervisor bounds each call, and counts the ones that time out
            # (a call cancelled from outside would leave its lane in service, waiting on a dead reply).
            if not token.current():
                await drive(token.connect())
            elif await self.worker.call("KG_FindToken", [token.label, token.serial]) != token.module_slot:
                raise TokenNotPresent("the token is no longer where it was")
            token.answering = True
        except _GONE:
            token.module_slot = None
            token.generation = -1  # look for it again at the next check
        except (PKCS11Error, WorkerFailed) as exc:
            if isinstance(exc, PKCS11Error) and not isinstance(exc, DeviceError):
                token.answering = True
            else:
                token.answering = False
        if token.module_slot is None and token.answering:
            # Modules read their token list at C_Initialize (SoftHSM2 marks a token whose files went
            # away as failed for good): a fresh worker, now and then, finds a token that came back.
            now = trio.current_time()
            if now - self.recycled >= max(5 * self.options.health_interval_seconds, 1.0):
                self.recycled = now
                self.worker.recycle(f"token {token.label or token.serial} is missing")
        if token.ready != was_ready:
            level, state = (logging.INFO, "ready") if token.ready else (logging.WARNING, "not ready")
            log.log(level, "slot %d: token %s is %s", self.slot_id, token.label or token.serial, state)
