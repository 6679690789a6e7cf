"""The PKCS#11 module worker against SoftHSM2: ckapi's passthrough, the lane protocol, and supervision.

Each test gets a SoftHSM2 token directory of its own and a ``ModuleWorker``
on it. The passthrough tests run twice: with the lanes served by
``libkeygrid-worker.so`` (the operation calls answered in C) and with
``KEYGRID_WORKER_NATIVE=0`` (every call answered by the worker's Python); both
must give the same results, CKRs and messages. Fault tests load ``tests/faultmodule/faultmod.c`` (built here), which
forwards to SoftHSM2 but hangs or aborts in C_Sign when the data says so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from keygridd.pkcs11 import CKA, CKG, CKK, CKM, CKO, CKU
from keygridd.pkcs11.errors import (
    AttributeSensitive,
    BufferTooSmall,
    DeviceError,
    FunctionNotSupported,
    GeneralError,
    HostMemory,
    MechanismInvalid,
    ObjectHandleInvalid,
    OperationNotInitialized,
)
from keygridd.pkcs11.flags import SessionFlag
from keygridd.pkcs11.params import GcmParams, Mechanism, OaepParams
from keygridd.providers.pkcs11.supervisor import ModuleWorker, WorkerFailed
from tests.softhsm import SOFTHSM_MODULE, build_fault_module, softhsm_tokens

pytestmark = pytest.mark.softhsm

SOFTHSM = SOFTHSM_MODULE
LABEL, SO_PIN, PIN = "kg", "12345678", b"1234"
RW = int(SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION)
P256 = bytes.fromhex("06082a8648ce3d030107")
DIGEST = bytes(range(32))


@pytest.fixture
def softhsm_env(tmp_path: Path) -> dict[str, str]:
    """A SoftHSM2 configuration with one initialised token ``kg`` in a directory of this test's own."""
    return softhsm_tokens(tmp_path, [LABEL], SO_PIN.encode(), PIN)


@pytest.fixture(scope="session")
def fault_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_fault_module(tmp_path_factory.mktemp("faultmodule"))


async def started(module: str, env: dict[str, str], **options: Any) -> ModuleWorker:
    options.setdefault("lanes", None)
    options.setdefault("call_timeout", 20.0)
    worker = ModuleWorker(module, env=env, **options)
    await worker.start()
    return worker


@pytest.fixture(params=["native", "python"])
async def worker(softhsm_env: dict[str, str], request: pytest.FixtureRequest) -> AsyncIterator[ModuleWorker]:
    native = request.param == "native"
    w = await started(SOFTHSM, {**softhsm_env, "KEYGRID_WORKER_NATIVE": "1" if native else "0"})
    assert w.native is native  # make test builds libkeygrid-worker.so: the C lanes must be the ones serving
    yield w
    await w.aclose()


async def login(worker: ModuleWorker) -> int:
    """A read-write session on the ``kg`` token with the user logged in."""
    slot = await worker.call("KG_FindToken", [LABEL, None])
    session: int = await worker.call("C_OpenSession", [slot, RW])
    await worker.call("C_Login", [session, CKU.USER, PIN])
    return session


async def ec_key_pair(worker: ModuleWorker, session: int, label: bytes = b"ec") -> tuple[int, int]:
    public = {CKA.EC_PARAMS: P256, CKA.VERIFY: True, CKA.LABEL: label}
    private = {CKA.SIGN: True, CKA.LABEL: label, CKA.ID: b"\x01", CKA.PRIVATE: True}
    (pub, pub_meta), (priv, priv_meta) = await worker.call(
        "C_GenerateKeyPair", [session, Mechanism(CKM.EC_KEY_PAIR_GEN), public, private]
    )
    assert pub_meta == [False, False, CKO.PUBLIC_KEY, b"", label, CKK.EC]
    assert priv_meta == [False, True, CKO.PRIVATE_KEY, b"\x01", label, CKK.EC]
    return pub, priv


async def sign(worker: ModuleWorker, session: int, key: int, data: bytes, out_len: int | None = None) -> Any:
    await worker.call("C_SignInit", [session, Mechanism(CKM.ECDSA), key])
    return await worker.call("C_Sign", [session, data, out_len])


async def verify(worker: ModuleWorker, session: int, key: int, data: bytes, signature: bytes) -> None:
    await worker.call("C_VerifyInit", [session, Mechanism(CKM.ECDSA), key])
    await worker.call("C_Verify", [session, data, signature])


# --- passthrough ---------------------------------------------------------------------------------------


async def test_hello_reports_threads_and_lanes(worker: ModuleWorker) -> None:
    with trio.fail_after(10):
        assert worker.ready and worker.threads_ok and worker.lanes == 4
        assert worker.generation == 0 and isinstance(worker.pid, int)
        info = await worker.call("C_GetInfo", [])
        assert info["manufacturer_id"] == "SoftHSM" and info["cryptoki_version"] == [2, 40]


async def test_find_token_by_label_and_serial(worker: ModuleWorker) -> None:
    with trio.fail_after(10):
        slot = await worker.call("KG_FindToken", [LABEL, None])
        assert isinstance(slot, int)
        info = await worker.call("C_GetTokenInfo", [slot])
        assert info["label"] == LABEL and info["model"] == "SoftHSM v2"
        assert await worker.call("KG_FindToken", [None, info["serial_number"]]) == slot
        assert await worker.call("KG_FindToken", [LABEL, info["serial_number"]]) == slot
        assert await worker.call("KG_FindToken", ["other", None]) is None
        assert await worker.call("KG_FindToken", [LABEL, "0000"]) is None
        assert slot in await worker.call("C_GetSlotList", [True])
        assert CKM.ECDSA in await worker.call("C_GetMechanismList", [slot])


async def test_ec_sign_with_each_outlen_and_verify(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        pub, priv = await ec_key_pair(worker, session)
        signature, length = await sign(worker, session, priv, DIGEST)
        assert length == len(signature) == 64
        await verify(worker, session, pub, DIGEST, signature)

        assert await sign(worker, session, priv, DIGEST, -1) == [None, 64]  # length query, operation stays
        signature, length = await worker.call("C_Sign", [session, DIGEST, None])
        await verify(worker, session, pub, DIGEST, signature)

        with pytest.raises(BufferTooSmall) as too_small:
            await sign(worker, session, priv, DIGEST, 10)
        assert too_small.value.result == [None, 64]
        signature, length = await worker.call("C_Sign", [session, DIGEST, 64])  # the same operation
        assert length == 64
        await verify(worker, session, pub, DIGEST, signature)


async def test_sensitive_attribute_comes_with_the_others(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        _, priv = await ec_key_pair(worker, session, b"secret")
        types = [CKA.VALUE, CKA.LABEL, CKA.SIGN, CKA.KEY_TYPE, CKA.EC_PARAMS]
        with pytest.raises(AttributeSensitive) as sensitive:
            await worker.call("C_GetAttributeValue", [session, priv, types])
        assert sensitive.value.result == [None, b"secret", True, CKK.EC, P256]


async def test_unknown_mechanism_is_the_modules_answer(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        _, priv = await ec_key_pair(worker, session)
        with pytest.raises(MechanismInvalid) as invalid:
            await worker.call("C_SignInit", [session, Mechanism(0x7FFF1234), priv])
        assert invalid.value.message == "C_SignInit: the module's answer"
        with pytest.raises(OperationNotInitialized) as not_initialized:
            await worker.call("C_Sign", [session, DIGEST, None])
        assert not_initialized.value.message == "C_Sign: the module's answer"
        with pytest.raises(ObjectHandleInvalid):  # SoftHSM2 says so for an unknown key handle
            await worker.call("C_VerifyInit", [session, Mechanism(CKM.ECDSA), 0x7FFF])
        with pytest.raises(HostMemory) as too_much:  # above the worker's buffer limit: refused before the module
            await worker.call("C_GenerateRandom", [session, 1 << 40])
        assert "above the worker's limit" in too_much.value.message
        with pytest.raises(MechanismInvalid):
            await worker.call("C_GetMechanismInfo", [await worker.call("KG_FindToken", [LABEL, None]), 0x7FFF1234])


async def test_aes_gcm_with_parameters(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        template = {CKA.VALUE_LEN: 32, CKA.ENCRYPT: True, CKA.DECRYPT: True, CKA.LABEL: b"aes"}
        key, meta = await worker.call("C_GenerateKey", [session, Mechanism(CKM.AES_KEY_GEN), template])
        assert meta[2:] == [CKO.SECRET_KEY, b"", b"aes", CKK.AES]
        gcm = Mechanism(CKM.AES_GCM, GcmParams(iv=b"\x07" * 12, aad=b"header", tag_bits=128, iv_bits=96))
        await worker.call("C_EncryptInit", [session, gcm, key])
        ciphertext, length = await worker.call("C_Encrypt", [session, b"attack at dawn", None])
        assert length == len(b"attack at dawn") + 16
        await worker.call("C_DecryptInit", [session, gcm, key])
        assert await worker.call("C_Decrypt", [session, ciphertext, None]) == [b"attack at dawn", 14]
        wrong = Mechanism(CKM.AES_GCM, GcmParams(iv=b"\x07" * 12, aad=b"other", tag_bits=128))
        await worker.call("C_DecryptInit", [session, wrong, key])
        with pytest.raises(GeneralError):  # SoftHSM2's answer to a wrong tag, passed on unchanged
            await worker.call("C_Decrypt", [session, ciphertext, None])


async def test_rsa_oaep(worker: ModuleWorker) -> None:
    with trio.fail_after(60):
        session = await login(worker)
        public = {CKA.MODULUS_BITS: 2048, CKA.PUBLIC_EXPONENT: b"\x01\x00\x01", CKA.ENCRYPT: True}
        private = {CKA.DECRYPT: True}
        (pub, _), (priv, meta) = await worker.call(
            "C_GenerateKeyPair", [session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), public, private]
        )
        assert meta[2] == CKO.PRIVATE_KEY and meta[5] == CKK.RSA
        oaep = Mechanism(CKM.RSA_PKCS_OAEP, OaepParams(CKM.SHA_1, CKG.MGF1_SHA1))  # SoftHSM 2.6 has SHA-1 only
        await worker.call("C_EncryptInit", [session, oaep, pub])
        ciphertext, length = await worker.call("C_Encrypt", [session, b"key material", None])
        assert length == 256
        await worker.call("C_DecryptInit", [session, oaep, priv])
        assert await worker.call("C_Decrypt", [session, ciphertext, None]) == [b"key material", 12]


async def test_array_attributes_cross_the_wire_typed(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        wrap_template = ((CKA.CLASS, CKO.SECRET_KEY), (CKA.LABEL, b"wrapped"), (CKA.EXTRACTABLE, True))
        template = {
            CKA.VALUE_LEN: 32,
            CKA.WRAP: True,
            CKA.WRAP_TEMPLATE: wrap_template,
            CKA.ALLOWED_MECHANISMS: (CKM.AES_KEY_WRAP, CKM.AES_GCM),
        }
        key, _ = await worker.call("C_GenerateKey", [session, Mechanism(CKM.AES_KEY_GEN), template])
        types = [CKA.WRAP_TEMPLATE, CKA.ALLOWED_MECHANISMS, CKA.VALUE_LEN, CKA.WRAP]
        got = await worker.call("C_GetAttributeValue", [session, key, types])
        assert sorted(got[0]) == sorted(wrap_template)
        assert sorted(got[1]) == sorted((CKM.AES_KEY_WRAP, CKM.AES_GCM)) and isinstance(got[1], tuple)
        assert got[2:] == [32, True]


async def test_session_info_digest_and_slot_events(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        info = await worker.call("C_GetSessionInfo", [session])
        assert info["state"] == 3 and info["flags"] == RW  # CKS_RW_USER_FUNCTIONS
        await worker.call("C_DigestInit", [session, Mechanism(CKM.SHA256)])
        await worker.call("C_DigestUpdate", [session, b"abc"])
        assert await worker.call("C_DigestFinal", [session, -1]) == [None, 32]
        digest, _ = await worker.call("C_DigestFinal", [session, None])
        assert digest.hex().startswith("ba7816bf")
        with pytest.raises(FunctionNotSupported):  # a blocking wait would hold a lane forever
            await worker.call("C_WaitForSlotEvent", [0])


async def test_find_all_and_meta(worker: ModuleWorker) -> None:
    with trio.fail_after(20):
        session = await login(worker)
        made = []
        for i in range(3):
            template = {CKA.CLASS: CKO.DATA, CKA.TOKEN: True, CKA.PRIVATE: False, CKA.LABEL: b"found"}
            handle, meta = await worker.call("C_CreateObject", [session, {**template, CKA.VALUE: bytes([i])}])
            assert meta == [True, False, CKO.DATA, None, b"found", None]  # a data object has no CKA_ID / CKA_KEY_TYPE
            made.append(handle)
        await worker.call("C_CreateObject", [session, {CKA.CLASS: CKO.DATA, CKA.LABEL: b"other"}])
        found = await worker.call("KG_FindAll", [session, {CKA.LABEL: b"found"}])
        assert sorted(handle for handle, _ in found) == sorted(made)
        assert all(meta == [True, False, CKO.DATA, None, b"found", None] for _, meta in found)
        metas = await worker.call("KG_Meta", [session, [made[0], 0x7FFFFFF]])
        assert metas == [[True, False, CKO.DATA, None, b"found", None], None]
        assert len(await worker.call("KG_FindAll", [session, {}])) == 4


async def test_calls_run_concurrently_on_several_lanes(worker: ModuleWorker) -> None:
    with trio.fail_after(30):
        session = await login(worker)
        pub, priv = await ec_key_pair(worker, session)
        results: list[bytes] = []

        async def signer() -> None:
            own = await worker.call("C_OpenSession", [await worker.call("KG_FindToken", [LABEL, None]), RW])
            for _ in range(10):
                signature, _ = await sign(worker, own, priv, DIGEST)
                results.append(signature)
            await worker.call("C_CloseSession", [own])

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(signer)
        assert len(results) == 80
        for signature in results[:5]:
            await verify(worker, session, pub, DIGEST, signature)
        assert worker.lanes == 4 and worker.generation == 0


async def test_a_call_cancelled_in_flight_leaves_its_lane_usable(softhsm_env: dict[str, str]) -> None:
    with trio.fail_after(60):
        worker = await started(SOFTHSM, softhsm_env, lanes=1)
        try:
            session = await login(worker)
            public = {CKA.MODULUS_BITS: 3072, CKA.PUBLIC_EXPONENT: b"\x01\x00\x01"}  # takes a while
            with trio.move_on_after(0.02) as scope:
                await worker.call("C_GenerateKeyPair", [session, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), public, {}])
            assert scope.cancelled_caught
            random = await worker.call("C_GenerateRandom", [session, 32])  # after the late reply is discarded
            assert isinstance(random, bytes) and len(random) == 32
            assert worker.generation == 0
        finally:
            await worker.aclose()


# --- supervision -------------------------------------------------------------------------------------


async def test_worker_killed_during_a_call_fails_it_and_restarts(
    softhsm_env: dict[str, str], fault_module: str
) -> None:
    with trio.fail_after(30):
        worker = await started(fault_module, softhsm_env, call_timeout=30.0)
        restarts: list[int] = []
        worker.on_restart = restarts.append
        try:
            session = await login(worker)
            _, priv = await ec_key_pair(worker, session)
            await worker.call("C_SignInit", [session, Mechanism(CKM.ECDSA), priv])
            old_pid = worker.pid
            assert old_pid is not None
            failure: list[BaseException] = []

            async def hang() -> None:
                try:
                    await worker.call("C_Sign", [session, b"hang" + DIGEST[4:], None])
                except DeviceError as exc:
                    failure.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hang)
                await trio.sleep(0.3)
                os.kill(old_pid, signal.SIGKILL)
            assert failure and "SIGKILL" in str(failure[0])
            while worker.generation == 0:
                await trio.sleep(0.02)
            assert restarts == [1] and worker.ready and worker.pid not in (None, old_pid)
            session = await login(worker)  # the old session died with the old process
            pub, priv = await ec_key_pair(worker, session)
            signature, _ = await sign(worker, session, priv, DIGEST)
            await verify(worker, session, pub, DIGEST, signature)
        finally:
            await worker.aclose()


async def test_module_abort_is_a_device_error(softhsm_env: dict[str, str], fault_module: str) -> None:
    with trio.fail_after(30):
        worker = await started(fault_module, softhsm_env)
        try:
            session = await login(worker)
            _, priv = await ec_key_pair(worker, session)
            with pytest.raises(DeviceError, match=re.escape("died (killed by SIGABRT)")):
                await sign(worker, session, priv, b"crash" + DIGEST[5:])
            session = await login(worker)  # waits for the restart
            assert worker.generation == 1
            _, priv = await ec_key_pair(worker, session)
            assert (await sign(worker, session, priv, DIGEST))[1] == 64
        finally:
            await worker.aclose()


async def test_a_hanging_call_times_out_while_other_lanes_serve(softhsm_env: dict[str, str], fault_module: str) -> None:
    with trio.fail_after(30):
        worker = await started(fault_module, softhsm_env, lanes=2, call_timeout=1.0)
        try:
            session = await login(worker)
            pub, priv = await ec_key_pair(worker, session)
            other = await worker.call("C_OpenSession", [await worker.call("KG_FindToken", [LABEL, None]), RW])
            timed_out: list[float] = []

            async def hang() -> None:
                start = time.monotonic()
                with pytest.raises(DeviceError, match="timed out after 1 s"):
                    await sign(worker, session, priv, b"hang" + DIGEST[4:])
                timed_out.append(time.monotonic() - start)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hang)
                await trio.sleep(0.2)
                signature, _ = await sign(worker, other, priv, DIGEST)  # the other lane
                await verify(worker, other, pub, DIGEST, signature)
            assert 0.9 <= timed_out[0] < 3.0
            assert worker.generation == 0  # one stuck lane of two: the worker keeps serving
            assert (await sign(worker, other, priv, DIGEST))[1] == 64

            with pytest.raises(DeviceError, match="timed out"):  # the last lane sticks: killed and restarted
                await sign(worker, other, priv, b"hang" + DIGEST[4:])
            session = await login(worker)
            assert worker.generation == 1 and worker.lanes == 2
        finally:
            await worker.aclose()


async def test_a_module_that_cannot_lock_gets_one_lane(softhsm_env: dict[str, str], fault_module: str) -> None:
    with trio.fail_after(30):
        worker = await started(fault_module, {**softhsm_env, "KEYGRID_FAULT_CANT_LOCK": "1"}, lanes=4)
        try:
            assert not worker.threads_ok and worker.lanes == 1
            session = await login(worker)
            randoms: list[bytes] = []

            async def draw() -> None:
                randoms.append(await worker.call("C_GenerateRandom", [session, 16]))

            async with trio.open_nursery() as nursery:  # queued on the one lane
                for _ in range(6):
                    nursery.start_soon(draw)
            assert len(set(randoms)) == 6
        finally:
            await worker.aclose()


async def test_failed_restarts_fail_calls_at_once_and_are_retried(softhsm_env: dict[str, str], tmp_path: Path) -> None:
    module = tmp_path / "libcopy.so"
    shutil.copy(SOFTHSM, module)
    with trio.fail_after(30):
        worker = await started(str(module), softhsm_env, call_timeout=0.5)
        try:
            pid = worker.pid
            assert pid is not None
            module.rename(tmp_path / "hidden.so")  # the module disappears, then the worker dies
            os.kill(pid, signal.SIGKILL)
            message = ""
            while "is down" not in message:  # until a restart attempt has failed: from then on calls fail at once
                try:
                    await worker.call("C_GetInfo", [])
                except DeviceError as exc:  # "died" (in flight), "no lane" (waiting), then "is down"
                    message = str(exc)
                await trio.sleep(0.05)
            assert f"cannot load PKCS#11 module {module}" in message
            assert not worker.ready
            start = trio.current_time()
            with pytest.raises(DeviceError):
                await worker.call("C_GetInfo", [])
            assert trio.current_time() - start < 0.1
            (tmp_path / "hidden.so").rename(module)
            while not worker.ready:  # the next attempt, after the backoff, succeeds
                await trio.sleep(0.05)
            assert worker.generation == 1
            assert (await worker.call("C_GetInfo", []))["manufacturer_id"] == "SoftHSM"
        finally:
            await worker.aclose()


async def test_missing_module_fails_to_start_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-module.so")
    with trio.fail_after(20):
        worker = ModuleWorker(missing, lanes=None, call_timeout=5.0, env={})
        with pytest.raises(WorkerFailed, match=re.escape(missing)):
            await worker.start()
        assert not worker.ready


async def test_aclose_reaps_the_worker(softhsm_env: dict[str, str]) -> None:
    with trio.fail_after(20):
        worker = await started(SOFTHSM, softhsm_env)
        pid = worker.pid
        assert pid is not None
        await worker.aclose()
        assert not worker.ready
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped: no zombie left
        with pytest.raises(DeviceError):
            await worker.call("C_GetInfo", [])
