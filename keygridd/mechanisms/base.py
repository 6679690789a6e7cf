"""The mechanism interface the core calls, the registry, and shared helpers.

Owns: ``Cost``, ``MechanismInfo`` (CK_MECHANISM_INFO), ``LoadedKey``, the
operation context protocols (sign, verify, cipher, digest), the ``Mechanism``
base class whose every operation raises CKR_MECHANISM_INVALID unless a family
module overrides it, and ``REGISTRY`` / ``get``. PKCS#11 v2.40 Base 5.x gives
the function semantics; each family module cites its Current Mechanisms
section.

Rules: no I/O, no sessions; exceptions are ``PKCS11Error`` subclasses whose
messages never contain key bytes.

Single-part mechanisms (the "single-part only" footnotes of the Current
Mechanisms tables: CKM_RSA_PKCS, CKM_RSA_X_509, CKM_RSA_PKCS_PSS, CKM_ECDSA,
CKM_EDDSA, CKM_RSA_PKCS_OAEP, the AES key wraps) raise
CKR_OPERATION_NOT_INITIALIZED from ``update``/``final``: the spec names no
dedicated code, and Base 5.1 defines CKR_OPERATION_NOT_INITIALIZED as "no
active operation of an appropriate type" (a multi-part one here); this is also
what SoftHSM2 returns, so clients already handle it. The core should end the
operation afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives import hashes

from keygridd.pkcs11._constants import CKA, CKO
from keygridd.pkcs11.errors import (
    AttributeValueInvalid,
    KeyTypeInconsistent,
    MechanismInvalid,
    MechanismParamInvalid,
    OperationNotInitialized,
    TemplateIncomplete,
)
from keygridd.pkcs11.params import Param

_CLASS, _KEY_TYPE = int(CKA.CLASS), int(CKA.KEY_TYPE)  # read on every key use: plain ints are faster


class Cost(Enum):
    """Where the daemon runs an operation: on the event loop or in a worker thread."""

    INLINE = 0
    THREAD = 1


_INLINE = Cost.INLINE  # what most mechanisms answer on every init: a module global is read faster


@dataclass(frozen=True, slots=True)
class MechanismInfo:
    """CK_MECHANISM_INFO; sizes in the unit the spec gives per mechanism."""

    min_key_size: int
    max_key_size: int
    flags: int


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakref: keygridd.signer frees its copy with it
class LoadedKey:
    """A key object's attributes plus its parsed ``cryptography`` object (bytes for secret keys)."""

    attrs: Mapping[int, object]
    material: object
    # Objects a mechanism makes from the material once and reuses while the key is loaded (an AES-GCM
    # cipher, whose key schedule costs more than a 1 KiB encryption); they go with the loaded key.
    derived: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key_class(self) -> int:
        return int_attr(self.attrs, CKA.CLASS)

    @property
    def key_type(self) -> int:
        return int_attr(self.attrs, CKA.KEY_TYPE)

    @property
    def is_private(self) -> bool:
        return self.attrs.get(CKA.CLASS) == CKO.PRIVATE_KEY


class SignContext(Protocol):
    length: int

    def update(self, data: bytes) -> None: ...
    def final(self) -> bytes: ...
    def sign(self, data: bytes) -> bytes: ...


class VerifyContext(Protocol):
    def update(self, data: bytes) -> None: ...
    def final(self, signature: bytes) -> None: ...
    def verify(self, data: bytes, signature: bytes) -> None: ...


class CipherContext(Protocol):
    def update(self, data: bytes) -> bytes: ...
    def final(self) -> bytes: ...
    def one_shot(self, data: bytes) -> bytes: ...
    def update_length(self, n: int) -> int: ...
    def final_length(self) -> int: ...
    def one_shot_length(self, n: int) -> int: ...


class DigestContext(Protocol):
    length: int

    def update(self, data: bytes) -> None: ...
    def final(self) -> bytes: ...
    def digest(self, data: bytes) -> bytes: ...


class Mechanism:
    """One CKM_*: its info, accepted key types and the operations it supports."""

    mechanism: int
    info: MechanismInfo
    key_types: frozenset[int] = frozenset()

    def cost(self, key: LoadedKey | None) -> Cost:
        return _INLINE

    def sign_init(self, key: LoadedKey, param: Param) -> SignContext:
        raise MechanismInvalid(f"{self.name} cannot sign")

    def verify_init(self, key: LoadedKey, param: Param) -> VerifyContext:
        raise MechanismInvalid(f"{self.name} cannot verify")

    def encrypt_init(self, key: LoadedKey, param: Param) -> CipherContext:
        raise MechanismInvalid(f"{self.name} cannot encrypt")

    def decrypt_init(self, key: LoadedKey, param: Param) -> CipherContext:
        raise MechanismInvalid(f"{self.name} cannot decrypt")

    def digest_init(self, param: Param) -> DigestContext:
        raise MechanismInvalid(f"{self.name} cannot digest")

    def generate_key(self, template: Mapping[int, object]) -> dict[int, object]:
        raise MechanismInvalid(f"{self.name} cannot generate a key")

    def generate_key_pair(
        self, public_template: Mapping[int, object], private_template: Mapping[int, object]
    ) -> tuple[dict[int, object], dict[int, object]]:
        raise MechanismInvalid(f"{self.name} cannot generate a key pair")

    def derive(self, base: LoadedKey, param: Param, template: Mapping[int, object]) -> bytes:
        raise MechanismInvalid(f"{self.name} cannot derive")

    @property
    def name(self) -> str:
        from keygridd.pkcs11._constants import CKM

        try:
            return str(CKM(self.mechanism))
        except ValueError:
            return f"CKM_{self.mechanism:#x}"

    def check_key(self, key: LoadedKey, key_class: int) -> None:
        """Raise KeyTypeInconsistent unless ``key`` has class ``key_class`` and an accepted type."""
        attrs = key.attrs
        if attrs.get(_CLASS) != key_class or attrs.get(_KEY_TYPE) not in self.key_types:
            raise KeyTypeInconsistent(f"{self.name} does not take this key")


REGISTRY: dict[int, Mechanism] = {}

M = TypeVar("M", bound=Mechanism)


def register(mech: M) -> M:
    """Add ``mech`` to ``REGISTRY`` (one instance per CKM)."""
    if mech.mechanism in REGISTRY:
        raise RuntimeError(f"{mech.name} registered twice")
    REGISTRY[mech.mechanism] = mech
    return mech


def get(mechanism: int) -> Mechanism:
    """The registered mechanism, or CKR_MECHANISM_INVALID."""
    try:
        return REGISTRY[mechanism]
    except KeyError:
        raise MechanismInvalid(f"mechanism {mechanism:#x} is not supported") from None


# --- attribute and parameter helpers -------------------------------------------------------------


def int_attr(attrs: Mapping[int, object], attr: int, default: int | None = None) -> int:
    """A CK_ULONG attribute; TemplateIncomplete if absent without default, AttributeValueInvalid if mistyped."""
    value = attrs.get(attr)
    if value is None:
        if default is None:
            raise TemplateIncomplete(f"{CKA(attr)!r} is required")
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise AttributeValueInvalid(f"{CKA(attr)!r} must be an integer")
    return value


def bytes_attr(attrs: Mapping[int, object], attr: int) -> bytes:
    """A byte-array attribute; TemplateIncomplete if absent, AttributeValueInvalid if mistyped."""
    value = attrs.get(attr)
    if value is None:
        raise TemplateIncomplete(f"{CKA(attr)!r} is required")
    if not isinstance(value, bytes):
        raise AttributeValueInvalid(f"{CKA(attr)!r} must be bytes")
    return value


def int_to_bytes(value: int, length: int = 0) -> bytes:
    """Unsigned big-endian; without ``length`` no leading zeros (0 encodes as one zero byte)."""
    if length == 0:
        length = max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(length, "big")


def bytes_to_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


P = TypeVar("P")


def param_of(mech: Mechanism, param: Param, kind: type[P]) -> P:
    """``param`` if it is a ``kind``, else MechanismParamInvalid."""
    if not isinstance(param, kind):
        raise MechanismParamInvalid(f"{mech.name} needs a {kind.__name__} parameter")
    return param


def no_param(mech: Mechanism, param: Param) -> None:
    """MechanismParamInvalid unless the mechanism was given no parameter (None or empty bytes)."""
    if param is not None and param != b"":
        raise MechanismParamInvalid(f"{mech.name} takes no parameter")


@dataclass(slots=True)  # not frozen: made per signature
class EcdsaJob:
    """The ECDSA signature a sign context computes, described for a signer beside the event loop
    (``keygridd.signer``): r || s of ``side`` bytes each over ``data`` (a hash value) with ``key``'s
    private key."""

    key: LoadedKey
    data: bytes
    side: int


def sign_job(context: object, data: bytes) -> EcdsaJob | None:
    """What a sign context's single-part signature of ``data`` computes, for the signer (None: only its
    own ``sign`` can). Asked just before the signature is made: the context may hash ``data`` for it."""
    job_for = getattr(context, "job_for", None)
    return job_for(data) if job_for is not None else None


def final_sign_job(context: object) -> EcdsaJob | None:
    """The same for a multi-part signature's ``final``."""
    final_job = getattr(context, "final_job", None)
    return final_job() if final_job is not None else None


class SinglePart:
    """Mixin for single-part-only contexts: multi-part calls fail (see the module docstring)."""

    def _multi_part(self) -> OperationNotInitialized:
        return OperationNotInitialized("this mechanism is single-part only")


class SingleSign(SinglePart):
    """A single-part sign operation around ``fn(data) -> signature``; ``job_for(data)`` describes that
    computation for a signer beside the loop (None: the input is computed by ``fn`` only)."""

    def __init__(
        self, length: int, fn: Callable[[bytes], bytes], job_for: Callable[[bytes], EcdsaJob | None] | None = None
    ) -> None:
        self.length = length
        self._fn = fn
        self.job_for = job_for

    def update(self, data: bytes) -> None:
        raise self._multi_part()

    def final(self) -> bytes:
        raise self._multi_part()

    def sign(self, data: bytes) -> bytes:
        return self._fn(data)


class SingleVerify(SinglePart):
    """A single-part verify operation around ``fn(data, signature)`` (raises on failure)."""

    def __init__(self, fn: Callable[[bytes, bytes], None]) -> None:
        self._fn = fn

    def update(self, data: bytes) -> None:
        raise self._multi_part()

    def final(self, signature: bytes) -> None:
        raise self._multi_part()

    def verify(self, data: bytes, signature: bytes) -> None:
        self._fn(data, signature)


class SingleCipher(SinglePart):
    """A single-part encrypt/decrypt around ``fn(data)``; ``bound(n)`` is the output length bound."""

    def __init__(self, fn: Callable[[bytes], bytes], bound: Callable[[int], int]) -> None:
        self._fn = fn
        self._bound = bound

    def update(self, data: bytes) -> bytes:
        raise self._multi_part()

    def final(self) -> bytes:
        raise self._multi_part()

    def one_shot(self, data: bytes) -> bytes:
        return self._fn(data)

    def update_length(self, n: int) -> int:
        raise self._multi_part()

    def final_length(self) -> int:
        raise self._multi_part()

    def one_shot_length(self, n: int) -> int:
        return self._bound(n)


class HashSign:
    """Multi-part sign: hash incrementally, then ``fn(digest) -> signature``.

    With ``job_for_digest`` (ECDSA), ``job_for(data)`` / ``final_job()`` finish the hash and describe
    the signature of the digest for the signer; ``sign`` / ``final`` then sign that digest (the
    signature is made one way or the other, and the input is hashed once)."""

    def __init__(
        self,
        algorithm: hashes.HashAlgorithm,
        length: int,
        fn: Callable[[bytes], bytes],
        job_for_digest: Callable[[bytes], EcdsaJob | None] | None = None,
    ) -> None:
        self._hash = hashes.Hash(algorithm)
        self.length = length
        self._fn = fn
        self._job_for_digest = job_for_digest
        self._digest: bytes | None = None  # the hash, finished for a job

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def final(self) -> bytes:
        return self._fn(self._digest if self._digest is not None else self._hash.finalize())

    def sign(self, data: bytes) -> bytes:
        if self._digest is None:
            self._hash.update(data)
        return self.final()

    def job_for(self, data: bytes) -> EcdsaJob | None:
        if self._job_for_digest is None:
            return None
        self._hash.update(data)
        return self.final_job()

    def final_job(self) -> EcdsaJob | None:
        if self._job_for_digest is None:
            return None
        self._digest = self._hash.finalize()
        return self._job_for_digest(self._digest)


class HashVerify:
    """Multi-part verify: hash incrementally, then ``fn(digest, signature)`` (raises on failure)."""

    def __init__(self, algorithm: hashes.HashAlgorithm, fn: Callable[[bytes, bytes], None]) -> None:
        self._hash = hashes.Hash(algorithm)
        self._fn = fn

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def final(self, signature: bytes) -> None:
        self._fn(self._hash.finalize(), signature)

    def verify(self, data: bytes, signature: bytes) -> None:
        self._hash.update(data)
        self.final(signature)
