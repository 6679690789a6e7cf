"""The module worker's C lanes (libkeygrid-worker.so) with a real SoftHSM2: which calls they answer themselves.

``worker.serve_native`` runs in a process of its own (SoftHSM2 is initialised
once per process) on one socket pair, with the worker's ``answer`` wrapped to
record what reaches Python. The operation calls of a signature, a
verification, a digest and random bytes must be answered in C; the rest
(opening, login, key generation, a structured mechanism parameter) in Python;
and both must give working results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from keygridd.pkcs11 import CKA, CKM, CKU
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.flags import SessionFlag
from keygridd.pkcs11.params import Mechanism, PssParams
from keygridd.protocol.framing import HEADER
from keygridd.providers.pkcs11 import worker
from keygridd.providers.pkcs11.ckapi import Module
from keygridd.providers.pkcs11.supervisor import _reply, _result
from tests.softhsm import SOFTHSM_MODULE, softhsm_tokens

pytestmark = pytest.mark.softhsm

LABEL, SO_PIN, PIN = "kg", b"12345678", b"1234"
REPO = Path(__file__).resolve().parents[2]


def _receive(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + HEADER.unpack(data[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("the lane ended")
        data += chunk
    return data[4:]


def scenario() -> None:
    """Run in a child process: serve one lane from C, make the calls, print what reached Python (JSON)."""
    lib = worker.native_library()
    assert lib is not None, "libkeygrid-worker.so is not installed"
    module = Module(SOFTHSM_MODULE)
    python_calls: list[str] = []
    answer = worker.answer

    def recorded(m: Module, body: bytes) -> bytes:
        python_calls.append(worker.decode_request(body)[0])
        return answer(m, body)

    worker.answer = recorded
    ours, theirs = socket.socketpair()
    lanes = threading.Thread(target=worker.serve_native, args=(lib, [theirs], module))
    lanes.start()

    def call(method: str, args: list[Any]) -> Any:
        ours.sendall(worker.encode_request(method, args))
        return _result(method, args, _reply(_receive(ours)))

    slot = call("KG_FindToken", [LABEL, None])
    session = call("C_OpenSession", [slot, int(SessionFlag.SERIAL_SESSION | SessionFlag.RW_SESSION)])
    call("C_Login", [session, CKU.USER, PIN])
    public = {CKA.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"), CKA.VERIFY: True}
    (pub, _), (priv, _) = call("C_GenerateKeyPair", [session, Mechanism(CKM.EC_KEY_PAIR_GEN), public, {CKA.SIGN: True}])
    setup = list(python_calls)
    python_calls.clear()

    digest = bytes(range(32))
    call("C_SignInit", [session, Mechanism(CKM.ECDSA), priv])
    signature, length = call("C_Sign", [session, digest, None])
    call("C_VerifyInit", [session, Mechanism(CKM.ECDSA), pub])
    call("C_Verify", [session, digest, signature])
    call("C_VerifyInit", [session, Mechanism(CKM.ECDSA), pub])
    try:
        call("C_Verify", [session, digest, bytes(64)])
        bad = "accepted"
    except PKCS11Error as exc:
        bad = exc.message
    call("C_DigestInit", [session, Mechanism(CKM.SHA256)])
    call("C_DigestUpdate", [session, b"abc"])
    digest_abc, _ = call("C_DigestFinal", [session, None])
    random = call("C_GenerateRandom", [session, 16])
    in_c = list(python_calls)
    python_calls.clear()

    pss = Mechanism(CKM.SHA256_RSA_PKCS_PSS, PssParams(CKM.SHA256, 2, 32))
    structured = "signed"
    try:
        call("C_SignInit", [session, pss, priv])  # to Python; SoftHSM2 takes it for an EC key ...
        call("C_Sign", [session, digest, None])  # ... and fails the signature (answered in C)
    except PKCS11Error as exc:
        structured = type(exc).__name__
    ours.close()
    lanes.join()
    module.finalize()
    print(json.dumps({
        "setup": setup, "in_c": in_c, "after": python_calls, "signature": [len(signature), length],
        "bad": bad, "digest": digest_abc.hex(), "random": len(random), "structured": structured,
    }))  # fmt: skip


def test_operation_calls_are_answered_in_c_and_the_rest_in_python(tmp_path: Path) -> None:
    env = {**os.environ, **softhsm_tokens(tmp_path, [LABEL], SO_PIN, PIN), "PYTHONPATH": str(REPO)}
    code = "from tests.integration.test_pkcs11_lanes import scenario; scenario()"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["setup"] == ["KG_FindToken", "C_OpenSession", "C_Login", "C_GenerateKeyPair"]
    assert seen["in_c"] == []  # sign, verify (good and bad), digest, random: not one reached Python
    assert seen["signature"] == [64, 64]
    assert seen["bad"] == "C_Verify: the module's answer"
    assert seen["digest"].startswith("ba7816bf")
    assert seen["random"] == 16
    assert seen["after"] == ["C_SignInit"]  # a structured parameter goes to Python, which passes it on
    assert seen["structured"] == "GeneralError"  # SoftHSM2's own answer to a PSS signature with an EC key
