"""Which providers the dispatcher asks for injected effects on each call."""

from __future__ import annotations

import trio

from keygridd.core.core import Core
from keygridd.core.store import TokenStore
from keygridd.providers.base import Effect, Provider
from keygridd.providers.memory import MemoryOptions, MemoryProvider, MemoryStore, Scenario
from keygridd.server.dispatch import Dispatcher


class Plain(Provider):
    name = "plain"

    def open_store(self) -> TokenStore:
        return MemoryStore(MemoryOptions(), self.slot_id)


class Injecting(Plain):
    name = "injecting"

    def effect(self, method: str) -> Effect | None:
        return Effect(0.0, 0x30)


def test_only_providers_that_may_inject_are_asked() -> None:
    providers: dict[int, Provider] = {
        0: MemoryProvider(0, MemoryOptions()),
        1: MemoryProvider(1, MemoryOptions(scenarios=(Scenario(latency_ms=5),))),
        2: Plain(2, None),
        3: Injecting(3, None),  # overrides effect() only: asked, as before
    }
    assert [slot for slot, p in providers.items() if p.injects_effects()] == [1, 3]
    dispatcher = Dispatcher(Core([]), providers, trio.CapacityLimiter(1), 16)
    assert sorted(dispatcher.effects) == [1, 3]
