"""Offload: how sans-I/O core methods hand expensive work to their caller.

A core method that must compute something slow (an RSA private-key operation,
key generation, a provider's blocking call) is a generator: it yields
``Offload(fn, thread)`` and receives ``fn()``'s result (or has its exception
thrown in). ``run_inline`` drives such a generator synchronously, for tests and
for callers without threads; the server drives it with trio worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Offload:
    fn: Callable[[], Any]
    thread: bool  # True: run in a worker thread; False: cheap enough to run inline
    delay: float = 0.0  # seconds to wait first, without blocking anyone else (PIN throttling)


Work = Generator[Offload, Any, T]


def run_inline(result: Any) -> Any:
    """Drive a core method's result to completion on the calling thread."""
    if not isinstance(result, Generator):
        return result
    gen: Generator[Offload, Any, Any] = result
    try:
        request = next(gen)
        while True:
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
