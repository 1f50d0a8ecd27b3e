"""The golden parity gate: any backend must reproduce the bundle's golden outputs before it serves.

A bundle ships ``golden/inputs.npy`` (float32 [N, C, H, W] in [0, 1]), ``golden/scores.npy``
(float32 [N]) and ``golden/maps.npy`` (float32 [N, 1, H, W]): the torch model's own outputs (eval
mode, CPU, float32). A backend (ONNX Runtime, a TensorRT engine) is a callable
``run(x) -> (score, map)``; the gate runs it on the golden inputs and compares, per image,

    |score - score_expected| <= score_atol + score_rtol * |score_expected|
    max |map - map_expected| <= map_atol

and fails, with a one-line reason, on NaN/inf, a wrong shape or a dtype other than float32.

Tolerances (``Tolerances``):

* fp32 backends use the bundle's own ``manifest.golden`` tolerances (the exporter writes
  score rtol 1e-4 for ONNX Runtime).
* fp16 engines use looser ones, each at least the manifest's: score rtol ``FP16_SCORE_RTOL``
  (1e-2), score atol the manifest's times ``FP16_SCORE_ATOL_FACTOR`` (100: the exporter's atol is 1e-4 of the
  held-out score span, capped at 1e-4, so fp16 may move a score by 1e-2 of that span; a fixed 1e-4 would let a
  model whose scores span 8e-4 drift by 12 % of its span, i.e. 0.12 of a normalised score, and still pass),
  map atol ``FP16_MAP_ATOL`` (1e-2) times
  ``max(1, max |map_expected|)`` (so a model whose maps are not in [0, 1] is judged relative to
  their scale). fp16 carries about 3 decimal digits (unit roundoff 4.9e-4); a few layers deep, an
  error of a few 1e-3 relative is normal, 1e-2 is the point where something is wrong.

``check_parity_arrays`` is the core and needs only arrays and tolerances; ``check_parity`` reads a
bundle's golden files and tolerances from its manifest. Never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deploy.manifest import BundleError, Manifest

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Precision = Literal["fp32", "fp16"]

GOLDEN_INPUTS = "golden/inputs.npy"
GOLDEN_SCORES = "golden/scores.npy"
GOLDEN_MAPS = "golden/maps.npy"

FP16_SCORE_RTOL = 1e-2
FP16_SCORE_ATOL_FACTOR = 100.0
FP16_MAP_ATOL = 1e-2


class GoldenError(BundleError):
    """The golden files themselves are unusable (missing, unreadable, wrong shape or dtype): a bad bundle.

    Names the file. A ``BundleError``, so the CLIs report it as one line with exit 2.
    """


@dataclass(frozen=True)
class Tolerances:
    score_rtol: float
    score_atol: float
    map_atol: float

    def __post_init__(self) -> None:
        for name in ("score_rtol", "score_atol", "map_atol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"tolerance {name} must be a finite number >= 0, got {value!r}")

    def for_precision(self, precision: Precision, expected_maps: np.ndarray | None = None) -> Tolerances:
        """These tolerances for ``precision``: unchanged for fp32; for fp16 the looser documented ones."""
        if precision == "fp32":
            return self
        if precision != "fp16":
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        scale = 1.0
        if expected_maps is not None and expected_maps.size:
            scale = max(1.0, float(np.max(np.abs(expected_maps))))
        return Tolerances(
            score_rtol=max(self.score_rtol, FP16_SCORE_RTOL),
            score_atol=self.score_atol * FP16_SCORE_ATOL_FACTOR,
            map_atol=max(self.map_atol, FP16_MAP_ATOL * scale),
        )


@dataclass
class ParityReport:
    ok: bool
    n: int
    max_score_abs: float
    max_score_rel: float
    max_map_abs: float
    score_rtol: float
    score_atol: float
    map_atol: float
    reason: str | None
    precision: str = "fp32"

    def summary(self) -> str:
        """One line with the figures, e.g. for a CLI or a log."""
        verdict = "ok" if self.ok else f"FAILED: {self.reason}"
        return (
            f"parity {verdict} ({self.precision}, {self.n} golden images): "
            f"max |score diff| {self.max_score_abs:.3g} (rel {self.max_score_rel:.3g}; "
            f"tolerance atol {self.score_atol:g} + rtol {self.score_rtol:g}), "
            f"max |map diff| {self.max_map_abs:.3g} (tolerance {self.map_atol:g})"
        )


def _load_npy(path: Path, label: str) -> np.ndarray:
    if not path.is_file():
        raise GoldenError(f"golden file {label} is missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GoldenError(f"golden file {label} is not a readable .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise GoldenError(f"golden file {label} is not a single .npy array")
    if arr.dtype != np.float32:
        raise GoldenError(f"golden file {label} has dtype {arr.dtype}, expected float32")
    if not np.all(np.isfinite(arr)):
        raise GoldenError(f"golden file {label} contains NaN or inf")
    return arr


def load_golden_files(
    golden_dir: Path,
    *,
    n: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``inputs.npy``, ``scores.npy``, ``maps.npy`` from ``golden_dir`` and check them.

    ``input_shape`` is (C, H, W) when known; ``n`` the expected number of images. Raises
    ``GoldenError`` naming the file and the problem.
    """
    inputs = _load_npy(golden_dir / "inputs.npy", GOLDEN_INPUTS)
    scores = _load_npy(golden_dir / "scores.npy", GOLDEN_SCORES)
    maps = _load_npy(golden_dir / "maps.npy", GOLDEN_MAPS)
    if inputs.ndim != 4:
        raise GoldenError(f"golden file {GOLDEN_INPUTS} has shape {inputs.shape}, expected [N, C, H, W]")
    count, _, height, width = inputs.shape
    if count < 1:
        raise GoldenError(f"golden file {GOLDEN_INPUTS} holds no images")
    if n is not None and count != n:
        raise GoldenError(f"golden file {GOLDEN_INPUTS} holds {count} images, the manifest says {n}")
    if input_shape is not None and tuple(inputs.shape[1:]) != tuple(input_shape):
        raise GoldenError(
            f"golden file {GOLDEN_INPUTS} has images of shape {tuple(inputs.shape[1:])}, "
            f"the manifest's input is {tuple(input_shape)}"
        )
    if float(inputs.min()) < 0.0 or float(inputs.max()) > 1.0:
        raise GoldenError(f"golden file {GOLDEN_INPUTS} has values outside [0, 1]")
    if scores.shape != (count,):
        raise GoldenError(f"golden file {GOLDEN_SCORES} has shape {scores.shape}, expected ({count},)")
    if maps.shape != (count, 1, height, width):
        raise GoldenError(f"golden file {GOLDEN_MAPS} has shape {maps.shape}, expected {(count, 1, height, width)}")
    return inputs, scores, maps


def load_golden(bundle_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundle's golden inputs, scores and maps, checked against the manifest's count and input spec."""
    spec = manifest.input
    return load_golden_files(
        Path(bundle_dir) / "golden",
        n=manifest.golden.n,
        input_shape=(spec.channels, spec.height, spec.width),
    )


def manifest_tolerances(manifest: Manifest) -> Tolerances:
    """The fp32 tolerances the bundle's manifest states."""
    g = manifest.golden
    return Tolerances(score_rtol=g.score_rtol, score_atol=g.score_atol, map_atol=g.map_atol)


def _fail(tol: Tolerances, n: int, precision: str, reason: str, **figures: float) -> ParityReport:
    return ParityReport(
        ok=False,
        n=n,
        max_score_abs=figures.get("max_score_abs", math.nan),
        max_score_rel=figures.get("max_score_rel", math.nan),
        max_map_abs=figures.get("max_map_abs", math.nan),
        score_rtol=tol.score_rtol,
        score_atol=tol.score_atol,
        map_atol=tol.map_atol,
        reason=reason,
        precision=precision,
    )


def _check_output(name: str, arr: object, shape: tuple[int, ...], start: int) -> str | None:
    if not isinstance(arr, np.ndarray):
        return f"backend output {name!r} is a {type(arr).__name__}, not a numpy array"
    if arr.shape != shape:
        images = f"golden images {start}..{start + shape[0] - 1}"
        return f"backend output {name!r} has shape {arr.shape} for {images}, expected {shape}"
    if arr.dtype != np.float32:
        return f"backend output {name!r} has dtype {arr.dtype}, expected float32"
    bad = ~np.isfinite(arr.reshape(shape[0], -1)).all(axis=1)
    if bad.any():
        images = ", ".join(str(start + int(i)) for i in np.flatnonzero(bad)[:8])
        return f"backend output {name!r} has NaN or inf (golden image(s) {images})"
    return None


def _indices(mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    text = ", ".join(str(int(i)) for i in idx[:8])
    return text + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")


def check_parity_arrays(
    run: Runner,
    inputs: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    tolerances: Tolerances,
    *,
    precision: Precision = "fp32",
    batch: int | None = None,
) -> ParityReport:
    """Run ``run`` on ``inputs`` (in batches of ``batch``, or all at once) and compare with the expected outputs.

    ``tolerances`` are the fp32 ones; for ``precision="fp16"`` they are loosened as the module
    docstring says. Never raises for a misbehaving backend: an exception, a wrong shape or dtype,
    NaN/inf or a difference beyond tolerance gives ``ok=False`` with the reason.
    """
    tol = tolerances.for_precision(precision, maps)
    n = int(inputs.shape[0])
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    step = n if batch is None else batch
    got_scores: list[np.ndarray] = []
    got_maps: list[np.ndarray] = []
    for start in range(0, n, step):
        chunk = np.ascontiguousarray(inputs[start : start + step])
        b = chunk.shape[0]
        try:
            out = run(chunk)
        except Exception as exc:  # noqa: BLE001 - any backend failure is a gate failure with its reason
            return _fail(tol, n, precision, f"backend raised {type(exc).__name__}: {exc}")
        if not (isinstance(out, tuple) and len(out) == 2):
            return _fail(tol, n, precision, "backend must return a (score, map) pair")
        s, m = out
        problem = _check_output("score", s, (b,), start) or _check_output("map", m, (b, *maps.shape[1:]), start)
        if problem:
            return _fail(tol, n, precision, problem)
        got_scores.append(s)
        got_maps.append(m)
    s_all = np.concatenate(got_scores).astype(np.float64)
    m_all = np.concatenate(got_maps).astype(np.float64)
    s_exp = scores.astype(np.float64)
    m_exp = maps.astype(np.float64)

    score_abs = np.abs(s_all - s_exp)
    score_rel = score_abs / np.maximum(np.abs(s_exp), np.finfo(np.float32).tiny)
    map_abs = np.abs(m_all - m_exp).reshape(n, -1).max(axis=1)
    figures = {
        "max_score_abs": float(score_abs.max()),
        "max_score_rel": float(score_rel.max()),
        "max_map_abs": float(map_abs.max()),
    }
    reasons = []
    score_bad = score_abs > tol.score_atol + tol.score_rtol * np.abs(s_exp)
    if score_bad.any():
        worst = int(np.argmax(np.where(score_bad, score_abs, -1.0)))
        reasons.append(
            f"score differs beyond atol {tol.score_atol:g} + rtol {tol.score_rtol:g} on golden image(s) "
            f"{_indices(score_bad)} (worst: image {worst}, got {s_all[worst]:.7g}, expected {s_exp[worst]:.7g})"
        )
    map_bad = map_abs > tol.map_atol
    if map_bad.any():
        reasons.append(
            f"map differs by up to {figures['max_map_abs']:.3g} > map_atol {tol.map_atol:g} on golden image(s) "
            f"{_indices(map_bad)}"
        )
    if reasons:
        return _fail(tol, n, precision, "; ".join(reasons), **figures)
    return ParityReport(
        ok=True,
        n=n,
        score_rtol=tol.score_rtol,
        score_atol=tol.score_atol,
        map_atol=tol.map_atol,
        reason=None,
        precision=precision,
        **figures,
    )


def check_parity(
    run: Runner,
    bundle_dir: Path,
    manifest: Manifest,
    *,
    precision: Precision = "fp32",
    batch: int | None = None,
) -> ParityReport:
    """The gate on a bundle: its golden files and its manifest's tolerances (loosened for fp16).

    Raises ``GoldenError`` when the golden files themselves are unusable (a bad bundle, not a bad backend).
    """
    inputs, scores, maps = load_golden(bundle_dir, manifest)
    return check_parity_arrays(
        run, inputs, scores, maps, manifest_tolerances(manifest), precision=precision, batch=batch
    )


def onnxruntime_runner(
    onnx_path: Path,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
    intra_op_threads: int = 1,
) -> Runner:
    """An ONNX Runtime backend for ``onnx_path``: ``run(x float32 [B,C,H,W]) -> (score [B], map [B,1,H,W])``.

    ``providers`` are ONNX Runtime's: names, or (name, options) pairs, in order of preference.
    Spinning is off (``session.intra_op.allow_spinning = 0``, DESIGN.md): an idle daemon must not
    burn a core. Raises ValueError when the graph lacks input ``x`` or outputs ``score``/``map``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=list(providers))
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    if input_names != ["x"]:
        raise ValueError(f"{onnx_path}: the model's inputs are {input_names}, expected ['x']")
    if not {"score", "map"} <= set(output_names):
        raise ValueError(f"{onnx_path}: the model's outputs are {output_names}, expected 'score' and 'map'")

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = session.run(["score", "map"], {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(score), np.asarray(amap)

    return run
