"""``keygridd.runqueue.tasks_runnable`` answers as trio's own statistics do, with and without trio's run queue."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from keygridd import runqueue


def public() -> bool:
    return trio.lowlevel.current_statistics().tasks_runnable > 0


async def states() -> list[tuple[bool, bool]]:
    """(tasks_runnable, trio's answer) with every other task blocked, then with one just started."""
    seen = []
    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        seen.append((runqueue.tasks_runnable(), public()))
        nursery.start_soon(trio.sleep_forever)  # runnable until the scheduler's next batch
        seen.append((runqueue.tasks_runnable(), public()))
        await trio.testing.wait_all_tasks_blocked()
        seen.append((runqueue.tasks_runnable(), public()))
        nursery.cancel_scope.cancel()
    return seen


async def test_it_reads_trios_run_queue() -> None:
    assert runqueue._RUN_CONTEXT is not None, "this trio has no GLOBAL_RUN_CONTEXT: tasks_runnable is slow again"
    assert await states() == [(False, False), (True, True), (False, False)]


async def test_without_the_run_queue_it_asks_trios_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runqueue, "_RUN_CONTEXT", None)
    assert await states() == [(False, False), (True, True), (False, False)]
