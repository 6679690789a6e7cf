"""The shim under fork and threads, driven through ctypes (driver.py ``fork`` / ``threads``).

Fork: the parent initialises and signs, forks 4 children that each call
C_Initialize again and sign 100 times, then signs again. Threads: 8 threads,
each on its own session, 1,000 ECDSA P-256 signatures each. Every signature
is checked here with ``cryptography`` against the token's public key.
"""

from __future__ import annotations

import pytest
from consumer_kit import USER_PIN, Consumers
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

pytestmark = pytest.mark.shim

CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
THREADS, SIGNATURES = 8, 1000
PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


@pytest.fixture(scope="module")
def p256(consumer_daemon: Consumers) -> Consumers:
    consumer_daemon.keypair("EC:prime256v1", "conc-p256", "71")
    return consumer_daemon


def public_key(ec_point_hex: str) -> ec.EllipticCurvePublicKey:
    point = bytes.fromhex(ec_point_hex)
    assert point[:2] == b"\x04\x41", point.hex()
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])


def tag_digest(tag: str) -> bytes:
    from hashlib import sha256

    return sha256(tag.encode()).digest()


def valid(key: ec.EllipticCurvePublicKey, digest: bytes, signature_hex: str) -> bool:
    raw = bytes.fromhex(signature_hex)
    if len(raw) != 64:
        return False
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, digest, PREHASHED)
    except InvalidSignature:
        return False
    return True


def test_fork_children_reinitialise_and_sign(p256: Consumers) -> None:
    result = p256.driver("fork", "conc-p256", USER_PIN, "4", "100", timeout=90)
    assert result["init_rv"] == 0
    key = public_key(result["ec_point"])
    assert valid(key, tag_digest("parent-before"), result["before"])
    assert valid(key, tag_digest("parent-after"), result["after"]), "the parent cannot sign after the fork"
    assert len(result["children"]) == 4
    for child in result["children"]:
        assert "error" not in child, child
        assert child["status"] == 0
        assert child["rv_before_init"] == CKR_CRYPTOKI_NOT_INITIALIZED
        assert child["init_rv"] == 0
        assert len(child["sigs"]) == 100
        bad = [m for m, s in child["sigs"] if not valid(key, bytes.fromhex(m), s)]
        assert not bad, f"child {child['child']}: {len(bad)} invalid signatures"
        assert {m for m, _ in child["sigs"]} == {tag_digest(f"child{child['child']}-{i}").hex() for i in range(100)}


def test_threads_sign_concurrently(p256: Consumers) -> None:
    result = p256.driver("threads", "conc-p256", USER_PIN, str(THREADS), str(SIGNATURES), timeout=120)
    assert result["errors"] == []
    key = public_key(result["ec_point"])
    assert sorted(result["sigs"]) == [str(i) for i in range(THREADS)]
    invalid = 0
    for index, signatures in result["sigs"].items():
        assert len(signatures) == SIGNATURES
        invalid += sum(not valid(key, tag_digest(f"thread{index}-{i}"), s) for i, s in enumerate(signatures))
    assert invalid == 0
    rate = THREADS * SIGNATURES / result["elapsed"]
    print(f"{THREADS} threads x {SIGNATURES} ECDSA P-256 signatures: {result['elapsed']:.2f} s, {rate:.0f}/s")
    assert result["elapsed"] < 30, f"{THREADS * SIGNATURES} signatures took {result['elapsed']:.1f} s"
