"""Passthrough login while the module's logout for an application that left is still on its way.

When the last logged-in application goes away, the core logs the module out
later (``Passthrough.background``, run by the server after the application is
dropped). A login that arrives first finds the module still logged in for
nobody; it must wait for that logout and log in, not fail.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

import pytest

from keygridd.core.base import CoreState
from keygridd.core.model import Peer
from keygridd.core.offload import Forward, Offload
from keygridd.core.remote import RemoteToken
from keygridd.pkcs11 import CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.errors import FunctionFailed, PinIncorrect, UserAlreadyLoggedIn, UserNotLoggedIn

PIN = b"user-pin-5678"
PEER = Peer(uid=1000, gid=1000, pid=4321)
RW = CKF_SERIAL_SESSION | CKF_RW_SESSION


class FakeModule:
    """A module with one token and the login rules of PKCS#11 (one login per process, as SoftHSM2)."""

    generation = 0

    def __init__(self) -> None:
        self.logged_in: int | None = None
        self.next_session = 1

    async def call(self, method: str, args: Sequence[Any]) -> Any:
        return self.answer(method, args)

    def submit(self, method: str, args: Sequence[Any], done: Any, watcher: Any) -> bool:
        return False  # never started from the loop: every call is awaited

    def answer(self, method: str, args: Sequence[Any]) -> Any:
        if method == "KG_FindToken":
            return 0
        if method == "C_GetTokenInfo":
            return {"label": "fake", "manufacturer_id": "KeyGrid tests", "model": "fake", "serial_number": "1"}
        if method == "C_OpenSession":
            self.next_session += 1
            return self.next_session
        if method == "C_CloseSession":
            return None
        if method == "C_Login":
            if self.logged_in is not None:
                raise UserAlreadyLoggedIn()
            if args[2] != PIN:
                raise PinIncorrect()
            self.logged_in = args[1]
            return None
        if method == "C_Logout":
            if self.logged_in is None:
                raise UserNotLoggedIn()
            self.logged_in = None
            return None
        raise AssertionError(f"unexpected module call {method}")


def drive(result: Any, module: FakeModule, during_wait: Callable[[], None] = lambda: None) -> Any:
    """Run a passthrough call: module calls go to ``module``; a wait (Offload) runs ``during_wait`` first."""
    if not isinstance(result, Generator):
        return result
    value: Any = None
    error: PKCS11Error | None = None
    while True:
        try:
            request = result.throw(error) if error is not None else result.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if isinstance(request, Forward):
            try:
                value = module.answer(request.method, request.args)
            except PKCS11Error as exc:
                error = exc
        else:
            assert isinstance(request, Offload)
            during_wait()
            value = request.fn()


@pytest.fixture
def module() -> FakeModule:
    return FakeModule()


@pytest.fixture
def core(module: FakeModule) -> CoreState:
    token = RemoteToken(
        slot_id=0, description="fronted", provider="pkcs11", allows=lambda peer: True, backend=module,
        label="token", serial=None,
    )  # fmt: skip
    return CoreState([], [token])


def _login_and_leave(core: CoreState, module: FakeModule) -> list[Forward]:
    """An application logs in and goes away: the module calls the core left for later."""
    app = core.open_application(b"first", PEER)
    session = drive(core.passthrough.run(app, "C_OpenSession", [0, RW]), module)
    drive(core.passthrough.run(app, "C_Login", [session, CKU.USER, PIN]), module)
    core.close_application(app)
    later, core.passthrough.background = core.passthrough.background, []
    assert "C_Logout" in [request.method for request in later]
    assert module.logged_in == CKU.USER, "the module's logout is still to come"
    return later


def _second(core: CoreState, module: FakeModule) -> tuple[Any, int]:
    app = core.open_application(b"second", PEER)
    return app, drive(core.passthrough.run(app, "C_OpenSession", [0, RW]), module)


def test_login_waits_for_the_logout_of_an_application_that_left(core: CoreState, module: FakeModule) -> None:
    later = _login_and_leave(core, module)
    app, session = _second(core, module)

    def logout_arrives() -> None:
        for request in later:
            module.answer(request.method, request.args)
        later.clear()

    drive(core.passthrough.run(app, "C_Login", [session, CKU.USER, PIN]), module, during_wait=logout_arrives)
    assert app.login == {0: CKU.USER}
    assert module.logged_in == CKU.USER


def test_a_wrong_pin_is_checked_by_the_module_once_it_is_logged_out(core: CoreState, module: FakeModule) -> None:
    later = _login_and_leave(core, module)
    app, session = _second(core, module)

    def logout_arrives() -> None:
        for request in later:
            module.answer(request.method, request.args)
        later.clear()

    with pytest.raises(PinIncorrect):
        drive(core.passthrough.run(app, "C_Login", [session, CKU.USER, b"wrong"]), module, logout_arrives)
    assert app.login == {}
    assert module.logged_in is None


def test_login_gives_up_when_the_module_stays_logged_in(core: CoreState, module: FakeModule) -> None:
    _login_and_leave(core, module)  # and the logout never arrives
    app, session = _second(core, module)
    waits: list[None] = []
    with pytest.raises(FunctionFailed):
        drive(core.passthrough.run(app, "C_Login", [session, CKU.USER, PIN]), module, lambda: waits.append(None))
    assert app.login == {}
    assert 1 < len(waits) < 20
