"""The ``pkcs11`` provider through a real keygridd: login mapping, faults, health, PIN sources.

SoftHSM2 is the module; fault tests load ``tests/faultmodule/faultmod.c``,
which forwards to SoftHSM2 but hangs (data starting ``hang``) or aborts (data
starting ``crash``) in C_Sign.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keygridd.client import Client
from keygridd.pkcs11 import CKA, CKM, CKO, CKR, CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.params import Mechanism
from tests.conftest import SO_PIN, USER_PIN
from tests.softhsm import SOFTHSM_MODULE, build_fault_module, softhsm_tokens, worker_pids

pytestmark = pytest.mark.softhsm

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
P256 = bytes.fromhex("06082a8648ce3d030107")
DIGEST = hashlib.sha256(b"KeyGrid").digest()


def config(conf: str, *, module: str = SOFTHSM_MODULE, options: str = "") -> str:
    """Slot 0: the SoftHSM2 token ``front``; slot 1: a memory token (the daemon's other business)."""
    return f"""
server:
  socket: {{socket}}
  shutdown_grace_seconds: 2
slots:
  - id: 0
    description: softhsm slot
    provider: pkcs11
    options: {{module: "{module}", token_label: front, environment: {{SOFTHSM2_CONF: "{conf}"}}{options}}}
  - id: 1
    description: memory slot
    provider: memory
    token: {{label: mock, so_pin: "{SO_PIN.decode()}", user_pin: "{USER_PIN.decode()}"}}
"""


@pytest.fixture
def softhsm(tmp_path: Path) -> str:
    return softhsm_tokens(tmp_path, ["front"])["SOFTHSM2_CONF"]


@pytest.fixture(scope="module")
def fault_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_fault_module(tmp_path_factory.mktemp("faultmodule"))


@pytest.fixture
def clients() -> Iterator[Callable[[Any], Client]]:
    opened: list[Client] = []

    def connect(daemon: Any) -> Client:
        client = Client(daemon.socket)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def expect(rv: int, call: Callable[..., Any], *args: Any) -> None:
    try:
        call(*args)
    except PKCS11Error as exc:
        assert exc.rv == rv, f"expected {CKR(rv)!r}, got {exc}"
    else:
        raise AssertionError(f"expected {CKR(rv)!r}, the call succeeded")


def key_pair(client: Client, session: int, label: bytes) -> tuple[int, int]:
    public = {CKA.TOKEN: True, CKA.EC_PARAMS: P256, CKA.VERIFY: True, CKA.LABEL: label}
    private = {CKA.TOKEN: True, CKA.PRIVATE: True, CKA.SENSITIVE: True, CKA.SIGN: True, CKA.LABEL: label}
    pub, priv = client.C_GenerateKeyPair(session, Mechanism(CKM.EC_KEY_PAIR_GEN), public, private)
    return pub, priv


def sign(client: Client, session: int, key: int, data: bytes = DIGEST) -> bytes:
    client.C_SignInit(session, Mechanism(CKM.ECDSA), key)
    signature: bytes = client.C_Sign(session, data)
    return signature


def verifies(client: Client, session: int, public: int, signature: bytes, data: bytes = DIGEST) -> bool:
    """Check with ``cryptography``, from the public point the token gives out."""
    (point,) = client.C_GetAttributeValue(session, public, [CKA.EC_POINT])
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])  # DER OCTET STRING
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes_prehashed()))
    except Exception:
        return False
    return True


def hashes_prehashed() -> Any:
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    return Prehashed(hashes.SHA256())


def find(client: Client, session: int, template: dict[int, Any]) -> list[int]:
    client.C_FindObjectsInit(session, template)
    try:
        found: list[int] = client.C_FindObjects(session, 100)
    finally:
        client.C_FindObjectsFinal(session)
    return found


def status(client: Client, slot: int) -> dict[str, Any]:
    slots: list[dict[str, Any]] = client.KG_Status()["slots"]
    return next(s for s in slots if s["slot_id"] == slot)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# --- login mapping -----------------------------------------------------------------------------------------


def test_a_client_that_is_not_logged_in_never_reaches_private_objects(
    daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]
) -> None:
    daemon = daemon_factory(config(softhsm), name="pkcs11-login")
    alice, bob = clients(daemon), clients(daemon)
    a = alice.C_OpenSession(0, RW)
    alice.C_Login(a, CKU.USER, USER_PIN)
    pub, priv = key_pair(alice, a, b"alice")
    secret = alice.C_CreateObject(a, {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: True,
                                      CKA.LABEL: b"alice-data", CKA.VALUE: b"private"})  # fmt: skip
    mine = alice.C_CreateObject(a, {CKA.CLASS: CKO.DATA, CKA.TOKEN: False, CKA.PRIVATE: False,
                                    CKA.LABEL: b"alice-session", CKA.VALUE: b"mine"})  # fmt: skip

    b = bob.C_OpenSession(0, RW)  # the module is logged in (for alice); bob is not
    assert find(bob, b, {CKA.LABEL: b"alice"}) == [pub]
    assert find(bob, b, {CKA.LABEL: b"alice-data"}) == []
    assert find(bob, b, {CKA.LABEL: b"alice-session"}) == []  # a session object of another application
    expect(CKR.OBJECT_HANDLE_INVALID, bob.C_GetAttributeValue, b, secret, [CKA.VALUE])
    expect(CKR.OBJECT_HANDLE_INVALID, bob.C_GetAttributeValue, b, mine, [CKA.VALUE])
    expect(CKR.KEY_HANDLE_INVALID, bob.C_SignInit, b, Mechanism(CKM.ECDSA), priv)
    expect(CKR.USER_NOT_LOGGED_IN, bob.C_CreateObject, b,
           {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: True, CKA.VALUE: b"x"})  # fmt: skip
    assert find(bob, b, {CKA.CLASS: CKO.DATA, CKA.PRIVATE: True}) == []  # nothing was left behind
    assert bob.C_GetSessionInfo(b)["state"] == 2  # CKS_RW_PUBLIC_SESSION: bob's own state

    # A wrong PIN does not get bob in, although the module is logged in.
    expect(CKR.PIN_INCORRECT, bob.C_Login, b, CKU.USER, b"not-the-pin")
    bob.C_Login(b, CKU.USER, USER_PIN)
    assert find(bob, b, {CKA.LABEL: b"alice-data"}) == [secret]
    assert verifies(bob, b, pub, sign(bob, b, priv))
    assert find(bob, b, {CKA.LABEL: b"alice-session"}) == []  # still alice's alone

    alice.C_Logout(a)  # bob stays logged in: the module too
    assert find(bob, b, {CKA.LABEL: b"alice-data"}) == [secret]
    expect(CKR.OBJECT_HANDLE_INVALID, alice.C_GetAttributeValue, a, secret, [CKA.VALUE])
    bob.C_Logout(b)  # nobody is logged in now: the module logs out and a wrong PIN goes to it again
    expect(CKR.PIN_INCORRECT, alice.C_Login, a, CKU.USER, b"still-not-the-pin")
    alice.C_Login(a, CKU.USER, USER_PIN)
    (again,) = find(alice, a, {CKA.LABEL: b"alice-data"})  # handles of private objects end at logout
    assert alice.C_GetAttributeValue(a, again, [CKA.VALUE]) == [b"private"]
    expect(CKR.OBJECT_HANDLE_INVALID, alice.C_GetAttributeValue, a, secret, [CKA.VALUE])


def test_configured_pin_logs_the_module_in_and_checks_client_pins(
    daemon_factory: Any, softhsm: str, tmp_path: Path, clients: Callable[[Any], Client]
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(USER_PIN + b"\n")
    daemon = daemon_factory(config(softhsm, options=f", pin_file: '{pin_file}'"), name="pkcs11-pinfile")
    client = clients(daemon)
    s = client.C_OpenSession(0, RW)
    expect(CKR.PIN_INCORRECT, client.C_Login, s, CKU.USER, b"wrong-pin")
    client.C_Login(s, CKU.USER, USER_PIN)
    pub, priv = key_pair(client, s, b"unattended")
    assert verifies(client, s, pub, sign(client, s, priv))
    # The module stays logged in for the daemon: the SO cannot log in meanwhile.
    client.C_Logout(s)
    expect(CKR.USER_ANOTHER_ALREADY_LOGGED_IN, client.C_Login, s, CKU.SO, SO_PIN)
    for text in (daemon.log(),):
        assert USER_PIN.decode() not in text and "wrong-pin" not in text


def test_missing_module_leaves_its_slot_not_ready_and_the_daemon_serving(
    daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]
) -> None:
    daemon = daemon_factory(config(softhsm, module="/nonexistent/libvendor.so"), name="pkcs11-missing")
    client = clients(daemon)
    assert status(client, 0)["ready"] is False
    assert client.C_GetSlotList(True) == [1]
    expect(CKR.TOKEN_NOT_PRESENT, client.C_OpenSession, 0, RW)
    s = client.C_OpenSession(1, RW)
    assert len(client.C_GenerateRandom(s, 16)) == 16
    assert "/nonexistent/libvendor.so" in daemon.log()


# --- faults ----------------------------------------------------------------------------------------------


def test_pipelined_calls_on_a_pkcs11_slot(daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]) -> None:
    """C_SignInit and C_Sign written together (as the module sends a deferred init): the daemon awaits the
    module's init before it reads the sign, keeps the order, and reports a failed init at the init."""
    daemon = daemon_factory(config(softhsm), name="pkcs11-pipeline")
    client = clients(daemon)
    s = client.C_OpenSession(0, RW)
    client.C_Login(s, CKU.USER, USER_PIN)
    pub, priv = key_pair(client, s, b"pipelined")
    for _ in range(3):
        _, signature = client.pipeline(("C_SignInit", [s, Mechanism(CKM.ECDSA), priv]), ("C_Sign", [s, DIGEST, None]))
        assert verifies(client, s, pub, signature)
    # The public key cannot sign: the init fails in the module, and the sign after it finds no operation.
    with pytest.raises(PKCS11Error) as info:
        client.pipeline(("C_SignInit", [s, Mechanism(CKM.ECDSA), pub]), ("C_Sign", [s, DIGEST, None]))
    assert info.value.rv in (CKR.KEY_TYPE_INCONSISTENT, CKR.KEY_FUNCTION_NOT_PERMITTED)
    expect(CKR.OPERATION_NOT_INITIALIZED, client.C_Sign, s, DIGEST)
    # Two sessions in one write: each call still gets its own answer.
    other = client.C_OpenSession(0, RW)
    first, second = client.pipeline(("C_GenerateRandom", [s, 16]), ("C_GenerateRandom", [other, 24]))
    assert len(first) == 16 and len(second) == 24
    assert verifies(client, s, pub, sign(client, s, priv))


def test_worker_killed_mid_sign(
    daemon_factory: Any, softhsm: str, fault_module: str, clients: Callable[[Any], Client]
) -> None:
    daemon = daemon_factory(config(softhsm, module=fault_module), name="pkcs11-kill")
    client, bystander = clients(daemon), clients(daemon)
    s = client.C_OpenSession(0, RW)
    client.C_Login(s, CKU.USER, USER_PIN)
    pub, priv = key_pair(client, s, b"survivor")
    other = bystander.C_OpenSession(0, RW)
    (pid,) = worker_pids(daemon.process.pid)

    outcome: list[BaseException | None] = []

    def hang() -> None:
        try:
            sign(client, s, priv, b"hang" + DIGEST[4:])
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=hang)
    thread.start()
    time.sleep(0.5)  # the sign is in the module now
    os.kill(pid, signal.SIGKILL)
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], PKCS11Error) and outcome[0].rv == CKR.DEVICE_ERROR, outcome
    # The next calls work: a new worker, the same sessions and key handles, the login restored.
    assert verifies(client, s, pub, sign(client, s, priv))
    assert len(bystander.C_GenerateRandom(other, 8)) == 8
    (new_pid,) = worker_pids(daemon.process.pid)
    assert new_pid != pid
    assert daemon.process.poll() is None


def test_a_hanging_call_times_out_and_others_go_on(
    daemon_factory: Any, softhsm: str, fault_module: str, clients: Callable[[Any], Client]
) -> None:
    options = ", call_timeout_seconds: 2, max_concurrency: 4"
    daemon = daemon_factory(config(softhsm, module=fault_module, options=options), name="pkcs11-hang")
    client, other = clients(daemon), clients(daemon)
    s = client.C_OpenSession(0, RW)
    client.C_Login(s, CKU.USER, USER_PIN)
    pub, priv = key_pair(client, s, b"hang")
    o = other.C_OpenSession(0, RW)
    other.C_Login(o, CKU.USER, USER_PIN)

    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(sign, client, s, priv, b"hang" + DIGEST[4:])))
    started = time.monotonic()
    thread.start()
    signed = 0
    while thread.is_alive():
        assert verifies(other, o, pub, sign(other, o, priv))
        signed += 1
    thread.join()
    assert isinstance(outcome[0], PKCS11Error) and outcome[0].rv == CKR.DEVICE_ERROR, outcome
    assert "timed out" in outcome[0].message
    assert time.monotonic() - started >= 2.0
    assert signed > 0  # the other client kept signing while the call hung
    assert verifies(client, s, pub, sign(client, s, priv))  # and the caller's next call works


def _catch(fn: Callable[..., Any], *args: Any) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    return None


def test_a_module_that_stops_answering_makes_its_slot_not_ready(
    daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]
) -> None:
    options = ", call_timeout_seconds: 1, health_interval_seconds: 0.2, max_concurrency: 1"
    daemon = daemon_factory(config(softhsm, options=options), name="pkcs11-stop")
    client = clients(daemon)
    assert status(client, 0)["ready"] is True
    (pid,) = worker_pids(daemon.process.pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not status(client, 0)["ready"])
        assert 0 not in client.C_GetSlotList(True)
        s = client.C_OpenSession(1, RW)  # the other slot is served meanwhile
        assert len(client.C_GenerateRandom(s, 8)) == 8
        # The stuck worker is replaced and the slot is ready again, without any client doing anything.
        wait_until(lambda: status(client, 0)["ready"])
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and replaced by then, normally
            os.kill(pid, signal.SIGCONT)
    assert client.C_GetSlotList(True) == [0, 1]


def test_a_token_that_disappears_and_comes_back_is_found_again(
    daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]
) -> None:
    options = ", health_interval_seconds: 0.2"
    daemon = daemon_factory(config(softhsm, options=options), name="pkcs11-gone")
    client = clients(daemon)
    tokens = Path(softhsm).parent / "tokens"
    (token_dir,) = tokens.iterdir()
    aside = tokens.parent / "aside"
    token_dir.rename(aside)
    try:
        wait_until(lambda: not status(client, 0)["ready"])
        expect(CKR.TOKEN_NOT_PRESENT, client.C_OpenSession, 0, RW)
    finally:
        aside.rename(token_dir)
    wait_until(lambda: status(client, 0)["ready"])
    s = client.C_OpenSession(0, RW)
    client.C_Login(s, CKU.USER, USER_PIN)
    assert client.C_GetTokenInfo(0)["label"] == "front"


def test_two_modules_have_workers_of_their_own(
    daemon_factory: Any, softhsm: str, fault_module: str, clients: Callable[[Any], Client]
) -> None:
    """Slot 0 on SoftHSM2, slot 2 on the fault module (another module path): a crash of one worker
    fails only its own calls; the other slot, and the memory slot, go on."""
    extra = f"""  - id: 2
    description: second module
    provider: pkcs11
    options: {{module: "{fault_module}", token_label: front, environment: {{SOFTHSM2_CONF: "{softhsm}"}}}}
"""
    daemon = daemon_factory(config(softhsm) + extra, name="pkcs11-two")
    client = clients(daemon)
    assert client.C_GetSlotList(True) == [0, 1, 2]
    sessions = {}
    for slot in (0, 2):
        sessions[slot] = client.C_OpenSession(slot, RW)
        client.C_Login(sessions[slot], CKU.USER, USER_PIN)
    pub, priv = key_pair(client, sessions[0], b"two")
    pids = worker_pids(daemon.process.pid)
    assert len(pids) == 2
    crashing = client.C_OpenSession(2, RW)
    handles = find(client, crashing, {CKA.LABEL: b"two", CKA.CLASS: CKO.PRIVATE_KEY})
    assert len(handles) == 1  # the same token, seen through the second module
    # The fault module aborts in C_Sign: its worker dies, slot 0's does not.
    expect(CKR.DEVICE_ERROR, sign, client, crashing, handles[0], b"crash" + DIGEST[5:])
    assert verifies(client, sessions[0], pub, sign(client, sessions[0], priv))
    memory = client.C_OpenSession(1, RW)
    assert len(client.C_GenerateRandom(memory, 8)) == 8
    wait_until(lambda: len(worker_pids(daemon.process.pid)) == 2)  # the crashed one is replaced
    assert len(set(worker_pids(daemon.process.pid)) & set(pids)) == 1
    assert len(client.C_GenerateRandom(sessions[2], 8)) == 8


def test_calls_by_uri_reach_a_pkcs11_slot(daemon_factory: Any, softhsm: str, clients: Callable[[Any], Client]) -> None:
    """KG_Sign, KG_Verify, KG_GetPublicKey by PKCS#11 URI, with a PIN for the one call or a session login."""
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    daemon = daemon_factory(config(softhsm), name="pkcs11-uri")
    owner, caller = clients(daemon), clients(daemon)
    s = owner.C_OpenSession(0, RW)
    owner.C_Login(s, CKU.USER, USER_PIN)
    key_pair(owner, s, b"by-uri")
    owner.C_Logout(s)  # nobody is logged in now

    uri = "pkcs11:token=front;object=by-uri"
    ecdsa = Mechanism(CKM.ECDSA)
    expect(CKR.KEY_HANDLE_INVALID, caller.KG_Sign, uri, ecdsa, DIGEST, None)  # private: a PIN is needed
    expect(CKR.PIN_INCORRECT, caller.KG_Sign, uri, ecdsa, DIGEST, b"not-the-pin")
    signature = caller.KG_Sign(uri, ecdsa, DIGEST, USER_PIN)
    caller.KG_Verify(uri, ecdsa, DIGEST, signature, None)  # the public key needs no login
    expect(CKR.SIGNATURE_INVALID, caller.KG_Verify, uri, ecdsa, DIGEST[::-1], signature, None)
    public = load_der_public_key(caller.KG_GetPublicKey(uri, None))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    public.verify(der, DIGEST, ec.ECDSA(hashes_prehashed()))
    # The PIN served that one call: the caller is not logged in, and neither is the module.
    c = caller.C_OpenSession(0, RW)
    assert caller.C_GetSessionInfo(c)["state"] == 2
    expect(CKR.KEY_HANDLE_INVALID, caller.KG_Sign, uri, ecdsa, DIGEST, None)
    caller.C_Login(c, CKU.USER, USER_PIN)  # with a session login no PIN is needed
    assert len(caller.KG_Sign(uri, ecdsa, DIGEST, None)) == 64
    expect(CKR.SLOT_ID_INVALID, caller.KG_Sign, "pkcs11:token=nowhere", ecdsa, DIGEST, None)


def test_init_token_and_pin_through_keygrid(
    daemon_factory: Any, tmp_path: Path, clients: Callable[[Any], Client]
) -> None:
    """A slot on SoftHSM2's free token: C_InitToken, C_InitPIN and C_SetPIN go to the module, and the
    slot follows the token under its new label (SoftHSM2 moves an initialised token to a slot of its own)."""
    conf = softhsm_tokens(tmp_path, [])["SOFTHSM2_CONF"]
    blank = config(conf).replace("token_label: front", "token_label: ''")
    daemon = daemon_factory(blank, name="pkcs11-init")
    client = clients(daemon)
    assert not client.C_GetTokenInfo(0)["flags"] & 0x400  # CKF_TOKEN_INITIALIZED
    expect(CKR.TOKEN_NOT_RECOGNIZED, client.C_OpenSession, 0, RW)
    client.C_InitToken(0, SO_PIN, b"fresh".ljust(32, b" "))
    assert client.C_GetTokenInfo(0)["label"] == "fresh"
    assert status(client, 0)["token_label"] == "fresh"  # what the module says, not the configured ''
    s = client.C_OpenSession(0, RW)
    client.C_Login(s, CKU.SO, SO_PIN)
    client.C_InitPIN(s, b"first-pin")
    client.C_Logout(s)
    client.C_Login(s, CKU.USER, b"first-pin")
    client.C_SetPIN(s, b"first-pin", USER_PIN)
    client.C_Logout(s)
    expect(CKR.PIN_INCORRECT, client.C_Login, s, CKU.USER, b"first-pin")
    client.C_Login(s, CKU.USER, USER_PIN)
    assert status(client, 0)["ready"] is True
