"""The conformance suite's doors: the same PKCS#11 tests through every way in.

A door is an object with one method per PKCS#11 function (``C_Sign(session,
data)``), results as Python values and failures raised as the
``keygridd.pkcs11.errors`` class of the CKR. ``client`` is the Python client;
the shim door loads ``libkeygrid-pkcs11.so`` and is added by its tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.pkcs11.errorbase import PKCS11Error

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
RO = CKF_SERIAL_SESSION

DOORS: dict[str, Callable[[str], Any]] = {"client": lambda path: Client(path)}


@pytest.fixture(params=sorted(DOORS))
def door(request: pytest.FixtureRequest) -> Callable[[str], Any]:
    return DOORS[request.param]


@pytest.fixture
def p11(door: Callable[[str], Any], daemon: Any) -> Iterator[Any]:
    conn = door(daemon.socket)
    yield conn
    conn.close()


@pytest.fixture
def other(daemon: Any) -> Iterator[Client]:
    """A second, independent application (always the Python client)."""
    conn = Client(daemon.socket)
    yield conn
    conn.close()


@pytest.fixture
def session(p11: Any, daemon: Any) -> int:
    handle: int = p11.C_OpenSession(daemon.slot_id, RW)
    p11.C_Login(handle, CKU.USER, daemon.user_pin)
    return handle


@pytest.fixture
def public_session(p11: Any, daemon: Any) -> int:
    handle: int = p11.C_OpenSession(daemon.slot_id, RW)
    return handle


@contextlib.contextmanager
def ckr(expected: int) -> Iterator[None]:
    """Expect the block to fail with exactly this CKR."""
    try:
        yield
    except PKCS11Error as exc:
        assert exc.rv == expected, f"expected {expected:#x}, got {exc}"
    else:
        raise AssertionError(f"expected CKR {expected:#x}, the call succeeded")
