"""The PKCS#11 module worker: one process per module, serving calls on inherited socket "lanes".

Run by ``supervisor.ModuleWorker`` as::

    python -m keygridd.providers.pkcs11.worker --module PATH --lanes N --fds a,b,c

It loads the module (``ckapi.Module``), writes a hello frame on lane 0 --
``{"threads_ok": bool, "lanes": n_used, "native": bool}``, or ``{"error":
message}`` and exit status 1 when the module cannot be loaded or initialised --
then serves each used lane from a thread of its own: read a request, call the
module, write the reply. A module that cannot lock (CKR_CANT_LOCK) is served on
lane 0 only. When every lane is closed the worker calls C_Finalize and exits.

``native``: the lanes are served by ``libkeygrid-worker.so``
(``keygrid_pkcs11_shim/lanes.c``, installed beside the shim in
``keygridd/lib``). Its threads answer the calls of cryptographic operations
on the module's function list without the interpreter and hand every other
request to ``answer`` here, so both give the same replies.
``KEYGRID_WORKER_NATIVE=0`` in the worker's environment, or the library
missing (a build without a C compiler), serves every lane from Python.

The lane protocol (private to this module and ``supervisor.py``): a frame is
a 4-byte big-endian length and one MessagePack value. A request is
``[method, args]`` with ``args`` in the call table's wire encoding
(``codec.encode_args``); the extension calls ``KG_FindAll [session,
template]``, ``KG_Meta [session, [handle...]]`` and ``KG_FindToken [label,
serial]`` (each str or nil) are plain arrays. A reply is ``[0, result]`` or
``[rv, result, message]``; attribute values travel as ``codec.encode_value``
gives them. ``encode_request`` and ``decode_result`` are the daemon's side.

The worker never logs PINs or data: its stderr gets short lines naming a
function and an exception type. It ignores SIGINT (the daemon decides when it
ends), dies with the daemon process (a thread watching a pidfd of it) and
writes no core dumps.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from keygridd.core.remote import META_TYPES
from keygridd.pkcs11._constants import CKR
from keygridd.pkcs11.attributes import ULONG_MAX, AttrValue
from keygridd.pkcs11.errorbase import PKCS11Error
from keygridd.pkcs11.errors import ArgumentsBad
from keygridd.protocol.calls import BY_NAME
from keygridd.protocol.codec import (
    decode_args,
    decode_template,
    decode_value,
    encode_args,
    encode_template,
    encode_value,
    pack,
    unpack,
)
from keygridd.protocol.framing import HEADER
from keygridd.providers.pkcs11.ckapi import CREATES, Module
from keygridd.providers.pkcs11.ckstructs import POINTER_PARAMS

MAX_FRAME = 1 << 27  # well above any PKCS#11 value a module returns (ckstructs.MAX_BUFFER is 64 MiB)
MAX_ATTRIBUTES = 1 << 16
EXTENSIONS = ("KG_FindAll", "KG_Meta", "KG_FindToken")
NATIVE_LIB = "libkeygrid-worker.so"


# --- requests ---------------------------------------------------------------------------------------------


def encode_request(method: str, args: Sequence[Any]) -> bytes:
    """The frame for one call (daemon side); ``args`` as ``ckapi.Module.call`` takes them."""
    call = BY_NAME.get(method)
    if call is not None and method.startswith("C_"):
        raw: Any = encode_args(call, args)
    elif method == "KG_FindAll":
        template = args[1].items() if isinstance(args[1], dict) else args[1]
        raw = [int(args[0]), encode_template(list(template))]
    elif method == "KG_Meta":
        raw = [int(args[0]), [int(h) for h in args[1]]]
    elif method == "KG_FindToken":
        raw = [args[0], args[1]]
    else:
        raise ArgumentsBad(f"{method} is not served by the module worker")
    body = pack([method, raw])
    return HEADER.pack(len(body)) + body


def _ulong(value: object, name: str) -> int:
    if type(value) is int and 0 <= value <= ULONG_MAX:
        return value
    raise ArgumentsBad(f"{name}: expected an unsigned integer")


def _text_or_nil(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ArgumentsBad(f"{name}: expected a string or nil")


def decode_request(body: bytes) -> tuple[str, list[Any]]:
    """``(method, args)`` of a request frame (worker side); raises ArgumentsBad naming what is wrong."""
    try:
        request = unpack(body)
    except ValueError:
        raise ArgumentsBad("malformed request") from None
    if not (isinstance(request, list) and len(request) == 2 and isinstance(request[0], str)):
        raise ArgumentsBad("a request is [method, args]")
    method, raw = request
    call = BY_NAME.get(method)
    if call is not None and method.startswith("C_"):
        return method, decode_args(call, raw, MAX_ATTRIBUTES)
    if method not in EXTENSIONS:
        raise ArgumentsBad(f"{method} is not served by the module worker")
    if not (isinstance(raw, list) and len(raw) == 2):
        raise ArgumentsBad(f"{method}: expected 2 arguments")
    if method == "KG_FindAll":
        return method, [_ulong(raw[0], "session"), decode_template(raw[1], max_attributes=MAX_ATTRIBUTES)]
    if method == "KG_Meta":
        if not isinstance(raw[1], list):
            raise ArgumentsBad("handles: expected an array")
        return method, [_ulong(raw[0], "session"), [_ulong(h, "handles") for h in raw[1]]]
    return method, [_text_or_nil(raw[0], "label"), _text_or_nil(raw[1], "serial")]


# --- results ----------------------------------------------------------------------------------------------


def _encode_values(values: Sequence[AttrValue | None] | None) -> list[Any] | None:
    if values is None:
        return None
    return [None if v is None else encode_value(v) for v in values]


def _decode_values(types: Sequence[int], values: Sequence[Any] | None) -> list[AttrValue | None] | None:
    if values is None:
        return None
    return [None if v is None else decode_value(t, v) for t, v in zip(types, values, strict=True)]


def encode_result(method: str, result: Any) -> Any:
    """``result`` of ``method`` as the reply carries it (worker side)."""
    if result is None:
        return None
    if method == "C_GetAttributeValue":
        return _encode_values(result)
    if method in CREATES:
        return [result[0], _encode_values(result[1])]
    if method in ("C_GenerateKeyPair", "KG_FindAll"):
        return [[handle, _encode_values(meta)] for handle, meta in result]
    if method == "KG_Meta":
        return [_encode_values(meta) for meta in result]
    return result


def decode_result(method: str, args: Sequence[Any], result: Any) -> Any:
    """A reply's result with attribute values typed again (daemon side)."""
    if result is None:
        return None
    if method == "C_GetAttributeValue":
        return _decode_values(args[2], result)
    if method in CREATES:
        return [result[0], _decode_values(META_TYPES, result[1])]
    if method in ("C_GenerateKeyPair", "KG_FindAll"):
        return [[handle, _decode_values(META_TYPES, meta)] for handle, meta in result]
    if method == "KG_Meta":
        return [_decode_values(META_TYPES, meta) for meta in result]
    return result


# --- serving ----------------------------------------------------------------------------------------------


def _complain(line: str) -> None:
    """One short line on stderr: never values, PINs or data."""
    try:
        sys.stderr.write(f"keygrid-pkcs11-worker: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def answer(module: Module, body: bytes) -> bytes:
    """The reply frame to one request frame."""
    method = "?"
    try:
        method, args = decode_request(body)
        reply: list[Any] = [0, encode_result(method, module.call(method, args))]
    except PKCS11Error as exc:
        reply = [exc.rv, encode_result(method, exc.result), exc.message]
    except Exception as exc:  # a bug here or in ctypes marshalling: CKR_GENERAL_ERROR, not a dead lane
        _complain(f"{method}: internal error {type(exc).__name__}")
        reply = [int(CKR.GENERAL_ERROR), None, f"module worker: {type(exc).__name__} in {method}"]
    out = pack(reply)
    return HEADER.pack(len(out)) + out


def serve_lane(sock: socket.socket, module: Module) -> None:
    """Requests and replies on one lane until the daemon closes it."""
    reader = sock.makefile("rb")
    try:
        while True:
            header = reader.read(4)
            if len(header) < 4:
                return
            (length,) = HEADER.unpack(header)
            if not 0 < length <= MAX_FRAME:
                _complain(f"frame length {length} outside 1..{MAX_FRAME}; closing the lane")
                return
            body = reader.read(length)
            if len(body) < length:
                return
            sock.sendall(answer(module, body))
    except OSError:
        return  # the daemon closed the lane (or gave up on it) while we worked
    finally:
        reader.close()
        sock.close()


# kg_lane_fallback (lanes.h): int (*)(int lane, const uint8_t *body, size_t len, struct kg_reply *out)
_FALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def native_library() -> ctypes.CDLL | None:
    """``libkeygrid-worker.so`` ready to call; None when it is not installed or KEYGRID_WORKER_NATIVE=0."""
    if os.environ.get("KEYGRID_WORKER_NATIVE", "1") == "0":
        return None
    path = str(resources.files("keygridd") / "lib" / NATIVE_LIB)
    if not os.path.isfile(path):
        return None
    lib = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
    lib.kg_lanes_serve.restype = ctypes.c_int
    lib.kg_lanes_serve.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_int,
        ctypes.c_void_p,
        _FALLBACK,
        ctypes.POINTER(ctypes.c_ulong),
        ctypes.c_size_t,
        ctypes.c_uint32,
    ]
    lib.kg_reply_set.restype = None
    lib.kg_reply_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    return lib


def serve_native(lib: ctypes.CDLL, socks: Sequence[socket.socket], module: Module) -> None:
    """Serve the lanes from the library's threads until every one is closed (the library closes them)."""

    def fallback(lane: int, body: int, length: int, out: int) -> int:
        try:
            frame = answer(module, ctypes.string_at(body, length))
            lib.kg_reply_set(out, frame, len(frame))
        except BaseException:  # never let an exception unwind into C: end this lane instead
            return -1
        return 0

    callback = _FALLBACK(fallback)  # referenced until kg_lanes_serve returns
    fds = (ctypes.c_int * len(socks))(*[sock.detach() for sock in socks])
    pointers = (ctypes.c_ulong * len(POINTER_PARAMS))(*sorted(POINTER_PARAMS))
    lib.kg_lanes_serve(fds, len(fds), module.function_list, callback, pointers, len(pointers), MAX_FRAME)


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the daemon) ends, even in the middle of a module call.

    Not PR_SET_PDEATHSIG: its "parent" is the thread that forked us, and trio
    spawns from a cached worker thread that exits after 10 s idle, which
    would kill a healthy worker. A thread waits on a pidfd of the daemon
    instead (polling the parent pid where pidfds are not available).
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(parent)
        except (OSError, AttributeError):
            while os.getppid() == parent:
                time.sleep(1.0)
        else:
            select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="daemon-watch", daemon=True).start()


def _harden() -> None:
    """No core dumps (they would hold PINs and keys); die with the daemon; leave SIGINT to the daemon."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _die_with(os.getppid())


def _send_hello(sock: socket.socket, hello: dict[str, Any]) -> None:
    body = pack(hello)
    sock.sendall(HEADER.pack(len(body)) + body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keygridd.providers.pkcs11.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--module", required=True, help="path of the PKCS#11 module")
    parser.add_argument("--lanes", required=True, type=int, help="number of lanes (inherited sockets)")
    parser.add_argument("--fds", required=True, help="comma-separated file descriptors of the lanes")
    options = parser.parse_args(argv)
    _harden()
    fds = [int(fd) for fd in options.fds.split(",")]
    if len(fds) != options.lanes or not fds:
        parser.error("--fds must name --lanes file descriptors")
    lanes = [socket.socket(fileno=fd) for fd in fds]
    for lane in lanes:
        lane.setblocking(True)
    try:
        module = Module(options.module)
    except OSError as exc:
        _send_hello(lanes[0], {"error": f"cannot load PKCS#11 module {options.module}: {exc}"})
        return 1
    except Exception as exc:
        _send_hello(lanes[0], {"error": f"PKCS#11 module {options.module}: {exc}"})
        return 1
    used = lanes if module.threads_ok else lanes[:1]
    for lane in lanes[len(used) :]:
        lane.close()
    try:
        native = native_library()
    except OSError as exc:
        _complain(f"{NATIVE_LIB} cannot be loaded ({type(exc).__name__}); serving from Python")
        native = None
    _send_hello(lanes[0], {"threads_ok": module.threads_ok, "lanes": len(used), "native": native is not None})
    if native is not None:
        serve_native(native, used, module)
        module.finalize()
        return 0
    threads = [threading.Thread(target=serve_lane, args=(lane, module), daemon=True) for lane in used[1:]]
    for thread in threads:
        thread.start()
    serve_lane(used[0], module)
    for thread in threads:
        thread.join()
    module.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
