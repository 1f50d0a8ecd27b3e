"""Camera health beyond "no frames": frozen, black or saturated images and a frame rate far too low.

``HealthMonitor.observe`` is called by the camera thread on every frame it reads, so it must be
cheap: it looks at a strided grey sample of about 32 rows (a view plus one small copy, never the
full frame). Strided samples keep each pixel's sensor noise, which is what tells a live camera
watching a still scene (noise changes every sample a little) from a frozen one (samples identical
to the bit, or within ``frozen_tolerance`` for decoder rounding); an area-averaged thumbnail would
average that noise away and call still scenes frozen. Measured on a real fixed camera's MPEG-4 recording
(OpenCV's vtest.avi, everything that moves frozen at its first frame, the still background left as
recorded; tests/test_camera_health.py): the strided sample never comes within the tolerance of the frame
before, where a 43x32 area thumbnail stays "identical" for 219 consecutive frames.

Reason codes (the camera's status ``reason`` when ``degraded``): ``black``, ``saturated``,
``frozen``, ``low_fps``; when several hold, the first in that order is reported.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

# Samples along the shorter image side: 720p -> stride 22 -> a 33 x 59 grey sample.
_SAMPLES_SHORT_SIDE = 32


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health checks.

    frozen_frames: consecutive identical frames (the first included) that make a camera ``frozen``.
    frozen_tolerance: the largest per-sample grey difference (0-255 levels) still called identical.
    black_level / saturated_level: mean grey (0-255) below / above which a frame is ``black`` /
    ``saturated``. low_fps_ratio: the measured frame rate over the last ``window_s`` seconds below
    ``low_fps_ratio * expected_fps`` is ``low_fps`` (checked only once ``window_s`` of frames has been
    seen since the start or the last reset, and only when an expected rate is given).
    recover_frames: consecutive good frames that clear a degraded reason.
    """

    frozen_frames: int = 30
    frozen_tolerance: float = 1.0
    black_level: float = 10.0
    saturated_level: float = 245.0
    low_fps_ratio: float = 0.5
    window_s: float = 5.0
    recover_frames: int = 5

    def __post_init__(self) -> None:
        if self.frozen_frames < 2:
            raise ValueError(f"frozen_frames must be at least 2, got {self.frozen_frames}")
        if self.frozen_tolerance < 0:
            raise ValueError(f"frozen_tolerance must be 0 or more, got {self.frozen_tolerance}")
        if not 0 <= self.black_level < self.saturated_level <= 255:
            raise ValueError(
                f"need 0 <= black_level < saturated_level <= 255, got {self.black_level} and {self.saturated_level}"
            )
        if not 0 < self.low_fps_ratio <= 1:
            raise ValueError(f"low_fps_ratio must be in (0, 1], got {self.low_fps_ratio}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be positive (seconds), got {self.window_s}")
        if self.recover_frames < 1:
            raise ValueError(f"recover_frames must be at least 1, got {self.recover_frames}")


class HealthMonitor:
    """Per-camera health state; one instance per camera, used from one thread only.

    ``observe`` returns the current degraded reason or None. A reason is raised on the frame where its
    condition first holds and stays until ``recover_frames`` consecutive frames are free of every
    condition (a frame showing a different condition switches the reason at once).
    """

    def __init__(self, config: HealthConfig | None = None, expected_fps: float | None = None) -> None:
        if expected_fps is not None and not expected_fps > 0:
            raise ValueError(f"expected_fps must be positive, got {expected_fps}")
        self.config = config or HealthConfig()
        self.expected_fps = expected_fps
        self._times: deque[float] = deque()
        self.reset()

    def reset(self) -> None:
        """Forget history (after a reconnect): no reason, frame-rate window restarts."""
        self._reason: str | None = None
        self._good_run = 0
        self._previous: np.ndarray | None = None
        self._identical_run = 1
        self._times.clear()
        self._started: float | None = None

    @property
    def reason(self) -> str | None:
        """The current degraded reason, or None when healthy."""
        return self._reason

    def observe(self, image: np.ndarray, t: float) -> str | None:
        """Account one frame read at ``t`` (time.monotonic() seconds); returns the degraded reason or None.

        ``image`` is HxW (grey) or HxWxC uint8 (BGR, C >= 3 uses the first three channels).
        """
        condition = self._condition(_grey_sample(image), t)
        if condition is not None:
            self._reason = condition
            self._good_run = 0
        elif self._reason is not None:
            self._good_run += 1
            if self._good_run >= self.config.recover_frames:
                self._reason = None
                self._good_run = 0
        return self._reason

    def measured_fps(self) -> float | None:
        """Frames per second over the last ``window_s``, or None until a full window has been seen."""
        if self._started is None or not self._times or self._times[-1] - self._started < self.config.window_s:
            return None
        return len(self._times) / self.config.window_s

    def _condition(self, grey: np.ndarray, t: float) -> str | None:
        cfg = self.config
        mean = float(grey.mean())
        if self._previous is not None and self._previous.shape == grey.shape:
            diff = int(cv2.absdiff(grey, self._previous).max())
            self._identical_run = self._identical_run + 1 if diff <= cfg.frozen_tolerance else 1
        else:
            self._identical_run = 1
        self._previous = grey

        if self._started is None:
            self._started = t
        self._times.append(t)
        while self._times and self._times[0] <= t - cfg.window_s:
            self._times.popleft()

        if mean < cfg.black_level:
            return "black"
        if mean > cfg.saturated_level:
            return "saturated"
        if self._identical_run >= cfg.frozen_frames:
            return "frozen"
        fps = self.measured_fps()
        if self.expected_fps is not None and fps is not None and fps < cfg.low_fps_ratio * self.expected_fps:
            return "low_fps"
        return None


def _grey_sample(image: np.ndarray) -> np.ndarray:
    """A small contiguous grey uint8 copy of ``image``: every s-th pixel, about 32 along the shorter side."""
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    stride = max(1, min(image.shape[0], image.shape[1]) // _SAMPLES_SHORT_SIDE)
    sample = np.ascontiguousarray(image[::stride, ::stride])
    if sample.ndim == 2 or sample.shape[2] == 1:
        return sample.reshape(sample.shape[0], sample.shape[1])
    return cv2.cvtColor(np.ascontiguousarray(sample[:, :, :3]), cv2.COLOR_BGR2GRAY)
