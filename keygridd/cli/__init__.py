"""The ``keygrid`` command: a thin argparse front end over the KeyGrid client.

One module per noun (status, slots, token, keys, crypto, random, shim); shared
pieces are output (tables for people, ``--json`` for scripts), pin (where PINs
come from: never the command line), objects (finding slots and keys by PKCS#11
URI), mechanisms (names, defaults and parameters) and hints (the one-line advice
printed with an error). Exit codes: 0 success, 1 failure, 2 usage.
"""

from __future__ import annotations

from keygridd.cli.app import main

__all__ = ["main"]
