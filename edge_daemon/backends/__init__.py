"""Inference backends: ONNX Runtime and native TensorRT, behind one interface (backends.base.Backend).

``select_backend`` is the one place that decides what serves a bundle on this device; nothing serves before
it passed the bundle's golden parity gate (``gate``).

    onnxruntime  ONNX Runtime with the best provider present (TensorRT EP, CUDA EP, CPU)
    tensorrt     the native engine; when no engine for this device exists yet, ONNX Runtime serves while one
                 is built in the background (the returned EngineBuild), and the pipeline swaps between batches
    auto         tensorrt where TensorRT and a GPU exist, else onnxruntime
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from deploy.engines import EnginePrecision, probe_device
from deploy.manifest import BundleError
from deploy.parity import check_parity
from deploy.preprocess_check import preprocessing_verdict
from edge_daemon.backends.base import Backend, BackendError, BackendUnavailable, Runner
from edge_daemon.backends.onnxruntime import available_providers, open_onnxruntime
from edge_daemon.backends.tensorrt import EngineBuild, open_tensorrt
from edge_daemon.model import LoadedBundle

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "EngineBuild",
    "Runner",
    "available_providers",
    "check_preprocessing_here",
    "gate",
    "another_backend",
    "select_backend",
]
log = logging.getLogger("edge_daemon.backends")
BackendChoice = Literal["auto", "tensorrt", "onnxruntime"]


def gate(backend: Backend, bundle: LoadedBundle) -> Backend:
    """Run the bundle's golden parity gate on ``backend``; return it with ``parity`` set, or raise BackendError."""
    try:
        report = check_parity(
            backend.run,
            bundle.root,
            bundle.manifest,
            precision="fp16" if backend.precision == "fp16" else "fp32",
            batch=backend.max_batch,
        )
    except BundleError as exc:
        raise BackendError(f"the bundle's golden set is unusable: {exc}") from None
    except Exception as exc:  # a backend that crashes on the golden inputs fails the gate
        raise BackendError(f"{backend.kind} crashed on the golden inputs: {type(exc).__name__}: {exc}") from None
    if not report.ok:
        raise BackendError(f"{backend.kind} ({backend.detail}) failed the golden gate: {report.summary()}")
    backend.parity = report.summary()
    return backend


def select_backend(
    bundle: LoadedBundle,
    choice: BackendChoice,
    *,
    max_batch: int,
    cache_dir: Path | None,
    precision: EnginePrecision = "fp16",
    build_time_limit_s: float = 3600.0,
) -> tuple[Backend, EngineBuild | None]:
    """The gated backend that serves ``bundle`` now, and the engine build under way (or None), which is reported
    as timed out after ``build_time_limit_s`` seconds. The backend's ``preprocessing`` says whether this device
    prepares the bundle's golden source images as the trainer did (``check_preprocessing_here``).

    BackendUnavailable when ``choice`` is "tensorrt" and TensorRT or a GPU is missing; BackendError when nothing
    passes the gate.
    """
    backend, build = _gated_backend(
        bundle,
        choice,
        max_batch=max_batch,
        cache_dir=cache_dir,
        precision=precision,
        build_time_limit_s=build_time_limit_s,
    )
    backend.preprocessing = check_preprocessing_here(backend, bundle)
    return backend, build


def check_preprocessing_here(backend: Backend, bundle: LoadedBundle) -> str:
    """One line: does this device's OpenCV prepare the bundle's golden source images as the trainer did, and by how
    much do differences move the normalised score on ``backend`` (``preprocessing_verdict``). A difference, or a
    check that cannot be made, is logged as a warning; the daemon serves either way (advice for the engineer, who
    can compare JetPack's OpenCV with the trainer's)."""
    level, line = preprocessing_verdict(bundle.root, bundle.manifest, backend.run)
    if level == "warn":
        log.warning("preprocessing of %s %s: %s", bundle.name, bundle.version, line)
    return line


def _gated_backend(
    bundle: LoadedBundle,
    choice: BackendChoice,
    *,
    max_batch: int,
    cache_dir: Path | None,
    precision: EnginePrecision,
    build_time_limit_s: float,
) -> tuple[Backend, EngineBuild | None]:
    if choice in ("auto", "tensorrt"):
        device = probe_device()
        missing = device.missing()
        if missing:
            if choice == "tensorrt":
                raise BackendUnavailable(
                    "backend tensorrt was asked for, but this device lacks " + " and ".join(missing)
                )
            log.info("TensorRT not available (%s): using ONNX Runtime", "; ".join(missing))
        else:
            try:
                trt_backend = open_tensorrt(
                    bundle, precision=precision, max_batch=max_batch, cache_dir=cache_dir, device=device
                )
                if trt_backend is not None:
                    return gate(trt_backend, bundle), None
            except BackendError as exc:
                log.warning("the TensorRT engine cannot serve (%s): building a new one", exc)
            build = None
            if cache_dir is not None:
                build = EngineBuild(
                    bundle, cache_dir, precision=precision, max_batch=max_batch, time_limit_s=build_time_limit_s
                ).start()
            return gate(open_onnxruntime(bundle, max_batch=max_batch, cache_dir=cache_dir), bundle), build
    return gate(open_onnxruntime(bundle, max_batch=max_batch, cache_dir=cache_dir), bundle), None


def finish_build(build: EngineBuild, bundle: LoadedBundle) -> Backend | None:
    """When ``build`` is done: the gated TensorRT backend for its engine, else None (the reason is logged)."""
    state = build.poll()
    if state != "done":
        if state in ("failed", "timed_out"):
            log.warning("TensorRT engine build %s: %s; ONNX Runtime keeps serving", state, build.error)
        return None
    try:
        backend = open_tensorrt(bundle, precision=build.precision, max_batch=build.max_batch, cache_dir=build.cache_dir)
        if backend is None:
            log.warning("the TensorRT engine built in %s cannot be found; ONNX Runtime keeps serving", build.cache_dir)
            return None
        backend = gate(backend, bundle)
    except BackendError as exc:
        log.warning("the new TensorRT engine is refused (%s); ONNX Runtime keeps serving", exc)
        return None
    backend.preprocessing = check_preprocessing_here(backend, bundle)
    return backend


def another_backend(backend: Backend, bundle: LoadedBundle, *, cache_dir: Path | None) -> Backend:
    """A second, independent session of the same kind as ``backend`` (for another scoring worker), gated."""
    if backend.kind == "tensorrt":
        twin = open_tensorrt(bundle, precision=backend.precision, max_batch=backend.max_batch, cache_dir=cache_dir)  # type: ignore[arg-type]
        if twin is None:
            raise BackendError("the TensorRT engine serving the first worker cannot be found for another")
        return gate(twin, bundle)
    return gate(open_onnxruntime(bundle, max_batch=backend.max_batch, cache_dir=cache_dir), bundle)
