"""Shared test fixtures: where the real data lives."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bundle_factory import PREBUILT_ENV, SignedBundle, copy_prebuilt, make_signed_bottle_bundle

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


# A real fixed camera's recording (DESIGN.md, offline data): OpenCV's vtest.avi from Debian's opencv-doc package,
# 795 frames of 768x576 at 10 fps, MPEG-4 part 2 ("MP43"): a still, paved square that people walk across.
VTEST_PACKAGE = "opencv-doc"
VTEST_DIR = "usr/share/doc/opencv-doc/examples/data"
VTEST_SHA256 = "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf"


@pytest.fixture(scope="session")
def fixed_camera_video() -> Path:
    """vtest.avi, sha256-checked: cached in the trainer's download cache (one 96 MB ``apt-get download`` at most)."""
    from trainer.datasets.cache import debian_files, default_cache_dir

    cache_dir = default_cache_dir()
    advice = f"run `apt-get update` and retry (a real camera recording from Debian's {VTEST_PACKAGE})"
    files = debian_files(
        VTEST_PACKAGE, VTEST_DIR, {"vtest.avi": VTEST_SHA256}, cache_dir / VTEST_PACKAGE, cache_dir, advice
    )
    return files["vtest.avi"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for a test module: on a busy 2-core machine two threads contend
    (measured 5-10x slower), as DESIGN.md warns for ONNX Runtime."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def signed_bottle_bundle(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> SignedBundle:
    """A real detector for the daemon's tests (tests/bundle_factory.py): trained here, or copied from the folder
    that $EDGE_INSPECT_TEST_BUNDLE names (built ahead by `python -m tests.bundle_factory`, for a run without torch)."""
    root = tmp_path_factory.mktemp("bottle-bundle")
    prebuilt = os.environ.get(PREBUILT_ENV)
    if prebuilt:
        return copy_prebuilt(Path(prebuilt), root)
    return make_signed_bottle_bundle(shared_data, root)


@pytest.fixture(autouse=True)
def reap_daemons() -> Iterator[None]:
    """Kill any daemon process a test started and left running (e.g. when an assertion failed mid-test)."""
    yield
    from tests.daemon_helpers import RUNNING

    while RUNNING:
        daemon = RUNNING.pop()
        if daemon.alive():
            daemon.proc.kill()
            daemon.proc.wait(10)
