"""The provider interface.

A provider serves slots: for each configured slot it opens a ``TokenStore``
(the token's persistent state) and says which mechanisms the token offers. It
may also inject behaviour per call (the memory provider's scenarios). Options
are a frozen dataclass (``options_type``) validated by ``keygridd.config.build``
at start, so a bad option fails before the daemon serves anything.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""
