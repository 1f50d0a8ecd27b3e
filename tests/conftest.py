"""Shared test fixtures: where the real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real inspection images (../shared/data beside the checkout); never copied into the repository.
SHARED_DATA = Path(os.environ.get("EDGE_INSPECT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (set EDGE_INSPECT_SHARED_DATA)")
    return SHARED_DATA
