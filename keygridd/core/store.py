"""The token store interface: what a provider keeps for a token the core serves.

The core owns semantics (sessions, login state, visibility, attribute policy);
a ``TokenStore`` owns persistent state: the label, the PINs (never stored in
the clear: the store verifies them), and the token objects as attribute maps.
Implementations: the memory provider (``providers/memory.py``), the software
token. Methods may block (file or database I/O) only if ``blocking`` is true.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from keygridd.pkcs11.attributes import AttrValue

Attributes = dict[int, AttrValue]


@dataclass(frozen=True, slots=True)
class TokenDescription:
    """The fixed parts of CK_TOKEN_INFO and CK_SLOT_INFO a provider reports."""

    manufacturer: str = "KeyGrid"
    model: str = "memory"
    serial: str = "0"
    hardware_version: tuple[int, int] = (0, 1)
    firmware_version: tuple[int, int] = (0, 1)
    min_pin_len: int = 4
    max_pin_len: int = 255


class TokenStore(abc.ABC):
    """Persistent state of one token."""

    description: TokenDescription = TokenDescription()
    blocking: bool = True  # methods do disk or network I/O: the core offloads them

    @property
    @abc.abstractmethod
    def initialized(self) -> bool: ...

    @property
    @abc.abstractmethod
    def label(self) -> bytes:
        """32 bytes, blank padded."""

    @property
    @abc.abstractmethod
    def user_pin_initialized(self) -> bool: ...

    def pin_flags(self) -> int:
        """CKF_*_PIN_* token flags (count low, final try, locked); 0 when nothing to report."""
        return 0

    @abc.abstractmethod
    def init_token(self, so_pin: bytes, label: bytes) -> None:
        """(Re)initialise: check the SO PIN if initialised, wipe objects and the user PIN, set the label."""

    @abc.abstractmethod
    def check_pin(self, user_type: int, pin: bytes) -> None:
        """Raise PinIncorrect / PinLocked / UserPinNotInitialized, or return when the PIN is right.

        A right PIN of the user or SO may unlock the token's private objects (``objects()``
        then returns them too) until ``lock()``.
        """

    @abc.abstractmethod
    def init_pin(self, pin: bytes) -> None: ...

    @abc.abstractmethod
    def set_pin(self, user_type: int, old_pin: bytes, new_pin: bytes) -> None: ...

    @abc.abstractmethod
    def objects(self) -> Mapping[bytes, Attributes]:
        """Every token object by its id."""

    @abc.abstractmethod
    def put_object(self, oid: bytes, attrs: Attributes) -> None: ...

    @abc.abstractmethod
    def delete_object(self, oid: bytes) -> None: ...

    @property
    def unlocked(self) -> bool:
        """Can private objects be read now (a user or SO logged in, or an unattended token)?"""
        return True

    def lock(self) -> None:  # noqa: B027 - optional hook
        """No application is logged in to the token any more: forget what a login unlocked."""

    def load_object(self, oid: bytes) -> Attributes | None:
        """One object's current attributes (re-read after a change notification), or None."""
        return self.objects().get(oid)

    def current(self, oid: bytes) -> Attributes | None:
        """The newest state of one object this store knows of, without I/O (None: gone or unreadable)."""
        return self.objects().get(oid)

    def watch(self, callback: Callable[[bytes], None]) -> None:  # noqa: B027 - optional hook
        """Call ``callback(oid)`` (from any thread) when another writer changes an object."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections."""
