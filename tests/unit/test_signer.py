"""The ECDSA signing thread's Python side (``keygridd.signer``) over the real ``libkeygrid-signer.so``.

Signatures of each curve verify with the mechanism's own verification,
handed to the thread or made on the caller's thread with a nonce the
thread precomputed (each once: no r twice; none when turned off); a
job's ``done`` is called once, from ``drain``; the thread's copy of a key
goes with the loaded key object; a key that is not an EC private key is not
taken (the call computes it inline); a full queue declines; ``close`` frees
every copy and drops the waiting calls; nothing of the key or the data
reaches the log.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keygridd import signer as signer_module
from keygridd.mechanisms.base import EcdsaJob, LoadedKey
from keygridd.mechanisms.ec import Ecdsa
from keygridd.pkcs11 import CKA, CKK, CKO
from keygridd.signer import Signer

CURVES = [(ec.SECP256R1(), 32), (ec.SECP384R1(), 48), (ec.SECP521R1(), 66)]


class Watcher:
    """The reactor's part: remembers the watched fd and its handler."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}

    def watch_reply(self, fd: int, on_readable: Callable[[], None]) -> None:
        self.watched[fd] = on_readable

    def unwatch_reply(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def run_until(self, fd: int, done: Callable[[], bool]) -> None:
        for _ in range(200):
            if done():
                return
            select.select([fd], [], [], 0.05)
            self.watched[fd]()
        raise AssertionError("the signatures did not come")


def loaded(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> LoadedKey:
    cls = CKO.PRIVATE_KEY if isinstance(key, ec.EllipticCurvePrivateKey) else CKO.PUBLIC_KEY
    return LoadedKey({CKA.CLASS: int(cls), CKA.KEY_TYPE: int(CKK.EC), CKA.SIGN: True, CKA.VERIFY: True}, key)


@pytest.fixture
def signer() -> Iterator[Signer]:
    started = signer_module.start()
    assert started is not None, "libkeygrid-signer.so is built by `make shim` and installed in keygridd/lib"
    yield started
    started.close()


def collect(results: list[tuple[Any, Exception | None]]) -> Callable[[Any, Exception | None], None]:
    return lambda value, error: results.append((value, error))


@pytest.mark.parametrize(("curve", "side"), CURVES, ids=["P-256", "P-384", "P-521"])
def test_signatures_verify(signer: Signer, curve: ec.EllipticCurve, side: int) -> None:
    private = ec.generate_private_key(curve)
    key = loaded(private)
    verify = Ecdsa().verify_init(loaded(private.public_key()), None)
    watcher = Watcher()
    inputs = [bytes([n]) * length for n, length in enumerate((1, 20, side, 64, 1024))]
    results: list[tuple[Any, Exception | None]] = []
    for data in inputs:
        assert signer.submit(EcdsaJob(key, data, side), collect(results), watcher)
    assert signer.busy()
    watcher.run_until(signer.fd, lambda: len(results) == len(inputs))
    assert not signer.busy()
    assert signer.signed == len(inputs)
    for data, (signature, error) in zip(inputs, results, strict=True):
        assert error is None
        assert len(signature) == 2 * side
        verify.verify(data, signature)  # raises SignatureInvalid
    assert signer.keys == 1  # one copy for all five


def test_the_copy_goes_with_the_loaded_key(signer: Signer) -> None:
    watcher = Watcher()
    results: list[tuple[Any, Exception | None]] = []
    key = loaded(ec.generate_private_key(ec.SECP256R1()))
    assert signer.submit(EcdsaJob(key, bytes(32), 32), collect(results), watcher)
    del key  # the job holds its own reference in C
    gc.collect()
    assert signer.keys == 0
    watcher.run_until(signer.fd, lambda: len(results) == 1)
    assert results[0][1] is None and len(results[0][0]) == 64


def test_what_it_does_not_take(signer: Signer) -> None:
    watcher = Watcher()
    public = loaded(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert not signer.submit(EcdsaJob(public, bytes(32), 32), collect([]), watcher)
    secret = LoadedKey({CKA.CLASS: int(CKO.SECRET_KEY)}, bytes(32))
    assert not signer.submit(EcdsaJob(secret, bytes(32), 32), collect([]), watcher)
    key = loaded(ec.generate_private_key(ec.SECP256R1()))
    assert not signer.submit(EcdsaJob(key, bytes(1025), 32), collect([]), watcher)  # longer than a hash value
    results: list[tuple[Any, Exception | None]] = []
    accepted = 0
    while accepted < 100 and signer.submit(EcdsaJob(key, bytes(32), 32), collect(results), watcher):
        accepted += 1
    assert accepted == 64  # the queue, until finished jobs are taken
    watcher.run_until(signer.fd, lambda: len(results) == 64)
    assert signer.submit(EcdsaJob(key, bytes(32), 32), collect(results), watcher)


def test_close_frees_keys_and_drops_waiting_calls(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    started = signer_module.start()
    assert started is not None
    watcher = Watcher()
    results: list[tuple[Any, Exception | None]] = []
    private = ec.generate_private_key(ec.SECP256R1())
    key = loaded(private)
    data = bytes(range(32))
    for _ in range(10):
        assert started.submit(EcdsaJob(key, data, 32), collect(results), watcher)
    started.close()
    started.close()  # twice is harmless
    assert started.keys == 0 and not started.busy() and started.fd not in watcher.watched
    assert not started.submit(EcdsaJob(key, data, 32), collect(results), watcher)
    del key
    gc.collect()  # the loaded key's callback finds its copy already freed
    assert results == []
    value = private.private_numbers().private_value.to_bytes(32, "big")
    for record in caplog.records:
        text = record.getMessage().encode()
        assert value not in text and value.hex().encode() not in text and data.hex().encode() not in text


@pytest.mark.parametrize(("curve", "side"), CURVES, ids=["P-256", "P-384", "P-521"])
def test_precomputed_nonces(signer: Signer, curve: ec.EllipticCurve, side: int) -> None:
    private = ec.generate_private_key(curve)
    key = loaded(private)
    verify = Ecdsa().verify_init(loaded(private.public_key()), None)
    assert signer.sign_now(EcdsaJob(key, bytes(side), side)) is None  # the curve's first: its pool starts
    seen: set[bytes] = set()
    deadline = time.monotonic() + 20
    while len(seen) < 150 and time.monotonic() < deadline:
        data = os.urandom(1 + len(seen) % 80)  # shorter than, equal to and longer than the order
        signature = signer.sign_now(EcdsaJob(key, data, side))
        if signature is None:
            time.sleep(0.002)  # the thread is filling the pool
            continue
        assert len(signature) == 2 * side
        verify.verify(data, signature)
        assert signature[:side] not in seen  # each precomputed pair signs once
        seen.add(signature[:side])
    assert len(seen) == 150
    assert signer.precomputed == 150 and signer.signed == 0


def test_no_precomputed_nonces_when_turned_off() -> None:
    started = signer_module.start(precompute=False)
    assert started is not None
    key = loaded(ec.generate_private_key(ec.SECP256R1()))
    for _ in range(20):
        assert started.sign_now(EcdsaJob(key, bytes(32), 32)) is None
        time.sleep(0.005)
    assert started.precomputed == 0
    started.close()
    assert started.sign_now(EcdsaJob(key, bytes(32), 32)) is None


def test_without_the_library_signatures_stay_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(signer_module, "LIBRARY", "libkeygrid-absent.so")
    caplog.set_level(logging.INFO, logger="keygridd.signer")
    assert signer_module.start() is None
    assert "computed on the loop" in caplog.text
