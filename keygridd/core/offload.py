"""Offload and Forward: how sans-I/O core methods hand work to their caller.

A core method that must compute something slow (an RSA private-key operation,
key generation, a provider's blocking call) is a generator: it yields
``Offload(fn, thread)`` and receives ``fn()``'s result (or has its exception
thrown in). ``run_inline`` drives such a generator synchronously, for tests and
for callers without threads; the server drives it with trio worker threads.
A passthrough slot's methods yield ``Forward(backend, method, args)`` instead:
a call to the module behind the token, which the server starts from its loop
(``Backend.submit``) or awaits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from keygridd.mechanisms.base import EcdsaJob

T = TypeVar("T")


@dataclass(slots=True)  # not frozen: one is made per cryptographic call, and a frozen one is slower to make
class Offload:
    fn: Callable[[], Any]
    thread: bool  # True: run in a worker thread; False: cheap enough to run inline
    delay: float = 0.0  # seconds to wait first, without blocking anyone else (PIN throttling)
    job: EcdsaJob | None = None  # what fn computes, for the server's signer (precomputed nonce or thread)


Done = Callable[[Any, Exception | None], None]  # a started call's result, or its error


class ReplyWatcher(Protocol):
    """Who reads a started call's reply: the server's reactor calls ``on_readable`` in its own turn
    while ``fd`` is readable, until ``unwatch_reply``."""

    def watch_reply(self, fd: int, on_readable: Callable[[], None]) -> None: ...

    def unwatch_reply(self, fd: int) -> None: ...


class Backend(Protocol):
    """The module behind a passthrough token (the provider's link to its worker process)."""

    @property
    def generation(self) -> int:
        """Bumped each time the worker restarts: module handles of older generations are gone."""

    async def call(self, method: str, args: Sequence[Any]) -> Any:
        """Run one module call; raise the module's PKCS11Error."""

    def submit(self, method: str, args: Sequence[Any], done: Done, watcher: ReplyWatcher) -> bool:
        """Start one module call without waiting, if it can go out at once: True, and ``done(result,
        error)`` is called later from the loop; False when nothing went out (``call`` it instead)."""


def _always() -> bool:
    return True


# May a backend poll for its answer now, holding the event loop, rather than sleep? The server sets a
# check that no client has a request waiting; a backend asks on each turn of its poll.
may_busy_poll: ContextVar[Callable[[], bool]] = ContextVar("may_busy_poll", default=_always)


@dataclass(frozen=True, slots=True)
class Forward:
    """Run ``method(*args)`` in the token's module and send back its result (or throw its error)."""

    backend: Backend
    method: str
    args: list[Any]


Work = Generator[Offload | Forward, Any, T]


def run_inline(result: Any) -> Any:
    """Drive a core method's result to completion on the calling thread."""
    if not isinstance(result, Generator):
        return result
    gen: Generator[Offload | Forward, Any, Any] = result
    try:
        request = next(gen)
        while True:
            if isinstance(request, Forward):
                raise TypeError("module calls (Forward) need an async caller")
            try:
                if request.delay:
                    time.sleep(request.delay)
                value = request.fn()
            except BaseException as exc:
                request = gen.throw(exc)
            else:
                request = gen.send(value)
    except StopIteration as stop:
        return stop.value
