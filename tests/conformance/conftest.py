"""The conformance suite's doors: the same PKCS#11 tests through every way in.

A door is an object with one method per PKCS#11 function (``C_Sign(session,
data)``), results as Python values and failures raised as the
``keygridd.pkcs11.errors`` class of the CKR. ``client`` is the Python client;
``shim`` loads ``libkeygrid-pkcs11.so`` (built here with its Makefile) and
calls it with ctypes. A PKCS#11 module is one application per process, so
tests that need a second application use the ``other`` fixture (the client).

Providers whose token is another PKCS#11 module (``pkcs11-softhsm``) answer
with that module's defaults and codes: ``differences.py`` is the table of
where it differs and why, applied at collection (tests needing a mechanism
the provider does not offer are not generated; known different answers run
as strict xfail).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keygridd.client import Client
from keygridd.pkcs11 import CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.pkcs11.errorbase import PKCS11Error
from tests.conformance import differences
from tests.conftest import RESTRICTED_UID, SO_PIN, USER_PIN
from tests.shim.door import ShimDoor
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
RO = CKF_SERIAL_SESSION

ROOT = Path(__file__).resolve().parents[2]


def _shim_door(path: str) -> Any:
    subprocess.run(["make", "-s", "-C", str(ROOT / "keygrid_pkcs11_shim")], check=True, capture_output=True)
    library = os.environ.get("KEYGRID_SHIM_LIB") or str(ROOT / "keygrid_pkcs11_shim/build/libkeygrid-pkcs11.so")
    return ShimDoor(library, path)


DOORS: dict[str, Callable[[str], Any]] = {"client": lambda path: Client(path), "shim": _shim_door}

# Every provider whose slots the suite runs against: the memory mock, the software token on each backend,
# and SoftHSM2 behind the pkcs11 provider.
PROVIDERS = ("memory", "software-lmdb", "software-filesystem", "software-postgresql", "pkcs11-softhsm")


def software_config(backend: str, location: str) -> str:
    where = f"dsn: '{location}'" if backend == "postgresql" else f"path: '{location}'"
    # A cheap KDF: the suite logs in hundreds of times (the default Argon2id cost is for real tokens).
    options = f"{{backend: {backend}, {where}, kdf: scrypt, scrypt: {{log2_n: 12}}, namespace: conformance-%d}}"
    pins = f'so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"'
    return f"""
server:
  socket: {{socket}}
  shutdown_grace_seconds: 5
slots:
  - id: 0
    description: conformance slot
    provider: software
    token: {{label: conformance, {pins}}}
    options: {options % 0}
  - id: 1
    description: blank slot
    provider: software
    options: {options % 1}
  - id: 7
    description: restricted slot
    provider: software
    access: {{uids: [{RESTRICTED_UID}]}}
    token: {{label: hidden, {pins}}}
    options: {options % 7}
"""


def softhsm_config(env: dict[str, str]) -> str:
    """Slot 0: a SoftHSM2 token; slot 1: SoftHSM2's uninitialised token; slot 7: another, for uid 4242."""
    options = (
        f"{{module: {SOFTHSM_MODULE}, token_label: '%s', environment: {{SOFTHSM2_CONF: '{env['SOFTHSM2_CONF']}'}}}}"
    )
    return f"""
server:
  socket: {{socket}}
  shutdown_grace_seconds: 5
slots:
  - id: 0
    description: conformance slot
    provider: pkcs11
    options: {options % "conformance"}
  - id: 1
    description: blank slot
    provider: pkcs11
    options: {options % ""}
  - id: 7
    description: restricted slot
    provider: pkcs11
    access: {{uids: [{RESTRICTED_UID}]}}
    options: {options % "hidden"}
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mechanisms(*ckm): the test needs these mechanisms; not generated for a provider without them"
    )


def _short_name(item: pytest.Function, provider: str) -> str:
    """The test's name with its parameters, without the provider and door ids (``test_x[sha1]``)."""
    ids = item.callspec.id
    for token in (provider, *DOORS):
        ids = re.sub(rf"(^|-){re.escape(token)}(?=-|$)", "", ids, count=1)
    ids = ids.strip("-")
    return f"{item.originalname}[{ids}]" if ids else item.originalname


def _needed(item: pytest.Function) -> set[int]:
    needed = {int(mark_arg) for mark in item.iter_markers("mechanisms") for mark_arg in mark.args}
    mech = item.callspec.params.get("mech")
    if isinstance(mech, int):
        needed.add(mech)
    return needed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply ``differences``: tests a provider cannot run are not generated, its known answers are xfail."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        provider = callspec.params.get("daemon") if callspec is not None else None
        if not isinstance(item, pytest.Function) or provider not in PROVIDERS:
            kept.append(item)
            continue
        name = _short_name(item, provider)
        if differences.not_offered(provider, _needed(item)) or differences.deselected(provider, name):
            dropped.append(item)
            continue
        expected = differences.expected_failure(provider, name)
        if expected is not None:
            raises, reason = expected
            item.add_marker(pytest.mark.xfail(strict=True, raises=raises, reason=f"{provider}: {reason}"))
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", params=PROVIDERS)
def daemon(request: pytest.FixtureRequest, daemon_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The suite's daemon, once per provider: slot 0 initialised, slot 1 blank, slot 7 for uid 4242 only."""
    provider = request.param
    if provider == "memory":
        return daemon_factory(name="conformance-memory")
    if provider == "pkcs11-softhsm":
        env = softhsm_tokens(tmp_path_factory.mktemp("softhsm"), ["conformance", "hidden"])
        return daemon_factory(softhsm_config(env), name="conformance-softhsm")
    backend = provider.split("-", 1)[1]
    if backend == "postgresql":
        import psycopg

        from keygridd.storage import migrations

        location = request.getfixturevalue("postgres").database("conformance")
        with psycopg.connect(location, autocommit=True) as conn:
            migrations.migrate(conn)
    else:
        location = str(tmp_path_factory.mktemp(provider) / "store")
    return daemon_factory(software_config(backend, location), name=f"conformance-{backend}")


@pytest.fixture
def provider(request: pytest.FixtureRequest, daemon: Any) -> str:
    """The provider behind the suite's daemon (``memory``, ``pkcs11-softhsm``, ...)."""
    name: str = request.node.callspec.params["daemon"]
    return name


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
    """Expect the block to fail with exactly this CKR; another CKR propagates as its own exception class."""
    try:
        yield
    except PKCS11Error as exc:
        if exc.rv != expected:
            exc.add_note(f"expected CKR {expected:#x}")
            raise
    else:
        raise AssertionError(f"expected CKR {expected:#x}, the call succeeded")
