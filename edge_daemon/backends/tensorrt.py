"""Native TensorRT 10 backend: the bundle's engine when its key matches this device, else one built here.

The engine key (deploy.engines.engine_key) names the ONNX file, TensorRT version, GPU compute capability,
precision and max batch. ``open_tensorrt`` looks for that key in the bundle's ``engines/`` and then in the
device's cache; ``EngineBuild`` builds a missing one into the cache on a background thread (ONNX Runtime
serves meanwhile) within a time limit. Every engine passes the golden parity gate before it serves
(edge_daemon.backends.gate). All TensorRT calls are deploy.engines' (import-guarded: without TensorRT and a GPU
everything here raises BackendUnavailable naming what is missing).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from deploy.engines import (
    DeviceInfo,
    EngineError,
    EnginePrecision,
    TensorRTUnavailable,
    build_engine,
    engine_key,
    find_engine,
    probe_device,
    sm_tag,
    tensorrt_runner,
)
from edge_daemon.backends.base import Backend, BackendError, BackendUnavailable
from edge_daemon.model import LoadedBundle


def device_engine_key(bundle: LoadedBundle, device: DeviceInfo, precision: EnginePrecision, max_batch: int) -> str:
    """The key an engine for ``bundle`` must have on ``device``. BackendUnavailable when TensorRT/GPU is missing."""
    missing = device.missing()
    if missing:
        raise BackendUnavailable("TensorRT cannot run here: missing " + " and ".join(missing))
    entry = bundle.manifest.files.get("model.onnx")
    if entry is None:
        raise BackendError("the bundle's manifest lists no model.onnx")
    assert device.tensorrt_version is not None and device.compute_capability is not None
    return engine_key(entry.sha256, device.tensorrt_version, sm_tag(device.compute_capability), precision, max_batch)


def open_tensorrt(
    bundle: LoadedBundle,
    *,
    precision: EnginePrecision,
    max_batch: int,
    cache_dir: Path | None,
    device: DeviceInfo | None = None,
) -> Backend | None:
    """The TensorRT backend for an engine already on disk (not yet gated), or None when none matches this device.

    BackendUnavailable when TensorRT or a GPU is missing; BackendError when the engine exists but cannot be used
    (its sidecar does not match the device, or TensorRT refuses it).
    """
    device = device or probe_device()
    key = device_engine_key(bundle, device, precision, max_batch)
    plan = find_engine(bundle.root, cache_dir, key)
    if plan is None:
        return None
    try:
        run = tensorrt_runner(plan, device=device)
    except TensorRTUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    except EngineError as exc:
        raise BackendError(str(exc)) from None
    return Backend("tensorrt", key, max_batch, precision, run)


class EngineBuild:
    """Builds the engine for ``bundle`` into ``cache_dir`` on a daemon thread, so that serving never waits for it.

    ``poll()`` -> "building" | "done" | "failed" | "timed_out"; ``error`` holds the reason of a failure. A build
    that outlives ``time_limit_s`` is reported as timed out (TensorRT cannot be interrupted; its thread is left to
    finish and its plan, if any, is used on the next start once its sidecar exists).
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        cache_dir: Path,
        *,
        precision: EnginePrecision,
        max_batch: int,
        time_limit_s: float = 3600.0,
    ) -> None:
        self.bundle = bundle
        self.cache_dir = Path(cache_dir)
        self.precision: EnginePrecision = precision
        self.max_batch = max_batch
        self.time_limit_s = time_limit_s
        self.error: str | None = None
        self.plan: Path | None = None
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._build, name="engine-build", daemon=True)

    def start(self) -> EngineBuild:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _build(self) -> None:
        try:
            plan, _ = build_engine(
                self.bundle.onnx_path, self.cache_dir, precision=self.precision, max_batch=self.max_batch
            )
            self.plan = plan
        except Exception as exc:  # a failed build is reported on P/info and in the log, never fatal
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    def poll(self) -> str:
        if self._done.is_set():
            return "done" if self.plan is not None else "failed"
        if time.monotonic() - self.started > self.time_limit_s:
            self.error = f"the engine build took longer than {self.time_limit_s:.0f} s"
            return "timed_out"
        return "building"
