"""The provider interface.

A provider serves slots: for each configured slot it opens a ``TokenStore``
(the token's persistent state) and says which mechanisms the token offers. It
may also inject behaviour per call (the memory provider's scenarios). Options
are a frozen dataclass (``options_type``) validated by ``keygridd.config.build``
at start, so a bad option fails before the daemon serves anything.

A ``PassthroughProvider`` serves a token that lives in another PKCS#11
implementation instead: it gives the core a ``RemoteToken`` whose calls the
core forwards, and runs the I/O that keeps the link to it up (``run``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from keygridd.core.model import Peer
from keygridd.core.remote import RemoteToken
from keygridd.core.store import TokenStore
from keygridd.mechanisms import REGISTRY, MechanismInfo


@dataclass(frozen=True, slots=True)
class Effect:
    """What a provider injects into one call: a delay, then maybe an error (CKR)."""

    delay: float = 0.0
    error: int | None = None


@dataclass(frozen=True, slots=True)
class NoOptions:
    """For providers without options."""


class Provider(abc.ABC):
    """Base class of every provider registered under the entry point group ``keygrid.providers``."""

    name: ClassVar[str]
    options_type: ClassVar[type[Any]] = NoOptions

    def __init__(self, slot_id: int, options: Any) -> None:
        self.slot_id = slot_id
        self.options = options

    @abc.abstractmethod
    def open_store(self) -> TokenStore:
        """Open (or create) the token's state. Called once at start."""

    def mechanisms(self) -> dict[int, MechanismInfo]:
        """The mechanisms this slot offers; by default every built-in one."""
        return {number: mech.info for number, mech in REGISTRY.items()}

    def effect(self, method: str) -> Effect | None:
        """An injected delay or error for this call, or None."""
        return None

    def injects_effects(self) -> bool:
        """May ``effect`` return anything? Asked once at start: a slot that never injects skips the
        question on every call. By default, whether the provider overrides ``effect``."""
        return type(self).effect is not Provider.effect

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""


class PassthroughProvider(Provider):
    """A provider whose token is served by another PKCS#11 implementation (see ``core/remote.py``)."""

    def open_store(self) -> TokenStore:
        raise TypeError(f"provider {self.name!r} forwards to a token elsewhere: it has no store")

    @abc.abstractmethod
    def token(self, description: str, allows: Callable[[Peer], bool]) -> RemoteToken:
        """The slot's token for the core. Called once at start, before ``run``."""

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the link to the token, report started, then keep it healthy until cancelled."""
