"""The differences table (``differences.py``) names tests that exist and mechanisms the provider lists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conformance.differences import DESELECTED, EXPECTED_FAILURES, OFFERED, UNCOVERED, matches

HERE = Path(__file__).parent
TESTS = {
    node.name
    for path in HERE.glob("test_*.py")
    for node in ast.parse(path.read_text()).body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
}
TABLE_PROVIDERS = sorted(set(DESELECTED) | set(EXPECTED_FAILURES) | set(UNCOVERED))


@pytest.mark.parametrize("provider", TABLE_PROVIDERS)
def test_every_entry_names_a_test_of_the_suite(provider: str) -> None:
    patterns = [*DESELECTED.get(provider, {}), *EXPECTED_FAILURES.get(provider, {})]
    stale = [p for p in patterns if not any(matches(p.split("[", 1)[0], name) for name in TESTS)]
    assert stale == [], f"entries for tests that do not exist: {stale}"


@pytest.mark.parametrize("provider", TABLE_PROVIDERS)
def test_uncovered_mechanisms_are_offered(provider: str) -> None:
    assert set(UNCOVERED.get(provider, {})) <= OFFERED[provider]


def test_matching() -> None:
    assert matches("test_rsa_oaep", "test_rsa_oaep[sha256]")
    assert matches("test_rsa_pss[sha1]", "test_rsa_pss[sha1]")
    assert not matches("test_rsa_pss[sha1]", "test_rsa_pss[sha512]")
    assert matches("test_aes_gcm[*]", "test_aes_gcm[16]")
    assert not matches("test_aes_gcm", "test_aes_gcm_other")
