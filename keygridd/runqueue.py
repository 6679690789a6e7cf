"""Is a trio task runnable? Read from trio's run queue without building its statistics.

The reactor (``server/reactor.py``) and a module lane's reply poll
(``providers/pkcs11/lanes.py``) may busy-poll only while no task is runnable,
and they ask once per poll, that is about once per request.
``trio.lowlevel.current_statistics()`` answers that, but builds every
statistic to do so, walking all of trio's I/O registrations: about 3.4 us a
call here, a tenth of a whole ``C_GenerateRandom`` round trip through the
module. ``tasks_runnable`` reads the length of the run queue that the
statistics report (a private attribute of trio's runner) in 0.1 us, and falls
back to the statistics if a trio release moves it; a test keeps the two
answers equal.
"""

from __future__ import annotations

import importlib

import trio


def _run_context() -> object:
    """trio's per-thread run context, which holds the runner (None if a trio release moves it)."""
    try:
        return getattr(importlib.import_module("trio._core._run"), "GLOBAL_RUN_CONTEXT", None)
    except ImportError:
        return None


_RUN_CONTEXT = _run_context()


def tasks_runnable() -> bool:
    """Is any task of the current trio run waiting in the run queue? (Call it from inside the run.)"""
    runq = getattr(getattr(_RUN_CONTEXT, "runner", None), "runq", None)
    if runq is None:
        return trio.lowlevel.current_statistics().tasks_runnable > 0
    return len(runq) > 0
