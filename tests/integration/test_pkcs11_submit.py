"""Module calls started from the loop (``ModuleWorker.submit``), their replies read by a real reactor.

A real worker on SoftHSM2 (or on the fault module, which hangs or aborts in
C_Sign when the data says so) and ``keygridd.server.reactor.Reactor``
running as in the daemon: results and CKRs, what ``submit`` declines, and a
call that hangs, a worker that dies and a worker that is closed while a
started call is in flight.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from keygridd.pkcs11 import CKM
from keygridd.pkcs11.errors import DeviceError, OperationNotInitialized
from keygridd.pkcs11.params import Mechanism
from keygridd.providers.pkcs11 import supervisor
from keygridd.providers.pkcs11.supervisor import ModuleWorker
from keygridd.server.reactor import Reactor
from tests.integration.test_pkcs11_worker import (
    DIGEST,
    LABEL,
    RW,
    ec_key_pair,
    fault_module,
    login,
    softhsm_env,
    started,
)
from tests.softhsm import SOFTHSM_MODULE

pytestmark = pytest.mark.softhsm

__all__ = ["fault_module", "softhsm_env"]  # the fixtures, used by name


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    loop = Reactor()
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        yield loop
        nursery.cancel_scope.cancel()
    loop.close()


class Started:
    """One submitted call: ``await outcome()`` is its ``(result, error)``."""

    def __init__(self) -> None:
        self.result: tuple[Any, Exception | None] | None = None
        self.event = trio.Event()

    def done(self, value: Any, error: Exception | None) -> None:
        assert self.result is None, "done was called twice"
        self.result = (value, error)
        self.event.set()

    async def outcome(self, timeout: float = 20) -> tuple[Any, Exception | None]:
        with trio.fail_after(timeout):
            await self.event.wait()
        assert self.result is not None
        return self.result


async def signing(worker: ModuleWorker) -> int:
    """A logged-in session with an ECDSA signing operation begun (the fault module acts in its C_Sign)."""
    session = await login(worker)
    _, private = await ec_key_pair(worker, session)
    await worker.call("C_SignInit", [session, Mechanism(CKM.ECDSA), private])
    return session


async def restarted(worker: ModuleWorker) -> None:
    """Wait for the first restart of ``worker`` to be serving."""
    with trio.fail_after(20):
        while not worker.ready:
            await trio.sleep(0.05)
    assert worker.generation == 1


def submit(worker: ModuleWorker, reactor: Reactor, method: str, args: Sequence[Any]) -> Started:
    started_call = Started()
    assert worker.submit(method, args, started_call.done, reactor)
    return started_call


async def test_a_started_call_gives_its_result_or_its_ckr(softhsm_env: dict[str, str], reactor: Reactor) -> None:
    worker = await started(SOFTHSM_MODULE, softhsm_env)
    try:
        session = await login(worker)
        random, error = await submit(worker, reactor, "C_GenerateRandom", [session, 24]).outcome()
        assert error is None and isinstance(random, bytes) and len(random) == 24
        value, error = await submit(worker, reactor, "C_Sign", [session, DIGEST, None]).outcome()
        assert value is None and isinstance(error, OperationNotInitialized)
        # Four at once, one per lane; all come back and the lanes are free again.
        calls = [submit(worker, reactor, "C_GenerateRandom", [session, n]) for n in (1, 2, 3, 4)]
        assert [len((await call.outcome())[0]) for call in calls] == [1, 2, 3, 4]
        assert len(await worker.call("C_GenerateRandom", [session, 5])) == 5
        await trio.testing.wait_all_tasks_blocked()
        assert not reactor._replies  # every lane was let go
    finally:
        await worker.aclose()


async def test_what_submit_declines(softhsm_env: dict[str, str], reactor: Reactor) -> None:
    worker = await started(SOFTHSM_MODULE, softhsm_env, lanes=1)
    try:
        session = await login(worker)
        first = submit(worker, reactor, "C_GenerateRandom", [session, 8])
        assert not worker.submit("C_GenerateRandom", [session, 8], Started().done, reactor)  # its only lane is busy
        assert (await first.outcome())[1] is None
        big = bytes(supervisor.SUBMIT_MAX)
        assert not worker.submit("C_SeedRandom", [session, big], Started().done, reactor)
        assert not worker.submit("C_NoSuchCall", [session], Started().done, reactor)
        await worker.call("C_SeedRandom", [session, big])  # awaited instead, it goes
    finally:
        await worker.aclose()
    assert not worker.submit("C_GenerateRandom", [session, 8], Started().done, reactor)


async def test_a_request_the_lane_takes_only_in_part(softhsm_env: dict[str, str], reactor: Reactor) -> None:
    """Half a request cannot be taken back: the lane is stuck and closed, the call is declined (the module
    never saw it) and goes out on another lane when awaited."""
    worker = await started(SOFTHSM_MODULE, softhsm_env, lanes=2)
    try:
        session = await login(worker)
        current = worker._current
        assert current is not None
        lane = current.free[-1]

        class Short:
            def __init__(self, sock: Any) -> None:
                self.sock = sock

            def send(self, data: bytes) -> int:
                return int(self.sock.send(data[:2]))

            def __getattr__(self, name: str) -> Any:
                return getattr(self.sock, name)

        lane.sock = Short(lane.sock)  # type: ignore[assignment]
        assert not worker.submit("C_GenerateRandom", [session, 8], Started().done, reactor)
        assert lane.closed and current.stuck == 1 and worker.ready
        assert len(await worker.call("C_GenerateRandom", [session, 8])) == 8
    finally:
        await worker.aclose()


async def test_a_started_call_that_hangs_times_out(
    softhsm_env: dict[str, str], fault_module: str, reactor: Reactor
) -> None:
    worker = await started(fault_module, softhsm_env, call_timeout=1.0)
    try:
        session = await signing(worker)
        began = time.monotonic()
        hanging = submit(worker, reactor, "C_Sign", [session, b"hang" + DIGEST[4:], None])
        other = await worker.call("C_OpenSession", [await worker.call("KG_FindToken", [LABEL, None]), RW])
        assert len((await submit(worker, reactor, "C_GenerateRandom", [other, 8]).outcome())[0]) == 8
        _, error = await hanging.outcome()
        assert isinstance(error, DeviceError) and "C_Sign timed out after 1 s" in str(error)
        assert time.monotonic() - began >= 1.0
        current = worker._current
        assert current is not None and current.stuck == 1 and worker.generation == 0
        assert len((await submit(worker, reactor, "C_GenerateRandom", [other, 8]).outcome())[0]) == 8
    finally:
        await worker.aclose()


async def test_a_started_call_fails_when_the_worker_dies(
    softhsm_env: dict[str, str], fault_module: str, reactor: Reactor
) -> None:
    worker = await started(fault_module, softhsm_env)
    try:
        session = await signing(worker)
        _, error = await submit(worker, reactor, "C_Sign", [session, b"crash" + DIGEST[5:], None]).outcome()
        assert isinstance(error, DeviceError)
        assert re.search(r"C_Sign: the PKCS#11 module worker \(pid \d+\) died \(killed by SIGABRT\)", str(error))
        await restarted(worker)
        session = await login(worker)
        assert len((await submit(worker, reactor, "C_GenerateRandom", [session, 8]).outcome())[0]) == 8
    finally:
        await worker.aclose()


async def test_closing_the_worker_fails_a_started_call(
    softhsm_env: dict[str, str], fault_module: str, reactor: Reactor
) -> None:
    worker = await started(fault_module, softhsm_env)
    session = await signing(worker)
    hanging = submit(worker, reactor, "C_Sign", [session, b"hang" + DIGEST[4:], None])
    await worker.aclose()
    _, error = await hanging.outcome(timeout=5)
    assert isinstance(error, DeviceError) and "was closed" in str(error)


async def test_a_lane_that_ends_under_a_started_call_fails_it_soon(
    softhsm_env: dict[str, str], fault_module: str, reactor: Reactor
) -> None:
    """End of file on the lane while the worker lives on: the call fails within EOF_GRACE, not at its
    30 s deadline, and the worker is replaced."""
    worker = await started(fault_module, softhsm_env, call_timeout=30.0)
    try:
        session = await signing(worker)
        hanging = submit(worker, reactor, "C_Sign", [session, b"hang" + DIGEST[4:], None])
        await trio.testing.wait_all_tasks_blocked()  # the watchdog sleeps until the call's 30 s deadline
        current = worker._current
        assert current is not None
        (lane,) = [lane for lane in current.lanes if lane not in current.free]
        began = time.monotonic()
        lane.sock.shutdown(socket.SHUT_RD)  # our end reads end of file; the worker's thread still hangs
        _, error = await hanging.outcome(timeout=10)
        assert isinstance(error, DeviceError) and "died" in str(error)
        assert time.monotonic() - began < 10
        await restarted(worker)
    finally:
        await worker.aclose()
