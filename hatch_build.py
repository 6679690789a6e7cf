"""Hatchling build hook: compile the C PKCS#11 shim into the wheel.

Runs ``make -C keygrid_pkcs11_shim`` and ships the results as
``keygridd/lib/libkeygrid-pkcs11.so`` (where ``keygrid shim-path`` looks) and
``keygridd/lib/libkeygrid-worker.so`` (the pkcs11 provider's worker lanes) and,
when OpenSSL's headers are installed, ``keygridd/lib/libkeygrid-signer.so``
(the daemon's ECDSA signing thread, ``keygridd/signer.py``):
in a wheel through ``force_include`` (the wheel is then tagged for the
platform), in an editable install by copying it into the source tree
(``keygridd/lib/*.so`` is ignored by git). The sdist carries the C sources
and needs nothing built. ``KEYGRID_BUILD_SHIM=0`` skips both libraries (the worker then serves its lanes from Python), and
the compiled modules below, for machines without a C compiler.

A wheel also carries the modules every request passes through (``COMPILED``)
compiled to C extensions by mypyc, from the same type-annotated sources: the
daemon's loop then spends less time per request (README: "The compiled
request path"). An editable install stays pure Python, so that an
edited source is what runs. Without Python's headers (Debian's python3-dev),
or with ``KEYGRID_BUILD_MYPYC=0``, the wheel ships those modules as Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIM_NAME = "libkeygrid-pkcs11.so"
LIBRARIES = (SHIM_NAME, "libkeygrid-worker.so")
OPTIONAL = ("libkeygrid-signer.so",)  # built only where its headers are (keygrid_pkcs11_shim/Makefile)
# Compiled by mypyc into a wheel: what each request runs through on the loop.
COMPILED = (
    "keygridd/protocol/codec.py",
    "keygridd/protocol/framing.py",
    "keygridd/server/connection.py",
    "keygridd/server/dispatch.py",
    "keygridd/server/reactor.py",
)

# mypy's view for the compile: the same in every build environment. pip runs this hook with the interpreter
# it builds for, whose site-packages may or may not hold trio, cryptography & co. (a fresh venv in the image's
# builder does not): their types are left out (Any: mypyc calls them as Python does), and only the compiled
# modules' own errors count (mypy --strict checks the whole package in `make lint`).
MYPY_ARGS = ("--no-site-packages", "--ignore-missing-imports", "--follow-imports=silent", "--allow-subclassing-any",
             "--no-warn-return-any", "--no-warn-unused-ignores")  # fmt: skip


class ShimBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("KEYGRID_BUILD_SHIM", "1") == "0":
            self.app.display_warning(f"KEYGRID_BUILD_SHIM=0: building without {' and '.join(LIBRARIES)}")
            return
        root = Path(self.root)
        shim_dir = root / "keygrid_pkcs11_shim"
        subprocess.run(["make", "-C", str(shim_dir)], check=True)
        for name in LIBRARIES + OPTIONAL:
            built = shim_dir / "build" / name
            if name in OPTIONAL and not built.exists():
                self.app.display_warning(f"{name} not built (no OpenSSL headers): ECDSA is signed on the loop")
                continue
            if version == "editable":
                target = root / "keygridd" / "lib" / name
                target.parent.mkdir(exist_ok=True)
                shutil.copy2(built, target)
            else:
                build_data["force_include"][str(built)] = f"keygridd/lib/{name}"
        if version == "editable":
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        self.compile_modules(build_data)

    def compile_modules(self, build_data: dict[str, Any]) -> None:
        """Put ``COMPILED`` into the wheel as extension modules (beside their sources, which they shadow)."""
        if os.environ.get("KEYGRID_BUILD_MYPYC", "1") == "0":
            self.app.display_warning("KEYGRID_BUILD_MYPYC=0: the request path ships as Python")
            return
        if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
            self.app.display_warning("no Python.h (python3-dev): the request path ships as Python")
            return
        from mypyc.build import mypycify
        from setuptools import Distribution
        from setuptools.command.build_ext import build_ext

        # The wheel is assembled after this hook returns: the build directory lives until finalize().
        self._mypyc_dir = tempfile.TemporaryDirectory(prefix="keygrid-mypyc-")
        tmp = Path(self._mypyc_dir.name)
        cwd = Path.cwd()
        os.chdir(self.root)  # mypyc names the modules by their paths from the project's root
        try:
            extensions = mypycify([*MYPY_ARGS, "--cache-dir", str(tmp / "cache"), *COMPILED], target_dir=str(tmp / "c"),
                                  group_name="keygridd")  # fmt: skip
            command = build_ext(Distribution({"name": "keygridd", "ext_modules": extensions}))
            command.build_lib, command.build_temp = str(tmp / "lib"), str(tmp / "tmp")
            command.ensure_finalized()
            command.run()
        finally:
            os.chdir(cwd)
        for path in sorted((tmp / "lib").rglob("*.so")):
            build_data["force_include"][str(path)] = str(path.relative_to(tmp / "lib"))
        self.app.display_info(f"mypyc: {len(COMPILED)} modules compiled")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        mypyc_dir = getattr(self, "_mypyc_dir", None)
        if mypyc_dir is not None:
            mypyc_dir.cleanup()
