"""The dispatcher: one request in, one (rv, result, message) out.

This is the one place where exceptions become CK_RV codes: a PKCS11Error
gives its code (and a partial result where the spec returns one); anything
else is an internal bug, logged with its traceback and answered with
CKR_GENERAL_ERROR. Offload requests from the core run inline or in a worker
thread behind the daemon's CapacityLimiter. Provider effects (injected
latency or errors) are applied here, before the core sees the call.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping
from typing import Any

import trio

from keygridd.core.core import Core
from keygridd.core.model import Application
from keygridd.core.offload import Offload
from keygridd.pkcs11 import CKR
from keygridd.pkcs11.errors import FunctionNotSupported, PKCS11Error, error_for
from keygridd.protocol import codec
from keygridd.protocol.calls import BY_NAME, Call
from keygridd.providers.base import Provider

log = logging.getLogger("keygridd.dispatch")

Reply = tuple[int, Any, str | None]


class Dispatcher:
    def __init__(
        self, core: Core, providers: Mapping[int, Provider], limiter: trio.CapacityLimiter, max_attributes: int
    ) -> None:
        self.core = core
        self.providers = providers
        self.limiter = limiter
        self.max_attributes = max_attributes

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

    async def dispatch(self, app: Application, call: Call, args: list[Any]) -> Reply:
        try:
            slot_id = self.slot_of(app, call, args)
            provider = self.providers.get(slot_id) if slot_id is not None else None
            if provider is not None:
                effect = provider.effect(call.name)
                if effect is not None:
                    if effect.delay:
                        await trio.sleep(effect.delay)
                    if effect.error is not None:
                        raise error_for(effect.error)("injected by the slot's scenario")
            result = getattr(self.core, call.name)(app, *args)
            if isinstance(result, Generator):
                result = await self.drive(result)
            return CKR.OK, result, None
        except PKCS11Error as exc:
            return exc.rv, exc.result, exc.message or None
        except Exception:
            log.exception("internal error in %s", call.name)
            return CKR.GENERAL_ERROR, None, "internal error (logged by keygridd)"

    async def drive(self, gen: Generator[Offload, Any, Any]) -> Any:
        try:
            request = next(gen)
            while True:
                try:
                    if request.thread:
                        value = await trio.to_thread.run_sync(request.fn, limiter=self.limiter)
                    else:
                        value = request.fn()
                except Exception as exc:
                    request = gen.throw(exc)
                else:
                    request = gen.send(value)
        except StopIteration as stop:
            return stop.value
