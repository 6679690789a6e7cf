"""The module's busy polling (``busy_poll_us`` in pkcs11.conf): a reply that comes after the
poll's budget, or a daemon that hangs up while the module polls, ends the call as without it."""

from __future__ import annotations

import pytest
from fakedaemon import Fake

from keygridd.pkcs11 import CKR, SessionFlag
from keygridd.pkcs11.errors import PKCS11Error

pytestmark = pytest.mark.shim

RW = SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION


@pytest.mark.parametrize("budget", [0, 100, 10000])
def test_replies_slower_than_the_budget_still_arrive(fake: Fake, budget: int) -> None:
    d, daemon = fake.open(defer=0, conf=f"busy_poll_us = {budget}\n", delay=0.03)
    session = d.C_OpenSession(0, RW)
    for _ in range(5):  # misses in a row: later calls skip polling, and still get their replies
        d.C_SeedRandom(session, b"x")
    assert [r for r in daemon.take() if r != ["C_OpenSession"]] == [["C_SeedRandom"]] * 5


@pytest.mark.parametrize("budget", [0, 10000])
def test_fast_replies_with_and_without_polling(fake: Fake, budget: int) -> None:
    d, daemon = fake.open(defer=0, conf=f"busy_poll_us = {budget}\n")
    session = d.C_OpenSession(0, RW)
    for _ in range(50):
        d.C_SeedRandom(session, b"x")
    assert len(daemon.take()) == 51


def test_daemon_hangs_up_while_the_module_polls(fake: Fake) -> None:
    d, _ = fake.open(defer=0, conf="busy_poll_us = 10000\n", hang_up_on="C_SeedRandom")
    session = d.C_OpenSession(0, RW)
    with pytest.raises(PKCS11Error) as info:
        d.C_SeedRandom(session, b"x")
    assert info.value.rv == CKR.DEVICE_REMOVED


@pytest.mark.parametrize("text", ["busy_poll_us = -5", "busy_poll_us = 99999999", "busy_poll_us = many"])
def test_out_of_range_values_are_clamped(fake: Fake, text: str) -> None:
    d, daemon = fake.open(defer=0, conf=text + "\n")
    session = d.C_OpenSession(0, RW)
    d.C_SeedRandom(session, b"x")
    assert daemon.take() == [["C_OpenSession"], ["C_SeedRandom"]]
