"""Keys generated once for the whole mechanism test run."""

from __future__ import annotations

import pytest
from mech_helpers import ec_pair, rsa_pair

from keygridd.mechanisms import LoadedKey
from keygridd.mechanisms.curves import P256


@pytest.fixture(scope="session")
def rsa2048() -> tuple[LoadedKey, LoadedKey]:
    return rsa_pair(2048)


@pytest.fixture(scope="session")
def p256() -> tuple[LoadedKey, LoadedKey]:
    return ec_pair(P256.oid_der)
