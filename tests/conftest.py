"""Shared test fixtures: where the real data lives."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def mnist_easy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real one-class MNIST (official split) with digit 1, the easy one, as the normal class.

    Prepared once per test session from the checksummed cache (trainer.datasets.prepare).
    """
    from trainer.datasets import prepare

    out = tmp_path_factory.mktemp("data") / "mnist-1"
    prepare("mnist", out, normal_class="1")
    return out


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a test module: on a busy 2-core machine two threads contend
    (measured 5-10x slower), as DESIGN.md warns for ONNX Runtime."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
