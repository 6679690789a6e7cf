"""Helpers for the mechanism tests: KAT loading and key construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from keygridd.mechanisms import LoadedKey, get, load_key
from keygridd.pkcs11._constants import CKA, CKK, CKM, CKO

KAT = Path(__file__).resolve().parents[2] / "vectors" / "kat"


def kat(name: str) -> Any:
    return json.loads((KAT / name).read_text())


def rsa_pair(bits: int) -> tuple[LoadedKey, LoadedKey]:
    pub, priv = get(CKM.RSA_PKCS_KEY_PAIR_GEN).generate_key_pair({CKA.MODULUS_BITS: bits}, {})
    return load_key(pub), load_key(priv)


def ec_pair(params: bytes, mech: int = CKM.EC_KEY_PAIR_GEN) -> tuple[LoadedKey, LoadedKey]:
    pub, priv = get(mech).generate_key_pair({CKA.EC_PARAMS: params}, {})
    return load_key(pub), load_key(priv)


def secret(value: bytes, key_type: int = CKK.AES) -> LoadedKey:
    return load_key({CKA.CLASS: CKO.SECRET_KEY, CKA.KEY_TYPE: key_type, CKA.VALUE: value})
