"""The sidecar image, built from docker/Dockerfile with podman and run: the daemon serves and stops cleanly.

No registry is pulled from: the base image ``debian:bookworm-slim`` is made
here with debootstrap from the machine's Debian mirror and imported under that
name. podman runs rootful with runc and fuse-overlayfs, its configuration and
storage in a temporary directory. pip inside the build gets the machine's CA
bundle as the optional ``pipca`` build secret (needed behind a TLS-intercepting
proxy; the secret never lands in a layer). ``make deps`` installs podman and
debootstrap; this runs in ``make test-slow``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE = "localhost/keygrid:test"
SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))


def debian_mirror() -> str:
    """The machine's Debian mirror (deb822 ``URIs:`` or a ``deb`` line), else deb.debian.org."""
    for path in SOURCES:
        if path.exists():
            text = path.read_text(encoding="utf-8")
            found = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm\b", text, re.M
            )
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment for podman commands, with a ``debian:bookworm-slim`` base image imported."""
    for tool in ("podman", "debootstrap", "runc", "fuse-overlayfs"):
        assert shutil.which(tool), f"{tool} is not installed (make deps)"
    work = tmp_path_factory.mktemp("podman")
    (work / "containers.conf").write_text(
        '[engine]\nruntime = "runc"\n[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
    )
    (work / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\nrunroot = "{work}/run"\ngraphroot = "{work}/storage"\n'
        '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"\n'
    )
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "CONTAINERS_CONF": str(work / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
    }
    root = work / "rootfs"
    run(["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()], env, timeout=900)
    with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
        run(["podman", "import", "-", "docker.io/library/debian:bookworm-slim"], env, stdin=tar.stdout)
    assert tar.returncode == 0
    try:
        yield env
    finally:
        subprocess.run(["podman", "system", "reset", "--force"], env=env, capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def run(
    argv: list[str], env: dict[str, str], timeout: float = 600, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output is in the assertion message when it fails."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=stdin, check=False)
    what = " ".join(argv[:3])
    assert done.returncode == 0, f"{what}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_image_builds_serves_and_stops(podman: dict[str, str]) -> None:
    build = ["podman", "build", "--pull=never", "--network=host", "-t", IMAGE]
    build += [
        "--ignorefile",
        str(REPO / "docker" / "Dockerfile.dockerignore"),
        "-f",
        str(REPO / "docker" / "Dockerfile"),
    ]
    if CA_BUNDLE.exists():
        build += ["--secret", f"id=pipca,src={CA_BUNDLE}"]
    run([*build, str(REPO)], podman, timeout=1200)

    shim = run(["podman", "run", "--rm", "--network=none", "--entrypoint", "keygrid", IMAGE, "shim-path"], podman)
    assert shim.stdout.strip() == "/opt/keygrid/lib/python3.11/site-packages/keygridd/lib/libkeygrid-pkcs11.so"
    lib_dir = str(Path(shim.stdout.strip()).parent)
    libs = run(["podman", "run", "--rm", "--network=none", "--entrypoint", "ls", IMAGE, lib_dir], podman)
    assert libs.stdout.split() == ["libkeygrid-pkcs11.so", "libkeygrid-signer.so", "libkeygrid-worker.so"]
    # The signing thread's library loads and starts in the image (libcrypto comes with python3).
    check = "from keygridd import signer; s = signer.start(); assert s is not None; s.close(); print('signer ok')"
    started = run(["podman", "run", "--rm", "--network=none", "--entrypoint", "python3", IMAGE, "-c", check], podman)
    assert started.stdout.strip() == "signer ok"
    # The request path runs compiled (mypyc; the builder has python3-dev).
    probe = "import keygridd.server.connection as c; print(c.__file__)"
    compiled = run(["podman", "run", "--rm", "--network=none", "--entrypoint", "python3", IMAGE, "-c", probe], podman)
    assert compiled.stdout.strip().endswith(".so"), compiled.stdout

    pins = ["-e", "KEYGRID_SO_PIN=12345678", "-e", "KEYGRID_USER_PIN=87654321"]
    run(["podman", "run", "-d", "--name", "kg-image-test", "--network=none", *pins, IMAGE], podman)
    try:
        deadline = time.monotonic() + 30
        while True:
            status = subprocess.run(
                ["podman", "exec", "kg-image-test", "keygrid", "status"],
                env=podman, capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if status.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status.returncode == 0, status.stderr
        assert re.search(r"^0\s+memory\s+sidecar\s+yes\s+yes\b", status.stdout, re.M), status.stdout
        run(["podman", "stop", "--time", "20", "kg-image-test"], podman)
        exit_code = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", "kg-image-test"], podman)
        assert exit_code.stdout.strip() == "0"
        logs = run(["podman", "logs", "kg-image-test"], podman)
        assert "received SIGTERM: stopping" in logs.stdout + logs.stderr
        assert "12345678" not in logs.stdout + logs.stderr and "87654321" not in logs.stdout + logs.stderr
    finally:
        subprocess.run(["podman", "rm", "--force", "kg-image-test"], env=podman, capture_output=True, check=False)
