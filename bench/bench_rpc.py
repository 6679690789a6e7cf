"""RPC throughput of keygridd next to its floor and its ceiling, from one run.

Usage: ``python bench/bench_rpc.py [--seconds 2] [--conns 1 4]``

For each operation and each number of concurrent connections it measures:

* keygridd: a daemon started for the run (one memory slot, its token
  initialised from a temporary config) driven through the sync client
  ``keygridd.client.connect``;
* echo: a bare trio server on a Unix socket that decodes each
  4-byte-length-prefixed MessagePack frame ``[0, id, "ping", []]`` and answers
  with a reply frame: the floor of any trio daemon. An operation that takes
  two round trips (``C_SignInit`` + ``C_Sign``) is compared with half the echo
  rate;
* cryptography: the same operation called in-process: the ceiling.

N connections are N worker processes (not threads, so the client side is not
serialised by one GIL), each with its own connection, session and keys. Every
cell runs for a fixed time after all its workers are ready. When keygridd
cannot be imported or started, its columns show "-" and the reason is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
P256_OID_DER = bytes.fromhex("06082a8648ce3d030107")  # OBJECT IDENTIFIER 1.2.840.10045.3.1.7 (prime256v1)
DIGEST = hashlib.sha256(b"keygrid benchmark").digest()
PLAINTEXT = bytes(1024)
SLOT_ID = 0
START_TIMEOUT = 20.0


def random_digits(count: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(count))


@dataclass(frozen=True)
class Op:
    name: str
    round_trips: int  # keygridd calls per operation


OPS = (
    Op("ping", 1),
    Op("ecdsa-p256-sign", 2),
    Op("ecdsa-p256-pipelined", 1),
    Op("ecdsa-p256-KG_Sign", 1),
    Op("rsa2048-sha256-sign", 2),
    Op("aes256-gcm-encrypt-1k", 2),
)


# --------------------------------------------------------------------------------------------------------------------
# Framing for the echo floor
# --------------------------------------------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks += chunk
    return bytes(chunks)


def echo_server_main(path: str, ready: Event) -> None:
    """A bare trio server: decode each request frame, send a reply frame."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while data := await stream.receive_some(65536):
                buffer += data
                while len(buffer) >= HEADER.size:
                    (length,) = HEADER.unpack_from(buffer)
                    if len(buffer) < HEADER.size + length:
                        break
                    request = msgpack.unpackb(bytes(buffer[HEADER.size : HEADER.size + length]))
                    del buffer[: HEADER.size + length]
                    reply = msgpack.packb([1, request[1], None, None])
                    await stream.send_all(HEADER.pack(len(reply)) + reply)

    async def serve() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        ready.set()
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(serve)


class EchoClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.next_id = 0

    def ping(self) -> None:
        self.next_id += 1
        frame = msgpack.packb([0, self.next_id, "ping", []])
        self.sock.sendall(HEADER.pack(len(frame)) + frame)
        (length,) = HEADER.unpack(recv_exactly(self.sock, HEADER.size))
        reply = msgpack.unpackb(recv_exactly(self.sock, length))
        if reply[1] != self.next_id:
            raise RuntimeError(f"reply {reply[1]} to request {self.next_id}")


# --------------------------------------------------------------------------------------------------------------------
# The operations, one setup per kind of target; each returns the call to repeat
# --------------------------------------------------------------------------------------------------------------------


def setup_cryptography(op: str, _stack: contextlib.ExitStack, _address: str, _pin: str) -> Callable[[], object]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if op.startswith("ecdsa-p256"):
        ec_key = ec.generate_private_key(ec.SECP256R1())
        prehashed = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        return lambda: ec_key.sign(DIGEST, prehashed)
    if op == "rsa2048-sha256-sign":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pkcs1v15, sha256 = padding.PKCS1v15(), hashes.SHA256()
        return lambda: rsa_key.sign(DIGEST, pkcs1v15, sha256)
    if op == "aes256-gcm-encrypt-1k":
        aead = AESGCM(AESGCM.generate_key(bit_length=256))
        return lambda: aead.encrypt(os.urandom(12), PLAINTEXT, None)
    raise ValueError(op)


def setup_echo(op: str, stack: contextlib.ExitStack, address: str, _pin: str) -> Callable[[], object]:
    client = EchoClient(address)
    stack.callback(client.sock.close)
    return client.ping


def setup_keygridd(op: str, stack: contextlib.ExitStack, address: str, pin: str) -> Callable[[], object]:
    from keygridd.client import connect
    from keygridd.pkcs11 import CKA, CKM, CKU
    from keygridd.pkcs11._constants import CKF_RW_SESSION, CKF_SERIAL_SESSION
    from keygridd.pkcs11.params import GcmParams, Mechanism

    c = stack.enter_context(connect(address))
    if op == "ping":
        return c.KG_Ping
    s = c.C_OpenSession(SLOT_ID, CKF_SERIAL_SESSION | CKF_RW_SESSION)
    c.C_Login(s, CKU.USER, pin.encode())
    private: dict[Any, Any] = {CKA.TOKEN: False, CKA.PRIVATE: True, CKA.SENSITIVE: True, CKA.SIGN: True}
    if op == "ecdsa-p256-sign":
        public = {CKA.TOKEN: False, CKA.VERIFY: True, CKA.EC_PARAMS: P256_OID_DER}
        _, ec_key = c.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), public, private)
        ecdsa = Mechanism(CKM.ECDSA)

        def sign_ec() -> object:
            c.C_SignInit(s, ecdsa, ec_key)
            return c.C_Sign(s, DIGEST)

        return sign_ec
    if op == "ecdsa-p256-pipelined":
        # C_SignInit and C_Sign written together: two calls, one round trip.
        public = {CKA.TOKEN: False, CKA.VERIFY: True, CKA.EC_PARAMS: P256_OID_DER}
        _, ec_key = c.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), public, private)
        calls = (("C_SignInit", [s, Mechanism(CKM.ECDSA), ec_key]), ("C_Sign", [s, DIGEST, None]))
        return lambda: c.pipeline(*calls)
    if op == "ecdsa-p256-KG_Sign":
        # One round trip: the key named by a PKCS#11 URI, found and used by the daemon.
        label = f"bench-{os.getpid()}"
        public = {CKA.TOKEN: True, CKA.VERIFY: True, CKA.EC_PARAMS: P256_OID_DER, CKA.LABEL: label.encode()}
        token_private = {**private, CKA.TOKEN: True, CKA.LABEL: label.encode()}
        c.C_GenerateKeyPair(s, Mechanism(CKM.EC_KEY_PAIR_GEN), public, token_private)
        uri, ecdsa = f"pkcs11:token=bench;object={label};type=private", Mechanism(CKM.ECDSA)
        return lambda: c.KG_Sign(uri, ecdsa, DIGEST)
    if op == "rsa2048-sha256-sign":
        public = {CKA.TOKEN: False, CKA.VERIFY: True, CKA.MODULUS_BITS: 2048, CKA.PUBLIC_EXPONENT: b"\x01\x00\x01"}
        _, rsa_key = c.C_GenerateKeyPair(s, Mechanism(CKM.RSA_PKCS_KEY_PAIR_GEN), public, private)
        sha256_rsa = Mechanism(CKM.SHA256_RSA_PKCS)

        def sign_rsa() -> object:
            c.C_SignInit(s, sha256_rsa, rsa_key)
            return c.C_Sign(s, DIGEST)

        return sign_rsa
    if op == "aes256-gcm-encrypt-1k":
        template = {CKA.TOKEN: False, CKA.VALUE_LEN: 32, CKA.ENCRYPT: True}
        aes_key = c.C_GenerateKey(s, Mechanism(CKM.AES_KEY_GEN), template)

        def encrypt() -> object:
            c.C_EncryptInit(s, Mechanism(CKM.AES_GCM, GcmParams(iv=os.urandom(12))), aes_key)
            return c.C_Encrypt(s, PLAINTEXT)

        return encrypt
    raise ValueError(op)


SETUPS = {"cryptography": setup_cryptography, "echo": setup_echo, "keygridd": setup_keygridd}


def worker_main(target: str, op: str, address: str, pin: str, seconds: float, barrier: Barrier, results: Any) -> None:
    """Set up, wait for the other workers of the cell, then repeat the call for ``seconds``."""
    try:
        with contextlib.ExitStack() as stack:
            call = SETUPS[target](op, stack, address, pin)
            call()  # a first call outside the measurement: warms caches, surfaces errors early
            barrier.wait(timeout=120)
            count, start = 0, time.perf_counter()
            deadline = start + seconds
            while True:
                for _ in range(16):
                    call()
                count += 16
                now = time.perf_counter()
                if now >= deadline:
                    break
            results.put(("ok", count / (now - start)))
    except Exception as exc:
        barrier.abort()
        results.put(("error", f"{target} {op}: {type(exc).__name__}: {exc}"))


def measure(ctx: Any, target: str, op: str, conns: int, address: str, seconds: float, pin: str = "") -> float:
    """Total operations per second of ``conns`` workers running ``op`` against ``target``."""
    barrier = ctx.Barrier(conns)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=worker_main, args=(target, op, address, pin, seconds, barrier, results))
        for _ in range(conns)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=seconds + 180) for _ in workers]
    for w in workers:
        w.join()
    errors = [detail for status, detail in outcomes if status == "error"]
    if errors:
        raise RuntimeError(errors[0])
    return float(sum(rate for _, rate in outcomes))


# --------------------------------------------------------------------------------------------------------------------
# The servers under test
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server(ctx: Any, directory: Path) -> Iterator[str]:
    path = str(directory / "echo.sock")
    ready = ctx.Event()
    process = ctx.Process(target=echo_server_main, args=(path, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError("the echo server did not start")
        yield path
    finally:
        process.terminate()
        process.join()


def keygridd_missing() -> str | None:
    """Why keygridd cannot be measured here, or None."""
    for module in ("keygridd.daemon", "keygridd.client"):
        try:
            found = importlib.util.find_spec(module)
        except ImportError:
            found = None
        if found is None:
            return f"{module} cannot be imported"
    return None


def keygridd_build() -> str:
    """Which keygridd the benchmarks run, for their headers."""
    compiled = os.environ.get("KEYGRIDD_COMPILED")
    return f"keygridd from the wheel in {compiled} (request path compiled)" if compiled else "keygridd as installed"


def keygridd_command(env: dict[str, str] | None = None) -> list[str]:
    """keygridd as installed, or with ``KEYGRIDD_COMPILED`` from the wheel unpacked there (``make compiled``:
    the request path compiled by mypyc, as it ships), which ``env`` (the daemon's) then imports first."""
    compiled = os.environ.get("KEYGRIDD_COMPILED")
    if compiled and env is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(compiled), env.get("PYTHONPATH")]))
        return [sys.executable, "-P", "-m", "keygridd.daemon"]
    script = Path(sys.executable).with_name("keygridd")
    if script.exists():
        return [str(script)]
    found = shutil.which("keygridd")
    return [found] if found else [sys.executable, "-m", "keygridd.daemon"]


@contextlib.contextmanager
def keygridd_server(
    directory: Path, user_pin: str, provider: str = "memory", options: dict[str, Any] | None = None
) -> Iterator[str]:
    """A keygridd with one slot whose token "bench" is initialised: the memory provider, the
    software token on LMDB (``provider="software"``), or a module's token (``provider="pkcs11"``
    with its ``options``; that token exists already)."""
    import yaml

    path = str(directory / "keygrid.sock")
    slot: dict[str, Any] = {"id": SLOT_ID, "provider": provider}
    if provider != "pkcs11":
        slot["token"] = {"label": "bench", "so_pin": random_digits(12), "user_pin": user_pin}
    if provider == "software":
        slot["options"] = {"backend": "lmdb", "path": str(directory / "tokens.lmdb")}
    if options is not None:
        slot["options"] = options
    config = {"server": {"socket": path}, "slots": [slot]}
    config_path = directory / "keygrid.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    config_path.chmod(0o600)
    log_path = directory / "keygridd.log"
    with log_path.open("wb") as log:
        # The daemon serves the socket in its config: no KEYGRID_* setting of the caller may override it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRID_")}
        process = subprocess.Popen(
            [*keygridd_command(env), "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        wait_for_keygridd(path, process, log_path)
        yield path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_keygridd(path: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    from keygridd.client import connect

    deadline = time.monotonic() + START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"keygridd exited with status {process.returncode}:\n{tail}")
        if os.path.exists(path):
            try:
                with connect(path) as c:
                    c.KG_Ping()
                return
            except Exception as exc:
                last_error = exc
        time.sleep(0.05)
    raise RuntimeError(f"keygridd did not answer on {path} within {START_TIMEOUT:.0f} s: {last_error}")


# --------------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------------


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.3g}"


def print_table(rows: list[tuple[Op, int, float | None, float | None, float | None]]) -> None:
    header = ("op", "conns", "keygridd ops/s", "echo ops/s", "cryptography ops/s", "keygridd/echo", "keygridd/crypto")
    lines = [header]
    for op, conns, kg, echo, crypto in rows:
        echo_per_op = None if echo is None else echo / op.round_trips
        lines.append(
            (op.name, str(conns), rate(kg), rate(echo_per_op), rate(crypto), ratio(kg, echo_per_op), ratio(kg, crypto))
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("echo ops/s = echo round trips/s divided by the round trips per op (2 for the init + operation pairs).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell (default 2)")
    parser.add_argument("--conns", type=int, nargs="+", default=[1, 4], help="concurrent connections (default 1 4)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or any(n < 1 for n in args.conns):
        parser.error("--seconds and --conns must be positive")

    ctx = mp.get_context("spawn")
    results: dict[tuple[str, str, int], float] = {}
    skipped = keygridd_missing()
    failures: list[str] = []
    user_pin = random_digits(8)
    with tempfile.TemporaryDirectory(prefix="keygrid-bench-") as tmp:
        directory = Path(tmp)
        for op in OPS[1:]:  # a no-op has no in-process counterpart worth measuring
            for conns in args.conns:
                results["cryptography", op.name, conns] = measure(ctx, "cryptography", op.name, conns, "", args.seconds)
        with echo_server(ctx, directory) as echo_path:
            for conns in args.conns:
                results["echo", "ping", conns] = measure(ctx, "echo", "ping", conns, echo_path, args.seconds)
        if skipped is None:
            try:
                with keygridd_server(directory, user_pin) as kg_path:
                    for op in OPS:
                        for conns in args.conns:
                            try:
                                results["keygridd", op.name, conns] = measure(
                                    ctx, "keygridd", op.name, conns, kg_path, args.seconds, user_pin
                                )
                            except RuntimeError as exc:
                                failures.append(f"{op.name} x{conns}: {exc}")
            except RuntimeError as exc:
                skipped = str(exc)

    print(f"keygrid RPC benchmark: {args.seconds:g} s per cell, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(keygridd_build())
    print()
    print_table(
        [
            (
                op,
                conns,
                results.get(("keygridd", op.name, conns)),
                results.get(("echo", "ping", conns)),
                results.get(("cryptography", op.name, conns)),
            )
            for op in OPS
            for conns in args.conns
        ]
    )
    if skipped is not None:
        print(f"keygridd part skipped: {skipped}")
    for failure in failures:
        print(f"keygridd cell failed: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
