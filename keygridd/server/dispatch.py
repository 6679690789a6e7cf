"""The dispatcher: one request in, one (rv, result, message) out.

This is the one place where exceptions become CK_RV codes: a PKCS11Error
gives its code (and a partial result where the spec returns one); anything
else is an internal bug, logged with its traceback and answered with
CKR_GENERAL_ERROR. Offload requests from the core run inline or in a worker
thread behind the daemon's CapacityLimiter. Provider effects (injected
latency or errors) are applied here, before the core sees the call. Calls of
passthrough slots go to the core's ``Passthrough``; the module calls they
yield (``Forward``) are awaited here. An ECDSA signature is made with a
precomputed nonce, or left pending for the signing thread beside the loop
(``keygridd.signer``, see ``hand_over``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from types import GeneratorType
from typing import Any

import trio

from keygridd.core.core import Core
from keygridd.core.model import Application
from keygridd.core.offload import Forward, Offload
from keygridd.pkcs11 import CKR
from keygridd.pkcs11.errors import FunctionNotSupported, PKCS11Error, error_for
from keygridd.protocol import codec
from keygridd.protocol.calls import BY_NAME, Call
from keygridd.providers.base import Effect, Provider
from keygridd.signer import Signer
from keygridd.storage.base import StoreUnavailable, VersionConflict

log = logging.getLogger("keygridd.dispatch")

Reply = tuple[int, Any, str | None]

_OK = CKR.OK  # a module global is read faster than an enum member, and this is read on every call


@dataclass
class Pending:
    """A call that must wait: for an injected delay, or for work in a worker thread."""

    app: Application
    call: Call
    args: list[Any]
    effect: Effect | None
    gen: Generator[Offload | Forward, Any, Any] | None = None
    request: Offload | Forward | None = None


@dataclass(frozen=True, slots=True)
class _Sent:
    """A value to send into a generator (wrapped so that None can be sent too)."""

    value: Any


def _never() -> bool:
    return False


class Dispatcher:
    def __init__(
        self, core: Core, providers: Mapping[int, Provider], limiter: trio.CapacityLimiter, max_attributes: int
    ) -> None:
        self.core = core
        self.providers = providers
        self.effects = {slot_id: p for slot_id, p in providers.items() if p.injects_effects()}
        self.limiter = limiter
        self.max_attributes = max_attributes
        # An ECDSA signature (an Offload with a job) is made with a nonce the signer precomputed when one is
        # ready; else it is left to the connection, which hands it to the signer's thread, while hand_over()
        # says so (several clients are busy); else it is computed inline.
        self.signer: Signer | None = None
        self.hand_over: Callable[[], bool] = _never

    def slot_of(self, app: Application, call: Call, args: list[Any]) -> int | None:
        if not call.args:
            return None
        first = call.args[0].name
        if first == "slot":
            return int(args[0])
        if first == "session":
            session = app.sessions.get(args[0])
            return session.slot_id if session is not None else None
        return None

    def prepare(self, app: Application, method: object, raw_args: object) -> tuple[Call, list[Any]]:
        call = BY_NAME.get(method) if isinstance(method, str) and method != "hello" else None
        if call is None:
            raise FunctionNotSupported(f"unknown method {method!r}")
        return call, codec.decode_args(call, raw_args, self.max_attributes)

    def start(self, app: Application, call: Call, args: list[Any]) -> Reply | Pending:
        """Run as much of the call as can run now: a reply, or what is left to await."""
        try:
            # No slot to look up when none injects effects or forwards to a module: every call goes to the core.
            slot_id = self.slot_of(app, call, args) if self.effects or self.core.remote else None
            provider = self.effects.get(slot_id) if slot_id is not None else None
            if provider is not None:
                effect = provider.effect(call.name)
                if effect is not None:
                    return Pending(app, call, args, effect)
            if slot_id is not None and slot_id in self.core.remote:
                result = self.core.passthrough.run(app, call.name, args)
            else:
                result = getattr(self.core, call.name)(app, *args)
            if isinstance(result, GeneratorType):  # not the Generator ABC: its check is slow
                return self._advance(app, call, result, None, None)
            return _OK, result, None
        except Exception as exc:
            return self.reply_for(call, exc)

    def _advance(
        self,
        app: Application,
        call: Call,
        gen: Generator[Offload | Forward, Any, Any],
        resume: _Sent | None,
        error: Exception | None,
    ) -> Reply | Pending:
        """Drive a core generator inline until it finishes or asks for a worker thread."""
        try:
            if error is not None:
                request = gen.throw(error)
            elif resume is not None:
                request = gen.send(resume.value)
            else:
                request = next(gen)
            while isinstance(request, Offload) and not request.thread and not request.delay:
                if request.job is not None and self.signer is not None:
                    signature = self.signer.sign_now(request.job)
                    if signature is not None:
                        request = gen.send(signature)
                        continue
                    if self.hand_over():
                        break
                try:
                    value = request.fn()
                except Exception as exc:
                    request = gen.throw(exc)
                else:
                    request = gen.send(value)
            return Pending(app, call, [], None, gen, request)
        except StopIteration as stop:
            return _OK, stop.value, None
        except Exception as exc:
            return self.reply_for(call, exc)

    def resume(self, pending: Pending, value: Any, error: Exception | None) -> Reply | Pending:
        """Go on with a call whose module call (its ``Forward``) completed on the loop."""
        assert pending.gen is not None
        return self._advance(pending.app, pending.call, pending.gen, None if error else _Sent(value), error)

    async def finish(self, pending: Pending) -> Reply:
        """Await the rest of a call that ``start`` could not complete."""
        try:
            if pending.effect is not None:
                if pending.effect.delay:
                    await trio.sleep(pending.effect.delay)
                if pending.effect.error is not None:
                    raise error_for(pending.effect.error)("injected by the slot's scenario")
                result = getattr(self.core, pending.call.name)(pending.app, *pending.args)
                if not isinstance(result, Generator):
                    return CKR.OK, result, None
                outcome = self._advance(pending.app, pending.call, result, None, None)
            else:
                outcome = pending
            while isinstance(outcome, Pending):
                gen, request = outcome.gen, outcome.request
                assert gen is not None and request is not None
                try:
                    if isinstance(request, Forward):
                        value = await request.backend.call(request.method, request.args)
                    else:
                        if request.delay:
                            await trio.sleep(request.delay)
                        if request.thread:
                            value = await trio.to_thread.run_sync(request.fn, limiter=self.limiter)
                        else:
                            value = request.fn()
                except Exception as exc:
                    outcome = self._advance(outcome.app, outcome.call, gen, None, exc)
                else:
                    outcome = self._advance(outcome.app, outcome.call, gen, _Sent(value), None)
            return outcome
        except Exception as exc:
            return self.reply_for(pending.call, exc)

    async def dispatch(self, app: Application, call: Call, args: list[Any]) -> Reply:
        outcome = self.start(app, call, args)
        if isinstance(outcome, Pending):
            return await self.finish(outcome)
        return outcome

    def reply_for(self, call: Call, exc: Exception) -> Reply:
        """The one place an exception becomes a CK_RV."""
        if isinstance(exc, PKCS11Error):
            return exc.rv, exc.result, exc.message or None
        if isinstance(exc, VersionConflict):
            return CKR.FUNCTION_FAILED, None, "the object was changed by another writer: read it again"
        if isinstance(exc, StoreUnavailable):
            log.warning("%s: storage unavailable: %s", call.name, exc)
            return CKR.DEVICE_ERROR, None, "the token's storage is unavailable"
        log.error("internal error in %s", call.name, exc_info=exc)
        return CKR.GENERAL_ERROR, None, "internal error (logged by keygridd)"
