"""PKCS#11 throughput of KeyGrid's shim next to SoftHSM2, direct and remoted by p11-kit, from one run.

Usage: ``python bench/bench_pkcs11.py [--seconds 2] [--threads 1 4] [--rounds 3] [--ops OP ...]``

One C load generator (``bench/pkcs11_loadgen.c``, compiled by this script
with cc) drives three PKCS#11 modules, each with its own session keys made at
the start (EC P-256, RSA-2048, AES-256, and a data object to find by label):

* a: SoftHSM2 loaded directly (``libsofthsm2.so``; a token in a temporary
  directory named by ``SOFTHSM2_CONF``, made with ``softhsm2-util``): the
  in-process ceiling;
* b: the same SoftHSM2 token remoted by p11-kit (``p11-kit server`` on a Unix
  socket, ``p11-kit-client.so`` in the load generator): a C RPC baseline;
* c: ``libkeygrid-pkcs11.so`` to a keygridd with one slot, started for the
  run as in ``bench/bench_rpc.py``: the memory provider (default), the
  software token on LMDB (``--provider software``), or the same SoftHSM2 token
  behind the ``pkcs11`` provider (``--provider pkcs11``: shim, daemon, worker
  process, SoftHSM2, one hop more than p11-kit's remoting).

* d: the same module and daemon as c, with ``defer_init = 1`` in its
  configuration file: an init call (``C_SignInit``, ``C_FindObjectsInit``,
  ...) goes out with the next call of its session, so a signature or a find
  is one round trip; the init's errors then come out of that next call
  (``keygrid_pkcs11_shim/README.md``, "Deferred init").
* e (``--provider pkcs11`` only): the SoftHSM2 token through two p11-kit
  hops, a second ``p11-kit server`` exporting ``p11-kit-client.so`` of the
  first: as many hops as c, all in C, without policy. c/e says what
  keygridd's Python costs over the same path; e/b what the extra hop costs
  a C implementation on this machine.

For each thread count, N threads each open their own session and repeat an
operation for the given time; the table shows ops/s per module and the
ratios c/a, c/b and d/b. The machines this runs on are noisy, so the run is
repeated (``--rounds``, default 3), taking a, b, c and d in turn each round,
and each cell is the median of its rounds: a, b and c of one row are measured
at the same times. p11-kit 0.24 does not marshal CK_GCM_PARAMS: its AES-GCM
cell reads "refused" (the load generator reports the CK_RV); the
``aes256-ecb-1k`` row (the same two calls and sizes without a parameter,
which p11-kit forwards) stands in for it. After the table the targets from
the performance issues are checked and printed, with the same bars applied
to p11-kit where a reference helps ("reference:" lines).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOADGEN_SOURCE = REPO / "bench" / "pkcs11_loadgen.c"
SHIM_DIR = REPO / "keygrid_pkcs11_shim"
SHIM = SHIM_DIR / "build" / "libkeygrid-pkcs11.so"
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
P11_KIT_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
OPS = ("ecdsa-p256-sign", "rsa2048-sign", "aes256-gcm-1k", "aes256-ecb-1k", "random-32", "find-label")
TARGETS_NOTE = "targets: ECDSA c/b >= 1.2 (1 and 4 threads), ECDSA c/a >= 0.35 (1 thread), random and find c/b >= 1.0, AES-GCM(c) >= 0.5 x random(c)"
PKCS11_TARGETS_NOTE = "targets (pkcs11 provider): ECDSA P-256 and RSA-2048 sign c/b >= 0.8 at 1 and 4 threads"
START_TIMEOUT = 30.0

Cell = float | str  # ops/s, or why there is no figure ("refused 0x70", "-")


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    env: dict[str, str]
    token: str
    pin: str


def random_digits(count: int) -> str:
    import secrets

    return "".join(secrets.choice("0123456789") for _ in range(count))


def build_loadgen(directory: Path) -> Path:
    binary = directory / "pkcs11_loadgen"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-I/usr/include/p11-kit-1",
         "-o", str(binary), str(LOADGEN_SOURCE), "-ldl"],
        check=True, timeout=120,
    )  # fmt: skip
    return binary


def build_shim() -> Path:
    subprocess.run(["make", "-s", "-C", str(SHIM_DIR)], check=True, timeout=300, stdout=subprocess.DEVNULL)
    return SHIM


def base_env() -> dict[str, str]:
    drop = ("KEYGRID_", "SOFTHSM2_", "P11_KIT_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# --------------------------------------------------------------------------------------------------------------------
# The three modules
# --------------------------------------------------------------------------------------------------------------------


def softhsm_token(directory: Path, label: str, pin: str) -> dict[str, str]:
    tokens = directory / "softhsm-tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**base_env(), "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", random_digits(12), "--pin", pin],
        env=env, check=True, timeout=60, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return env


@contextlib.contextmanager
def p11_kit_server(
    directory: Path, module_env: dict[str, str], label: str, module: Path = SOFTHSM, name: str = "p11-kit-server"
) -> Iterator[dict[str, str]]:
    """``p11-kit server`` exporting ``module``'s token ``label``; yields the client's environment."""
    runtime = directory / f"{name}-runtime"
    runtime.mkdir(mode=0o700)
    env = {**module_env, "XDG_RUNTIME_DIR": str(runtime)}
    output = directory / f"{name}.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            ["p11-kit", "server", "-f", "-s", "--provider", str(module), f"pkcs11:token={label}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        address = None
        while address is None:
            text = output.read_text(errors="replace")
            found = re.search(r"P11_KIT_SERVER_ADDRESS=([^;\s]+)", text)
            if found:
                address = found.group(1)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"p11-kit server did not start: {text.strip()}")
            time.sleep(0.05)
        yield {**base_env(), "P11_KIT_SERVER_ADDRESS": address}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def keygridd(
    directory: Path, pin: str, provider: str = "memory", softhsm_env: dict[str, str] | None = None
) -> Iterator[dict[str, str]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_rpc import keygridd_server  # one slot, token "bench", as the RPC benchmark runs it

    kg_dir = directory / "keygridd"
    kg_dir.mkdir()
    options = None
    if provider == "pkcs11":
        assert softhsm_env is not None
        options = {"module": str(SOFTHSM), "token_label": "bench",
                   "environment": {"SOFTHSM2_CONF": softhsm_env["SOFTHSM2_CONF"]}}  # fmt: skip
    with keygridd_server(kg_dir, pin, provider, options) as sock:
        yield {**base_env(), "KEYGRID_SOCKET": sock, "KEYGRID_PKCS11_CONF": str(kg_dir / "absent.conf")}


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def run_loadgen(loadgen: Path, target: Target, threads: int, seconds: float, ops: list[str]) -> dict[str, Cell]:
    argv = [str(loadgen), "--module", target.module, "--token", target.token, "--pin", target.pin,
            "--threads", str(threads), "--seconds", str(seconds), "--ops", ",".join(ops)]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, env=target.env, capture_output=True, text=True, timeout=len(ops) * (seconds + 30) + 120, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"{target.name} x{threads}: the load generator timed out", file=sys.stderr)
        return {}
    cells: dict[str, Cell] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] != ["RESULT"] or len(parts) < 4:
            continue
        op = parts[1]
        cells[op] = f"refused {parts[4]}" if parts[3] == "refused" else float(parts[3])
    if proc.returncode != 0:
        print(f"{target.name} x{threads}: exit {proc.returncode}: {proc.stderr.strip()}", file=sys.stderr)
    return cells


def rate(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell.split()[0]  # "refused"
    return f"{cell:,.0f}"


def median(cells: list[Cell]) -> Cell:
    """The median rate of a cell's rounds; a refusal (or a missing figure) in any round stands for the cell."""
    rates = sorted(c for c in cells if isinstance(c, float))
    if len(rates) < len(cells):
        return next(c for c in cells if not isinstance(c, float))
    return statistics.median(rates)


def ratio(numerator: Cell | None, denominator: Cell | None) -> str:
    if not isinstance(numerator, float) or not isinstance(denominator, float) or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}"


def print_table(
    results: dict[tuple[str, str, int], Cell], ops: list[str], thread_counts: list[int], two_hops: bool = False
) -> None:
    """The table; ``two_hops``: with e (p11-kit's remoting twice) and c/e."""
    header: tuple[str, ...] = ("op", "threads", "a softhsm ops/s", "b p11-kit ops/s", "c keygrid ops/s", "c/a", "c/b")
    header += ("d deferred ops/s", "d/b")
    if two_hops:
        header += ("e p11-kit x2 ops/s", "c/e")
    lines: list[tuple[str, ...]] = [header]
    for op in ops:
        for n in thread_counts:
            a, b, c, d, e = (results.get((t, op, n)) for t in ("a", "b", "c", "d", "e"))
            cells = [op, str(n), rate(a), rate(b), rate(c), ratio(c, a), ratio(c, b), rate(d), ratio(d, b)]
            if two_hops:
                cells += [rate(e), ratio(c, e)]
            lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, row in enumerate(lines):
        print(
            "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        )
        if index == 0:
            print("  ".join("-" * w for w in widths))


def value(results: dict[tuple[str, str, int], Cell], target: str, op: str, n: int) -> float | None:
    """A measured rate, or None (refused, not run)."""
    cell = results.get((target, op, n))
    return cell if isinstance(cell, float) else None


def target_line(label: str, numerator: float | None, denominator: float | None, goal: float) -> str:
    """One target: the ratio and whether it is met, or "no figure"."""
    if numerator is None or not denominator:
        return f"  {label}: no figure"
    got = numerator / denominator
    shown = f"{got:.2f}" if (round(got, 2) >= goal) == (got >= goal) else f"{got:.3f}"  # 0.998 is not 1.00
    return f"  {label} = {shown} (target >= {goal}): {'met' if got >= goal else 'MISSED'}"


def check_targets(results: dict[tuple[str, str, int], Cell], thread_counts: list[int], ops: list[str]) -> list[str]:
    """The shim issue's targets for the operations that ran (``ops``), for c and d."""
    lines = []

    def check(label: str, num: tuple[str, str, int], den: tuple[str, str, int], goal: float) -> None:
        if num[1] in ops and den[1] in ops:  # else not measured in this run
            lines.append(target_line(label, value(results, *num), value(results, *den), goal))

    for t in ("c", "d"):
        for n in thread_counts:
            check(f"ECDSA P-256 {t}/b at {n} thread(s)", (t, "ecdsa-p256-sign", n), ("b", "ecdsa-p256-sign", n), 1.2)
        if 1 in thread_counts:
            check(f"ECDSA P-256 {t}/a at 1 thread", (t, "ecdsa-p256-sign", 1), ("a", "ecdsa-p256-sign", 1), 0.35)
        for n in thread_counts:
            check(f"random {t}/b at {n} thread(s)", (t, "random-32", n), ("b", "random-32", n), 1.0)
            check(f"find {t}/b at {n} thread(s)", (t, "find-label", n), ("b", "find-label", n), 1.0)
            check(f"AES-GCM({t})/random({t}) at {n} thread(s)", (t, "aes256-gcm-1k", n), (t, "random-32", n), 0.5)
    for n in thread_counts:  # the same bar for p11-kit's two calls of 1 KiB against its own random rate
        check(
            f"reference: AES-ECB(b)/random(b) at {n} thread(s)", ("b", "aes256-ecb-1k", n), ("b", "random-32", n), 0.5
        )
    return lines


def check_pkcs11_targets(
    results: dict[tuple[str, str, int], Cell], thread_counts: list[int], ops: list[str]
) -> list[str]:
    """The pkcs11 provider's target for the signatures that ran: >= 0.8 of p11-kit's rate, for c and d; and
    the same ratio for e, p11-kit's own remoting with as many hops as c."""
    return [
        target_line(
            f"{'reference: ' if t == 'e' else ''}{op} {t}/b at {n} thread(s)",
            value(results, t, op, n),
            value(results, "b", op, n),
            0.8,
        )
        for t in ("c", "d", "e")
        for op in ("ecdsa-p256-sign", "rsa2048-sign")
        if op in ops
        for n in thread_counts
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="thread counts (default 1 4)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over a, b, c and d; each cell is the median (default 3)"
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="operations (default all)")
    parser.add_argument(
        "--provider",
        choices=["memory", "software", "pkcs11"],
        default="memory",
        help="KeyGrid slot behind c: the memory provider (default), the software token on LMDB, "
        "or the SoftHSM2 token of a and b behind the pkcs11 provider",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or any(n < 1 for n in args.threads):
        parser.error("--seconds, --rounds and --threads must be positive")
    for tool in ("cc", "softhsm2-util", "p11-kit"):
        if shutil.which(os.environ.get("CC", "cc") if tool == "cc" else tool) is None:
            parser.error(f"{tool} is not installed (make deps)")
    for library in (SOFTHSM, P11_KIT_CLIENT):
        if not library.exists():
            parser.error(f"{library} is missing (make deps)")

    for name in [k for k in os.environ if k.startswith("KEYGRID_")]:
        del os.environ[name]  # keygridd reads KEYGRID_SOCKET & co.: the daemon for this run must use its own
    pin = random_digits(8)
    results: dict[tuple[str, str, int], Cell] = {}
    with tempfile.TemporaryDirectory(prefix="keygrid-bench-pkcs11-") as tmp:
        directory = Path(tmp)
        loadgen = build_loadgen(directory)
        shim = build_shim()
        softhsm_env = softhsm_token(directory, "bench", pin)
        deferred = directory / "deferred.conf"
        deferred.write_text("defer_init = 1\n", encoding="utf-8")
        two_hops = args.provider == "pkcs11"
        with contextlib.ExitStack() as stack:
            p11_kit_env = stack.enter_context(p11_kit_server(directory, softhsm_env, "bench"))
            kg_env = stack.enter_context(keygridd(directory, pin, args.provider, softhsm_env))
            targets = [
                Target("a", str(SOFTHSM), softhsm_env, "bench", pin),
                Target("b", str(P11_KIT_CLIENT), p11_kit_env, "bench", pin),
                Target("c", str(shim), kg_env, "bench", pin),
                Target("d", str(shim), {**kg_env, "KEYGRID_PKCS11_CONF": str(deferred)}, "bench", pin),
            ]
            if two_hops:  # a second p11-kit server exporting the first one's token through p11-kit-client.so
                chain = stack.enter_context(
                    p11_kit_server(directory, p11_kit_env, "bench", P11_KIT_CLIENT, "p11-kit-server-2")
                )
                targets.append(Target("e", str(P11_KIT_CLIENT), chain, "bench", pin))
            samples: dict[tuple[str, str, int], list[Cell]] = {}
            for _ in range(args.rounds):
                for n in args.threads:
                    for target in targets:
                        for op, cell in run_loadgen(loadgen, target, n, args.seconds, args.ops).items():
                            samples.setdefault((target.name, op, n), []).append(cell)
            results = {key: median(cells) for key, cells in samples.items()}

    from bench_rpc import keygridd_build

    print(
        f"PKCS#11 benchmark: {args.seconds:g} s per cell, median of {args.rounds} round(s) taking a, b, c, d"
        f"{', e' if two_hops else ''} in turn, {os.cpu_count()} CPUs; {keygridd_build()}"
    )
    print(
        "a = SoftHSM2 direct, b = SoftHSM2 via p11-kit server/client, "
        f"c = KeyGrid shim -> keygridd ({args.provider} slot{' -> worker -> SoftHSM2' if args.provider == 'pkcs11' else ''}), "
        "d = c with defer_init = 1"
        + (
            ", e = SoftHSM2 via two p11-kit hops (server -> p11-kit-client.so -> server), as many as c"
            if two_hops
            else ""
        )
    )
    print()
    print_table(results, args.ops, args.threads, two_hops)
    print()
    if args.provider == "pkcs11":
        print(PKCS11_TARGETS_NOTE)
        lines = check_pkcs11_targets(results, args.threads, args.ops)
    else:
        print(TARGETS_NOTE)
        lines = check_targets(results, args.threads, args.ops)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
