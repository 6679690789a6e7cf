"""ECDSA signatures handed to the signing thread by a running server (``keygridd.signer``).

The server runs in the test's trio loop with its real socket, reactor and
signing thread; the reactor is told that several clients are busy, so each
``C_Sign`` of an EC key the reactor begins is signed with a nonce the thread
precomputed or, while the curve's pool is empty (always, with
``ecdsa_precompute: false``), goes to the thread; so does each
``C_SignFinal``. Four clients sign over P-256 and P-384 keys at once, with
``CKM_ECDSA`` and with ``CKM_ECDSA_SHA256`` / ``CKM_ECDSA_SHA384`` (single-
and multi-part: the thread signs the digest): every signature verifies with
``C_Verify``, the thread made signatures, and a client's other calls (random
bytes between two signatures, a length query, a key destroyed after its last
signature) behave as without the thread. With ``ecdsa_thread: false`` no
thread is started and the same signatures are made on the loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from keygridd import signer as signer_module
from keygridd.client.trio_client import TrioClient, open_client
from keygridd.daemon import load
from keygridd.pkcs11 import CKA, CKM, CKR, CKU
from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
from keygridd.providers import registry
from keygridd.server import lifecycle
from keygridd.server.lifecycle import Daemon
from keygridd.server.reactor import Reactor
from keygridd.signer import Signer

RW = CKF_SERIAL_SESSION | CKF_RW_SESSION
CURVES = {"P-256": bytes.fromhex("06082a8648ce3d030107"), "P-384": bytes.fromhex("06052b81040022")}
CLIENTS, SIGNATURES = 4, 25


def config(tmp_path: Path, thread: bool, precompute: bool = True) -> str:
    path = tmp_path / "keygrid.yaml"
    path.write_text(
        f"""
server:
  socket: "{tmp_path / "kg.sock"}"
  shutdown_grace_seconds: 1
  ecdsa_thread: {str(thread).lower()}
  ecdsa_precompute: {str(precompute).lower()}
slots:
  - id: 0
    provider: memory
    token: {{label: signer, so_pin: "so-pin-1234", user_pin: "user-pin-5678"}}
"""
    )
    return str(path)


async def sign_many(client: TrioClient, curve: bytes) -> int:
    session = await client.call("C_OpenSession", 0, RW)
    rv, _ = await client.call_raw("C_Login", session, CKU.USER, b"user-pin-5678")
    assert rv in (CKR.OK, CKR.USER_ALREADY_LOGGED_IN)
    public, private = await client.call(
        "C_GenerateKeyPair", session, CKM.EC_KEY_PAIR_GEN, [(CKA.EC_PARAMS, curve), (CKA.VERIFY, True)],
        [(CKA.SIGN, True)],
    )  # fmt: skip
    for n in range(SIGNATURES):
        digest = bytes([n]) * 32
        await client.call("C_SignInit", session, CKM.ECDSA, private)
        signature = await client.call("C_Sign", session, digest, None)
        await client.call("C_VerifyInit", session, CKM.ECDSA, public)
        await client.call("C_Verify", session, digest, signature)
        bad = bytes([signature[0] ^ 1]) + signature[1:]
        await client.call("C_VerifyInit", session, CKM.ECDSA, public)
        rv, _ = await client.call_raw("C_Verify", session, digest, bad)
        assert rv == CKR.SIGNATURE_INVALID
        assert len(await client.call("C_GenerateRandom", session, 16)) == 16
        # CKM_ECDSA_SHA*: the digest is the signer's input; a length query first leaves it to the call.
        message = b"message %d" % n
        await client.call("C_SignInit", session, CKM.ECDSA_SHA256, private)
        rv, (_, length) = await client.call_raw("C_Sign", session, message, -1)
        assert rv == CKR.OK and length == len(signature)
        hashed = await client.call("C_Sign", session, message, None)
        await client.call("C_SignInit", session, CKM.ECDSA_SHA384, private)
        await client.call("C_SignUpdate", session, message[:4])
        await client.call("C_SignUpdate", session, message[4:])
        parts = await client.call("C_SignFinal", session, None)
        for mechanism, made in ((CKM.ECDSA_SHA256, hashed), (CKM.ECDSA_SHA384, parts)):
            await client.call("C_VerifyInit", session, mechanism, public)
            await client.call("C_Verify", session, message, made)
            await client.call("C_VerifyInit", session, mechanism, public)
            rv, _ = await client.call_raw("C_Verify", session, message + b"!", made)
            assert rv == CKR.SIGNATURE_INVALID
    await client.call("C_DestroyObject", session, private)
    rv, _ = await client.call_raw("C_SignInit", session, CKM.ECDSA, public)
    assert rv == CKR.KEY_FUNCTION_NOT_PERMITTED  # no CKA_SIGN on the public key
    return len(signature)


async def run_clients(tmp_path: Path, thread: bool, precompute: bool = True) -> list[int]:
    settings, options = load(config(tmp_path, thread, precompute))
    daemon = Daemon.build(settings, options, registry.load)
    lengths: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            socket_path = await nursery.start(lifecycle.serve, daemon)

            async def one(index: int) -> None:
                async with open_client(socket_path) as client:
                    curve = CURVES["P-256" if index % 2 else "P-384"]
                    rv, _ = await client.call_raw("C_Login", 0, CKU.USER, b"x")  # a session is needed first
                    assert rv == CKR.SESSION_HANDLE_INVALID
                    lengths.append(await sign_many(client, curve))

            async with trio.open_nursery() as clients:
                for index in range(CLIENTS):
                    clients.start_soon(one, index)
            nursery.cancel_scope.cancel()
    daemon.close()
    return lengths


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed-nonces", "thread-only"])
async def test_signatures_made_by_the_thread_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precompute: bool
) -> None:
    started: list[Signer | None] = []
    real_start = signer_module.start

    def start(precompute: bool = True) -> Signer | None:
        started.append(real_start(precompute))
        return started[-1]

    monkeypatch.setattr(signer_module, "start", start)
    monkeypatch.setattr(Reactor, "crowded", lambda self: True)
    lengths = await run_clients(tmp_path, True, precompute)
    assert sorted(lengths) == [64, 64, 96, 96]
    assert len(started) == 1 and started[0] is not None, "libkeygrid-signer.so is installed by `make shim`"
    signer = started[0]
    # Most C_Sign and C_SignFinal calls (CKM_ECDSA, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384) are begun by the
    # reactor: handed to the thread, or signed with a precomputed nonce.
    assert signer.signed + signer.precomputed >= CLIENTS * SIGNATURES * 3 // 2
    if precompute:
        assert signer.signed >= 1  # a curve's first signature, before its pool has pairs
        assert signer.precomputed >= CLIENTS * SIGNATURES // 4
    else:
        assert signer.precomputed == 0
    assert signer.keys == 0  # the destroyed keys' copies are gone (the daemon closed the signer)


async def test_without_the_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(signer_module, "start", lambda precompute=True: started.append(1))
    monkeypatch.setattr(Reactor, "crowded", lambda self: True)
    lengths = await run_clients(tmp_path, False)
    assert sorted(lengths) == [64, 64, 96, 96]
    assert started == []
