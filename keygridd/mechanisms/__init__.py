"""Every supported CKM_* as code over ``cryptography``; the core's entry points.

Importing this package registers all mechanisms in ``REGISTRY`` (one module
per family: ``digest``, ``rsa``, ``ec``, ``eddsa``, ``aes``, ``keywrap``,
``hmac``). The interface is ``base``; key parsing and import checks are
``keys``. No I/O, no sessions.
"""

from keygridd.mechanisms import aes, digest, ec, eddsa, hmac, keywrap, rsa  # noqa: F401 - registration
from keygridd.mechanisms.base import (
    REGISTRY,
    CipherContext,
    Cost,
    DigestContext,
    LoadedKey,
    Mechanism,
    MechanismInfo,
    SignContext,
    VerifyContext,
    get,
)
from keygridd.mechanisms.keys import (
    load_key,
    private_key_from_pkcs8,
    private_key_to_pkcs8,
    public_attrs_from_private,
    public_key_info,
    validate_import,
)

__all__ = [
    "REGISTRY", "CipherContext", "Cost", "DigestContext", "LoadedKey", "Mechanism", "MechanismInfo",
    "SignContext", "VerifyContext", "get", "load_key", "private_key_from_pkcs8", "private_key_to_pkcs8",
    "public_attrs_from_private", "public_key_info", "validate_import",
]  # fmt: skip
