"""Hatchling build hook: compile the C PKCS#11 shim into the wheel.

Runs ``make -C keygrid_pkcs11_shim`` and ships the results as
``keygridd/lib/libkeygrid-pkcs11.so`` (where ``keygrid shim-path`` looks) and
``keygridd/lib/libkeygrid-worker.so`` (the pkcs11 provider's worker lanes) and,
when OpenSSL's headers are installed, ``keygridd/lib/libkeygrid-signer.so``
(the daemon's ECDSA signing thread, ``keygridd/signer.py``):
in a wheel through ``force_include`` (the wheel is then tagged for the
platform), in an editable install by copying it into the source tree
(``keygridd/lib/*.so`` is ignored by git). The sdist carries the C sources
and needs nothing built. ``KEYGRID_BUILD_SHIM=0`` skips both libraries (the worker then serves its lanes from Python), for
machines without a C compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHIM_NAME = "libkeygrid-pkcs11.so"
LIBRARIES = (SHIM_NAME, "libkeygrid-worker.so")
OPTIONAL = ("libkeygrid-signer.so",)  # built only where its headers are (keygrid_pkcs11_shim/Makefile)


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
