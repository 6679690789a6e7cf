"""Fixtures: ``opener`` runs a test once per raw-store backend; ``durable_opener`` per on-disk backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_helpers import BACKENDS, DURABLE_BACKENDS, Opener

from keygridd.storage.registry import close_stores


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    op = Opener(request.param, tmp_path / "store")
    yield op
    op.close_all()


@pytest.fixture(params=DURABLE_BACKENDS)
def durable_opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    op = Opener(request.param, tmp_path / "store")
    yield op
    op.close_all()


@pytest.fixture(autouse=True)
def _close_shared_stores() -> Iterator[None]:
    yield
    close_stores()
