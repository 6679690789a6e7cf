"""The Core: every PKCS#11 function of the call table, over the configured slots."""

from __future__ import annotations

from keygridd.core.convenience import ConvenienceFunctions
from keygridd.core.sessions import SessionFunctions


class Core(ConvenienceFunctions, SessionFunctions):
    """All functions; ``getattr(core, call.name)(app, *args)`` serves a request."""
