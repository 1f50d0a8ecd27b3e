"""What every inference backend gives the pipeline: one ``run`` over a batch, and what it is.

A backend takes float32 ``[B, C, H, W]`` in [0, 1] (the manifest's input spec) and returns the raw
score ``[B]`` and the anomaly map ``[B, 1, H, W]`` exactly as the bundle's ONNX graph defines them;
calibration is the pipeline's business. ``run`` may be called from one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class BackendError(Exception):
    """A backend that cannot serve this bundle here (the message says why)."""


class BackendUnavailable(BackendError):
    """A capability this backend needs is missing on the device (TensorRT, a GPU): exit code 3 when it was asked for."""


@dataclass
class Backend:
    """A ready backend: ``kind`` is "onnxruntime" or "tensorrt"; ``detail`` the providers or the engine key."""

    kind: str
    detail: str
    max_batch: int
    precision: str
    run: Runner = field(repr=False)
    parity: str | None = None  # the golden gate's one-line summary once it passed
    preprocessing: str | None = None  # check_preprocessing_here's line (select_backend, finish_build)

    def describe(self) -> dict[str, str | int | None]:
        """For P/info, /healthz and logs."""
        return {
            "kind": self.kind,
            "detail": self.detail,
            "max_batch": self.max_batch,
            "precision": self.precision,
            "parity": self.parity,
            "preprocessing": self.preprocessing,
        }
