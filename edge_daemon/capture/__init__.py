"""Capture: camera sources, one reader thread per camera, latest-frame slots, camera health.

The pipeline imports from here: ``Camera``, ``Frame``, ``CameraStatus``, ``HealthConfig``,
``parse_source`` (config validation) and ``CaptureError``. Names are loaded on first use, so that
``edge_daemon.capture.sources.parse_source`` (config checks) works where OpenCV is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_daemon.capture.camera import Camera, CameraState, CameraStatus, Frame, LatestFrameSlot
    from edge_daemon.capture.health import HealthConfig, HealthMonitor
    from edge_daemon.capture.sources import (
        CaptureError,
        SourceKind,
        SourceSpec,
        has_ffmpeg,
        has_gstreamer,
        missing_capability,
        open_capture,
        parse_source,
        source_fps,
    )

_WHERE = {
    "Camera": "camera",
    "CameraState": "camera",
    "CameraStatus": "camera",
    "Frame": "camera",
    "LatestFrameSlot": "camera",
    "HealthConfig": "health",
    "HealthMonitor": "health",
    "CaptureError": "sources",
    "SourceKind": "sources",
    "SourceSpec": "sources",
    "has_ffmpeg": "sources",
    "has_gstreamer": "sources",
    "missing_capability": "sources",
    "open_capture": "sources",
    "parse_source": "sources",
    "source_fps": "sources",
}

__all__ = [
    "Camera",
    "CameraState",
    "CameraStatus",
    "CaptureError",
    "Frame",
    "HealthConfig",
    "HealthMonitor",
    "LatestFrameSlot",
    "SourceKind",
    "SourceSpec",
    "has_ffmpeg",
    "has_gstreamer",
    "missing_capability",
    "open_capture",
    "parse_source",
    "source_fps",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
