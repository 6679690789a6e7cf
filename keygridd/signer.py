"""ECDSA signatures on a thread beside the event loop (``libkeygrid-signer.so``).

keygridd serves every client from one loop on one core, and with several
clients signing, the ECDSA computation is about half of what that core does
(measured side by side: a daemon whose signatures cost nothing serves twice
as many). ``cryptography`` releases the interpreter's lock while OpenSSL
signs, but a Python thread must take the lock to start and to finish each
signature, and the loop waits for it at each hand-over (measured: slower
than signing inline). The signer is a thread in C
(``keygrid_pkcs11_shim/signer.c``) that never takes the lock: the loop
queues a job (the key, the hash value, the order length) and serves other
requests while the thread signs with OpenSSL; a finished job makes an
eventfd readable, which the reactor watches beside the connections and the
module lanes (``watch_reply``), and the call's reply goes out in the
reactor's next turn.

Only while several clients are busy is a signature handed over (the
dispatcher's ``hand_over``): with one client the hand-over is latency and
nothing else, so it is computed inline. A job the thread cannot take (its
queue is full) is computed by the call's task; both give an ECDSA signature
by OpenSSL with a random k.

Precomputed nonces (``precompute``): most of an ECDSA signature is k*G,
which does not depend on the key or the message. While it has no job, the
thread fills a pool per curve with (k^-1, r) pairs (OpenSSL's
``ECDSA_sign_setup``, k uniformly random from OpenSSL's private DRBG), and a
signature on the loop takes one pair out and finishes with two modular
multiplications (``ECDSA_do_sign_ex``, 6 us against 50-66 us for the whole
signature on the loop). Each pair is removed from the pool before it is
used, so none signs twice; the pairs are as secret as the keys and stay in
the daemon's memory, cleared when used or freed. When the pool of a curve is
empty (its first signature, or a burst faster than the thread refills it)
the signature goes the ways above. Unlike OpenSSL's own signing, such a k is
not also derived from the key and the message (a hedge against a broken
random generator), which is why ``server.ecdsa_precompute`` can turn it off.

Keys: the thread signs with its own copy of an EC private key, made once
from the loaded key's PKCS#8 encoding (those bytes live only for that call)
and freed when the loaded key object goes (the object destroyed or changed,
its session closed), or when the daemon stops.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import weakref
from importlib import resources

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keygridd.core.offload import Done, ReplyWatcher
from keygridd.mechanisms.base import EcdsaJob, LoadedKey
from keygridd.pkcs11.errors import FunctionFailed

log = logging.getLogger("keygridd.signer")

LIBRARY = "libkeygrid-signer.so"
SIDE_MAX = 66  # P-521's order length, the longest r or s


def load_library() -> ctypes.CDLL | None:
    """The signer's library with its prototypes, or None when it is not installed."""
    path = resources.files("keygridd") / "lib" / LIBRARY
    if not path.is_file():
        return None
    lib = ctypes.PyDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)  # short calls: the lock is kept
    vp, sz, u64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64
    lib.kg_signer_new.argtypes, lib.kg_signer_new.restype = [], vp
    lib.kg_signer_fd.argtypes, lib.kg_signer_fd.restype = [vp], ctypes.c_int
    lib.kg_signer_free.argtypes, lib.kg_signer_free.restype = [vp], None
    lib.kg_signer_key.argtypes, lib.kg_signer_key.restype = [ctypes.c_char_p, sz], vp
    lib.kg_signer_key_free.argtypes, lib.kg_signer_key_free.restype = [vp], None
    lib.kg_signer_submit.argtypes = [vp, u64, vp, ctypes.c_char_p, sz, sz]
    lib.kg_signer_submit.restype = ctypes.c_int
    lib.kg_signer_sign.argtypes = [vp, vp, ctypes.c_char_p, sz, sz, ctypes.c_char_p]
    lib.kg_signer_sign.restype = sz
    lib.kg_signer_take.argtypes = [vp, ctypes.POINTER(u64), ctypes.c_char_p, ctypes.POINTER(sz)]
    lib.kg_signer_take.restype = ctypes.c_int
    return lib


class Signer:
    """The thread, its keys, and the calls waiting for their signatures. Used from the loop only."""

    def __init__(self, lib: ctypes.CDLL, precompute: bool = True) -> None:
        self._lib = lib
        self.precompute = precompute
        handle = lib.kg_signer_new()
        if not handle:
            raise OSError("the signing thread could not be started")
        self._handle: int | None = handle
        self.fd: int = lib.kg_signer_fd(handle)
        self._ids = itertools.count(1)
        self._waiting: dict[int, Done] = {}
        self._keys: dict[int, tuple[weakref.ref[LoadedKey], int]] = {}  # by id() of the loaded key
        self._watcher: ReplyWatcher | None = None
        self.signed = 0  # signatures the thread made
        self.precomputed = 0  # signatures made on the loop with a nonce the thread precomputed
        self._id = ctypes.c_uint64()
        self._len = ctypes.c_size_t()
        self._out = ctypes.create_string_buffer(2 * SIDE_MAX)

    @property
    def keys(self) -> int:
        """How many keys the thread holds a copy of."""
        return len(self._keys)

    def busy(self) -> bool:
        """Are signatures in flight?"""
        return bool(self._waiting)

    def _native(self, key: LoadedKey) -> int | None:
        found = self._keys.get(id(key))
        if found is not None and found[0]() is key:
            return found[1]
        if self._handle is None or not isinstance(key.material, ec.EllipticCurvePrivateKey):
            return None
        der = key.material.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        native: int | None = self._lib.kg_signer_key(der, len(der))
        del der
        if not native:
            return None
        key_id = id(key)
        self._keys[key_id] = (weakref.ref(key, lambda _: self._forget(key_id, native)), native)
        return native

    def _forget(self, key_id: int, native: int) -> None:
        found = self._keys.get(key_id)
        if found is not None and found[1] == native:  # else close() freed it
            del self._keys[key_id]
            self._lib.kg_signer_key_free(native)  # queued jobs hold references of their own

    def sign_now(self, job: EcdsaJob) -> bytes | None:
        """The signature, made at once with a precomputed nonce; None when none is ready (sign another way)."""
        if not self.precompute:
            return None
        native = self._native(job.key)
        if native is None or self._handle is None:
            return None
        out = self._out
        n = self._lib.kg_signer_sign(self._handle, native, job.data, len(job.data), job.side, out)
        if not n:
            return None
        self.precomputed += 1
        return out.raw[:n]  # a signature is no secret: it goes to the client as it is (the buffer is not cleared)

    def submit(self, job: EcdsaJob, done: Done, watcher: ReplyWatcher) -> bool:
        """Queue ``job``; ``done(signature, error)`` is called from the reactor's turn. False: not queued
        (the queue is full, or the key cannot be copied): compute it inline."""
        native = self._native(job.key)
        if native is None or self._handle is None:
            return False
        job_id = next(self._ids)
        if self._lib.kg_signer_submit(self._handle, job_id, native, job.data, len(job.data), job.side) != 1:
            return False
        self._waiting[job_id] = done
        if self._watcher is not watcher:
            self._watcher = watcher
            watcher.watch_reply(self.fd, self.drain)
        return True

    def drain(self) -> None:
        """Hand every finished signature to its call."""
        lib, out, job_id, length = self._lib, self._out, self._id, self._len
        while self._handle is not None and lib.kg_signer_take(
            self._handle, ctypes.byref(job_id), out, ctypes.byref(length)
        ):
            done = self._waiting.pop(job_id.value, None)
            n = length.value
            signature = out.raw[:n]
            if done is None:
                continue
            if n:
                self.signed += 1
                done(signature, None)
            else:
                done(None, FunctionFailed("the ECDSA signature failed"))

    def close(self) -> None:
        """Stop the thread and free its keys; calls still waiting are dropped (their connections are gone)."""
        if self._handle is None:
            return
        if self._watcher is not None:
            self._watcher.unwatch_reply(self.fd)
        self._lib.kg_signer_free(self._handle)
        self._handle = None
        self._waiting.clear()
        keys, self._keys = self._keys, {}
        for _, native in keys.values():
            self._lib.kg_signer_key_free(native)


def start(precompute: bool = True) -> Signer | None:
    """The signer, or None when its library is not installed (a build without a C compiler) or its thread
    cannot start: signatures are then computed on the loop."""
    lib = load_library()
    if lib is None:
        log.info("%s is not installed: ECDSA signatures are computed on the loop", LIBRARY)
        return None
    try:
        return Signer(lib, precompute)
    except OSError as exc:
        log.warning("%s: ECDSA signatures are computed on the loop", exc)
        return None
