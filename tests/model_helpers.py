"""What the model tests share: real MNIST test images, and the ONNX Runtime parity check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deploy.preprocess import InputSpec
from trainer.datasets.folder import load_images, scan_folder
from trainer.export import export_onnx, ort_outputs
from trainer.models.base import Detector


def mnist_test_images(data: Path, n: int, size: int) -> torch.Tensor:
    """``n`` images spread evenly over the test split of the one-class MNIST folder ``data`` (its normal
    digit and every other digit), as the trainer feeds them: float32 [0, 1], NCHW, one channel, size x size.
    """
    test = scan_folder(data, need_test=True).test
    picks = [test[i] for i in np.linspace(0, len(test) - 1, n).astype(int)]
    return torch.from_numpy(load_images(picks, InputSpec(size, size, 1))).float() / 255.0


def assert_onnx_matches_eager(
    model: Detector, x: torch.Tensor, path: Path, *, score_rtol: float = 1e-4, map_atol: float | None = None
) -> None:
    """Export ``model`` (eval mode) to ``path`` as bundles ship it, run it with ONNX Runtime on ``x`` and
    compare with the eager forward. Tolerances: the score within ``score_rtol`` of the score scale (the
    batch's largest |score|); the map within ``map_atol`` (absolute, in the map's units) or, without one,
    within 1e-4 of the map's largest value."""
    with torch.no_grad():
        score, amap = model(x)
    export_onnx(model, InputSpec(x.shape[2], x.shape[3], x.shape[1]), path)
    o_score, o_map = ort_outputs(path, x.numpy())
    assert o_score.shape == (len(x),) and o_map.shape == (len(x), 1, x.shape[2], x.shape[3])
    assert np.abs(o_score - score.numpy()).max() <= score_rtol * float(score.abs().max())
    map_tol = map_atol if map_atol is not None else 1e-4 * max(float(amap.max()), 1e-6)
    assert np.abs(o_map - amap.numpy()).max() <= map_tol
