"""ONNX Runtime backend: the best execution provider this device has, one single-threaded session.

Providers in order of preference: TensorRT EP, CUDA EP, CPU (DESIGN.md). The TensorRT EP gets an engine
cache folder so that a restart does not rebuild its engines. On CPU the session runs single-threaded
without spinning (DESIGN.md, "Hot-path facts"): one busy core per worker, an idle daemon burns nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.parity import onnxruntime_runner
from edge_daemon.backends.base import Backend, BackendError
from edge_daemon.model import LoadedBundle

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    """ONNX Runtime's providers in this installation ([] when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def choose_providers(available: list[str], cache_dir: Path | None) -> list[str | tuple[str, dict[str, Any]]]:
    """The providers to ask for, best first, from those ``available``; CPU always last."""
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in PREFERENCE:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir / "ort-trt")}
            chosen.append((name, opts))
        else:
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def open_onnxruntime(bundle: LoadedBundle, *, max_batch: int, cache_dir: Path | None) -> Backend:
    """An ONNX Runtime backend for ``bundle`` (not yet gated). BackendError when the session cannot be made."""
    providers = choose_providers(available_providers(), cache_dir)
    if cache_dir is not None and isinstance(providers[0], tuple):
        (cache_dir / "ort-trt").mkdir(parents=True, exist_ok=True)
    try:
        run = onnxruntime_runner(bundle.onnx_path, providers=providers)
    except ImportError:
        raise BackendError("onnxruntime is not installed (pip install 'edge-inspect[daemon]')") from None
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs and providers
        raise BackendError(f"ONNX Runtime cannot load {bundle.onnx_path.name}: {exc}") from None
    names = [p if isinstance(p, str) else p[0] for p in providers]
    return Backend("onnxruntime", ",".join(n.removesuffix("ExecutionProvider") for n in names), max_batch, "fp32", run)
