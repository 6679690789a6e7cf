"""Consumer processes for tests/consumers: ``python driver.py SCENARIO ARGS...``.

Each scenario loads libkeygrid-pkcs11.so (path in ``KEYGRID_SHIM``, daemon in
``KEYGRID_SOCKET``) in this process, does its work and prints one JSON object
(``restart`` prints one per command it reads from stdin). The tests check the
results, so a failure here is reported, not asserted.

* ``py11-*``: python-pkcs11 (``pkcs11.lib(path)``) as an application would use it.
* ``fork``, ``threads``, ``restart``: ctypes on the module's exported ``C_*``
  functions, to control C_Initialize, fork and sessions exactly.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import threading
import time
from ctypes import byref, c_ubyte, c_ulong, c_void_p
from typing import Any

CK_ULONG = c_ulong
CKF_OS_LOCKING_OK = 0x2
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKU_USER = 1
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKA_CLASS, CKA_LABEL, CKA_EC_POINT = 0x0, 0x3, 0x181
CKM_ECDSA = 0x1041
CKR_OK = 0
CKR_USER_ALREADY_LOGGED_IN = 0x100


def emit(value: Any) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------------------------
# ctypes: the few C_* calls the fork, threads and restart scenarios need
# --------------------------------------------------------------------------------------------------------------------


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", c_void_p),
        ("DestroyMutex", c_void_p),
        ("LockMutex", c_void_p),
        ("UnlockMutex", c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", c_void_p),
    ]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class CkError(Exception):
    def __init__(self, call: str, rv: int) -> None:
        super().__init__(f"{call} -> CK_RV 0x{rv:x}")
        self.call, self.rv = call, rv


class Module:
    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self._fns: dict[str, Any] = {}

    def raw(self, name: str, *args: Any) -> int:
        fn = self._fns.get(name)
        if fn is None:
            fn = getattr(self.lib, name)
            fn.restype = CK_ULONG
            self._fns[name] = fn
        return int(fn(*args))

    def call(self, name: str, *args: Any) -> None:
        rv = self.raw(name, *args)
        if rv != CKR_OK:
            raise CkError(name, rv)

    def initialize(self) -> int:
        args = CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)
        return self.raw("C_Initialize", byref(args))

    def open_session(self, slot: int = 0) -> int:
        handle = CK_ULONG(0)
        self.call("C_OpenSession", CK_ULONG(slot), CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION), None, None,
                  byref(handle))  # fmt: skip
        return handle.value

    def login(self, session: int, pin: str) -> None:
        data = pin.encode()
        rv = self.raw("C_Login", CK_ULONG(session), CK_ULONG(CKU_USER), data, CK_ULONG(len(data)))
        if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            raise CkError("C_Login", rv)

    def find(self, session: int, label: str, cls: int) -> int:
        label_b = label.encode()
        cls_v = CK_ULONG(cls)
        template = (CK_ATTRIBUTE * 2)(
            CK_ATTRIBUTE(CKA_CLASS, ctypes.cast(byref(cls_v), c_void_p), ctypes.sizeof(cls_v)),
            CK_ATTRIBUTE(CKA_LABEL, ctypes.cast(ctypes.c_char_p(label_b), c_void_p), len(label_b)),
        )
        self.call("C_FindObjectsInit", CK_ULONG(session), template, CK_ULONG(2))
        found, count = (CK_ULONG * 2)(), CK_ULONG(0)
        try:
            self.call("C_FindObjects", CK_ULONG(session), found, CK_ULONG(2), byref(count))
        finally:
            self.call("C_FindObjectsFinal", CK_ULONG(session))
        if count.value != 1:
            raise LookupError(f"{count.value} objects labelled {label!r} of class {cls}")
        return int(found[0])

    def attribute(self, session: int, obj: int, attr: int) -> bytes:
        buf = ctypes.create_string_buffer(1024)
        template = CK_ATTRIBUTE(attr, ctypes.cast(buf, c_void_p), 1024)
        self.call("C_GetAttributeValue", CK_ULONG(session), CK_ULONG(obj), byref(template), CK_ULONG(1))
        return buf.raw[: template.ulValueLen]

    def sign_rv(self, session: int, key: int, data: bytes) -> tuple[int, bytes]:
        mech = CK_MECHANISM(CKM_ECDSA, None, 0)
        rv = self.raw("C_SignInit", CK_ULONG(session), byref(mech), CK_ULONG(key))
        if rv != CKR_OK:
            return rv, b""
        out, size = (c_ubyte * 132)(), CK_ULONG(132)
        rv = self.raw("C_Sign", CK_ULONG(session), data, CK_ULONG(len(data)), out, byref(size))
        return rv, bytes(out[: size.value])

    def sign(self, session: int, key: int, data: bytes) -> bytes:
        rv, sig = self.sign_rv(session, key, data)
        if rv != CKR_OK:
            raise CkError("C_SignInit/C_Sign", rv)
        return sig


def digest(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest()


def signer(module: Module, label: str, pin: str) -> tuple[int, int]:
    session = module.open_session()
    module.login(session, pin)
    return session, module.find(session, label, CKO_PRIVATE_KEY)


def scenario_fork(label: str, pin: str, children: str, count: str) -> None:
    module = Module(os.environ["KEYGRID_SHIM"])
    init_rv = module.initialize()
    session, key = signer(module, label, pin)
    point = module.attribute(session, module.find(session, label, CKO_PUBLIC_KEY), CKA_EC_POINT)
    before = module.sign(session, key, digest("parent-before")).hex()
    pipes = []
    for child in range(int(children)):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report through the pipe, never return into the parent's code
            os.close(read_fd)
            report: dict[str, Any] = {"child": child}
            try:
                report["rv_before_init"] = module.raw("C_OpenSession", CK_ULONG(0),
                                                      CK_ULONG(CKF_SERIAL_SESSION), None, None, byref(CK_ULONG()))  # fmt: skip
                report["init_rv"] = module.initialize()
                s, k = signer(module, label, pin)
                report["sigs"] = [
                    [digest(f"child{child}-{i}").hex(), module.sign(s, k, digest(f"child{child}-{i}")).hex()]
                    for i in range(int(count))
                ]
                module.raw("C_Finalize", None)
            except Exception as exc:
                report["error"] = repr(exc)
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(report))
            os._exit(0)
        os.close(write_fd)
        pipes.append((pid, read_fd))
    reports = []
    for pid, read_fd in pipes:
        with os.fdopen(read_fd) as src:
            text = src.read()
        _, status = os.waitpid(pid, 0)
        reports.append({**(json.loads(text) if text else {"error": "no report"}), "status": status})
    after = module.sign(session, key, digest("parent-after")).hex()
    module.raw("C_Finalize", None)
    emit({"init_rv": init_rv, "ec_point": point.hex(), "before": before, "after": after, "children": reports})


def scenario_threads(label: str, pin: str, threads: str, count: str) -> None:
    module = Module(os.environ["KEYGRID_SHIM"])
    module.call("C_Initialize", byref(CK_C_INITIALIZE_ARGS(None, None, None, None, CKF_OS_LOCKING_OK, None)))
    session, key = signer(module, label, pin)
    point = module.attribute(session, module.find(session, label, CKO_PUBLIC_KEY), CKA_EC_POINT)
    results: dict[int, list[str]] = {}
    errors: list[str] = []
    barrier = threading.Barrier(int(threads) + 1)

    def work(index: int) -> None:
        try:
            own = module.open_session()
            messages = [digest(f"thread{index}-{i}") for i in range(int(count))]
            barrier.wait()
            results[index] = [module.sign(own, key, m).hex() for m in messages]
            module.call("C_CloseSession", CK_ULONG(own))
        except Exception as exc:
            errors.append(f"thread {index}: {exc!r}")
            barrier.abort()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(int(threads))]
    for worker in workers:
        worker.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    started = time.monotonic()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    module.raw("C_Finalize", None)
    emit({"ec_point": point.hex(), "elapsed": elapsed, "errors": errors,
          "sigs": {str(k): v for k, v in results.items()}})  # fmt: skip


def scenario_restart(label: str, pin: str) -> None:
    """Commands on stdin: ``open``, ``sign-old``, ``open-again``, ``quit``; one JSON line each."""
    module = Module(os.environ["KEYGRID_SHIM"])
    state: dict[str, int] = {}
    emit({"init_rv": module.initialize()})
    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "open":
                state["session"], state["key"] = session, key = signer(module, label, pin)
                point = module.attribute(session, module.find(session, label, CKO_PUBLIC_KEY), CKA_EC_POINT)
                emit({"sig": module.sign(session, key, digest("before")).hex(), "ec_point": point.hex()})
            elif command == "sign-old":
                started = time.monotonic()
                rv, _ = module.sign_rv(state["session"], state["key"], digest("old"))
                again, _ = module.sign_rv(state["session"], state["key"], digest("old"))
                emit({"rv": rv, "rv_again": again, "seconds": time.monotonic() - started})
            elif command == "open-again":
                session, key = signer(module, label, pin)
                emit({"sig": module.sign(session, key, digest("after")).hex()})
            elif command == "quit":
                emit({"finalize_rv": module.raw("C_Finalize", None)})
                return
        except Exception as exc:
            emit({"error": repr(exc), "rv": getattr(exc, "rv", None)})


# --------------------------------------------------------------------------------------------------------------------
# python-pkcs11
# --------------------------------------------------------------------------------------------------------------------


def py11_session(pin: str) -> Any:
    import pkcs11

    lib = pkcs11.lib(os.environ["KEYGRID_SHIM"])
    token = lib.get_token(token_label=os.environ.get("TOKEN_LABEL", "consumers"))
    return token, token.open(rw=True, user_pin=pin)


def scenario_py11_ec(pin: str) -> None:
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    token, session = py11_session(pin)
    with session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        public, private = params.generate_keypair(store=False, label="py11-ec")
        data = b"python-pkcs11 through KeyGrid"
        signature = private.sign(data, mechanism=Mechanism.ECDSA_SHA256)
        emit({
            "token": token.label,
            "manufacturer": token.manufacturer_id,
            "signature": signature.hex(),
            "ec_point": public[Attribute.EC_POINT].hex(),
            "verified": public.verify(data, signature, mechanism=Mechanism.ECDSA_SHA256),
            "tampered": public.verify(data + b"!", signature, mechanism=Mechanism.ECDSA_SHA256),
        })  # fmt: skip


def scenario_py11_rsa(pin: str) -> None:
    from pkcs11 import Attribute, KeyType, Mechanism

    _, session = py11_session(pin)
    with session:
        public, private = session.generate_keypair(KeyType.RSA, 2048, store=True, label="py11-rsa", id=b"\x51")
        data = b"python-pkcs11 RSA through KeyGrid"
        signature = private.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        emit({
            "signature": signature.hex(),
            "modulus": public[Attribute.MODULUS].hex(),
            "public_exponent": public[Attribute.PUBLIC_EXPONENT].hex(),
            "verified": public.verify(data, signature, mechanism=Mechanism.SHA256_RSA_PKCS),
        })  # fmt: skip


def scenario_py11_aes_gcm(pin: str) -> None:
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.mechanisms import GCMParams

    _, session = py11_session(pin)
    with session:
        key = session.generate_key(KeyType.AES, 256, store=False, label="py11-aes")
        nonce = session.generate_random(96)
        plaintext = b"secret message " * 70
        gcm = GCMParams(nonce, b"header", 128)
        ciphertext = key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm)
        decrypted = key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=gcm)
        try:
            key.decrypt(ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), mechanism=Mechanism.AES_GCM,
                        mechanism_param=gcm)  # fmt: skip
            tampered = "accepted"
        except Exception as exc:
            tampered = type(exc).__name__
        emit({
            "nonce": nonce.hex(),
            "plaintext_len": len(plaintext),
            "ciphertext_len": len(ciphertext),
            "roundtrip": decrypted == plaintext,
            "tampered": tampered,
            "value_len": key[Attribute.VALUE_LEN],
            "sensitive": key[Attribute.SENSITIVE],
        })  # fmt: skip


def scenario_py11_find(pin: str) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    _, session = py11_session(pin)
    with session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        params.generate_keypair(store=True, label="py11-find", id=b"\x61")
        found = list(session.get_objects({Attribute.LABEL: "py11-find"}))
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="py11-find")
        try:
            value = private[Attribute.VALUE]
            sensitive_read = f"returned {len(value)} bytes"
        except Exception as exc:
            sensitive_read = type(exc).__name__
        emit({
            "classes": sorted(int(o[Attribute.CLASS]) for o in found),
            "labels": sorted(o[Attribute.LABEL] for o in found),
            "id": private[Attribute.ID].hex(),
            "key_type": int(private[Attribute.KEY_TYPE]),
            "sign": private[Attribute.SIGN],
            "sensitive": private[Attribute.SENSITIVE],
            "extractable": private[Attribute.EXTRACTABLE],
            "private": private[Attribute.PRIVATE],
            "token": private[Attribute.TOKEN],
            "value": sensitive_read,
            "missing": len(list(session.get_objects({Attribute.LABEL: "no-such-label"}))),
        })  # fmt: skip


SCENARIOS = {
    "fork": scenario_fork,
    "threads": scenario_threads,
    "restart": scenario_restart,
    "py11-ec": scenario_py11_ec,
    "py11-rsa": scenario_py11_rsa,
    "py11-aes-gcm": scenario_py11_aes_gcm,
    "py11-find": scenario_py11_find,
}


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](*sys.argv[2:])
