"""Export a trained RUN as a signed detector bundle (DESIGN.md, "Detector bundle"; ``edge-trainer export``).

Steps, each of which fails loudly rather than shipping something wrong:

1. Load the run's model (``best`` or ``last`` checkpoint, CPU, eval mode) and its config.
2. Export ``forward`` as ONE ONNX graph with the legacy exporter (opset 17, input ``x`` float32
   [B, C, H, W] in [0, 1], outputs ``score`` [B] and ``map`` [B, 1, H, W], only the batch axis
   dynamic) and run ``onnx.checker`` (full check, with shape inference) on it.
3. Parity: run the graph in ONNX Runtime (CPU) on REAL held-out normal images of the run's data (the
   held-out split of train/good that training used, ``split_train_val``) plus the golden anomalous
   images, and compare with the torch model. Tolerance, per image:
   ``|s_ort - s_torch| <= max(score_atol, 1e-4 * |s_torch|)`` with
   ``score_atol = 1e-4 * min(1, raw_max - raw_min)`` (the span of the held-out normal scores): never
   looser than ``1e-4 * max(1, |s_torch|)``, and tighter for models whose scores are tiny (a
   barely trained GANomaly's held-out scores span 5e-5; an absolute 1e-4 there would accept any
   score, while a normalised score moves by |diff| / span). Maps:
   ``max |map_ort - map_torch| <= 1e-4 * max(1, max |map_torch|)``. Outside it, or on a
   NaN/inf or a wrong shape, the export fails with the figures (``ExportParityError``, exit 1).
4. Calibration on the held-out NORMAL images only (never test anomalies): raw min/max and
   quantiles, and a threshold that is either the ``1 - false_alarm_rate`` quantile of the held-out
   scores (default rate 0.005; ``numpy.quantile`` with linear interpolation; the daemon alarms when a
   score is at or above the threshold, so a quantile that falls on a held-out score is moved halfway to
   the next one: ``quantile_threshold``), or - with ``labelled_val`` - the F1-optimal threshold
   on that folder's labelled ``test/*`` images (those its dataset.json sets aside, ``report_apart``, left
   out, as evaluation leaves them out). With few held-out images (the default hold-out is
   10% of train/good) the quantile is coarse: with n images the false-alarm rate can only be
   resolved to about 1/n, and a 0.5% target needs a few hundred images to mean what it says.
   ``Calibration.n_images`` and ``source`` record n, and the summary prints it.
5. Golden files: up to 8 held-out normal images (spread over the held-out set) and, when the run's
   data have test anomalies, up to 4 anomalous test images (spread over the defect types) with
   their torch scores and maps (eval mode, CPU, float32). They are the parity gate any backend must
   pass before it serves; the manifest's golden tolerances are ``score_rtol = 1e-4``, ``score_atol``
   and ``map_atol`` as above. The gate's rule ``|diff| <= atol + rtol * |s|`` is at least as loose
   as the export check's ``max(atol, rtol * |s|)``, so the exported graph passes its own gate.
   The golden images' source files go along as ``golden/sources/<row>.<ext>`` (up to
   ``GOLDEN_SOURCES_MAX_BYTES`` in all), so that a device can check that its OpenCV prepares them as
   this machine did (``deploy.preprocess_check``).
6. ``deploy.bundle.write_bundle`` writes ``manifest.json`` (hashing every file), signs it when a
   key is given, and the bundle is optionally packed into a reproducible ``.tar``.

Bad input (a missing run or checkpoint, an existing non-empty ``out``, an unreadable key, changed
training data, ...) raises ``trainer.errors.UserError`` (exit 2) with one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from deploy.bundle import BundleError, pack_tar, write_bundle
from deploy.manifest import Calibration, GoldenSpec, InputSpecModel, Manifest
from deploy.preprocess import InputSpec, to_float
from deploy.preprocess_check import GOLDEN_SOURCES, golden_sources, source_name
from deploy.signing import key_id, load_private_key
from trainer.calibration_floor import (
    COARSE_FACTOR,
    DEFAULT_FALSE_ALARM_RATE,
    images_needed,
    resolvable_rate,
    too_few,
)
from trainer.datasets.folder import (
    FolderIndex,
    Sample,
    combined_digest,
    file_digests,
    load_images,
    scan_folder,
    spread_indices,
)
from trainer.errors import CapabilityError, UserError
from trainer.models import Detector
from trainer.run_dir import FILE_SHA256, RunConfig, eval_dir, load_model, read_run_config, weights_epoch
from trainer.train import split_train_val

OPSET = 17
PARITY_RTOL = 1e-4
"""Relative score tolerance of the export parity check and of the bundle's golden gate (fp32)."""
PARITY_ATOL = 1e-4
"""Largest absolute score tolerance; scaled down by the held-out score span when that is below 1."""
MAP_TOL = 1e-4
"""Map tolerance, relative to max(1, the largest |map| value): an absolute bound per bundle."""
N_GOLDEN_NORMAL = 8
N_GOLDEN_ANOMALOUS = 4
GOLDEN_SOURCES_MAX_BYTES = 16 * 1024 * 1024
"""The golden images' source files ride along up to this total (in golden order); larger ones stay behind."""
QUANTILES = (0.5, 0.9, 0.99, 0.995, 0.999)
BATCH = 64


class ExportError(Exception):
    """The export itself failed (exit 1): the exporter or onnx.checker refused the model."""


class ExportParityError(ExportError):
    """The ONNX graph does not reproduce the torch model within tolerance (exit 1); ``parity`` holds the figures."""

    def __init__(self, parity: ExportParity) -> None:
        super().__init__(f"ONNX Runtime does not match the torch model: {parity.summary()}")
        self.parity = parity


@dataclass(frozen=True)
class ExportParity:
    """ONNX Runtime vs torch on the same images.

    ``max_score_abs`` / ``max_map_abs``: largest absolute differences; ``max_score_excess``: the
    largest ``|diff| / (atol + rtol * |expected|)`` (<= 1 passes); ``map_atol``: the map bound used.
    """

    ok: bool
    n: int
    max_score_abs: float
    max_score_rel: float
    max_score_excess: float
    max_map_abs: float
    score_rtol: float
    score_atol: float
    map_atol: float
    reason: str | None = None

    def summary(self) -> str:
        """One line with the figures and the tolerances."""
        head = "ok" if self.ok else f"FAILED ({self.reason})"
        return (
            f"{head}: {self.n} images, max |score diff| {self.max_score_abs:.3g} "
            f"(rel {self.max_score_rel:.3g}; tolerance max({self.score_atol:.3g}, {self.score_rtol:g}*|score|)), "
            f"max |map diff| {self.max_map_abs:.3g} (tolerance {self.map_atol:.3g})"
        )


@dataclass(frozen=True)
class ExportResult:
    """What ``export_run`` produced: the bundle (directory or .tar), its manifest and the parity figures."""

    bundle: Path
    manifest: Manifest
    parity: ExportParity
    seconds: float
    bundle_bytes: int
    signed_by: str | None  # key id, or None when unsigned


def score_tolerance(normal_scores: np.ndarray) -> float:
    """The absolute score tolerance: ``PARITY_ATOL * min(1, span of the held-out normal scores)``, at least 1e-12."""
    finite = np.asarray(normal_scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    span = float(finite.max() - finite.min()) if finite.size else 1.0
    return max(PARITY_ATOL * min(1.0, span), 1e-12)


def map_tolerance(maps: np.ndarray) -> float:
    """The map bound for a set of expected maps: ``MAP_TOL * max(1, max |map|)`` (0 for no maps)."""
    finite = maps[np.isfinite(maps)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    return MAP_TOL * max(1.0, scale)


def compare_outputs(
    expected_scores: np.ndarray,
    expected_maps: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray,
    *,
    score_rtol: float = PARITY_RTOL,
    score_atol: float = PARITY_ATOL,
    map_atol: float | None = None,
) -> ExportParity:
    """Compare a backend's (scores, maps) with the expected ones; see the module docstring for the rule.

    Passes when every ``|s - s_exp| <= max(score_atol, score_rtol * |s_exp|)`` and
    ``max |map - map_exp| <= map_atol`` (default ``map_tolerance(expected_maps)``); fails with a
    reason on a shape mismatch, NaN/inf in either output, or a figure over its bound.
    """
    exp_s = np.asarray(expected_scores, dtype=np.float64)
    exp_m = np.asarray(expected_maps, dtype=np.float64)
    got_s = np.asarray(scores, dtype=np.float64)
    got_m = np.asarray(maps, dtype=np.float64)
    m_atol = map_tolerance(exp_m) if map_atol is None else map_atol
    n = int(exp_s.shape[0]) if exp_s.ndim else 0

    def failed(reason: str, **figures: float) -> ExportParity:
        nan = float("nan")
        return ExportParity(
            ok=False,
            n=n,
            max_score_abs=figures.get("s", nan),
            max_score_rel=figures.get("r", nan),
            max_score_excess=figures.get("e", nan),
            max_map_abs=figures.get("m", nan),
            score_rtol=score_rtol,
            score_atol=score_atol,
            map_atol=m_atol,
            reason=reason,
        )

    if got_s.shape != exp_s.shape:
        return failed(f"score shape {got_s.shape}, expected {exp_s.shape}")
    if got_m.shape != exp_m.shape:
        return failed(f"map shape {got_m.shape}, expected {exp_m.shape}")
    for name, arr in (("expected scores", exp_s), ("scores", got_s), ("expected maps", exp_m), ("maps", got_m)):
        if not np.isfinite(arr).all():
            return failed(f"{name} contain NaN or inf")
    if n == 0:
        return failed("no images to compare")
    ds = np.abs(got_s - exp_s)
    s_abs = float(ds.max())
    s_rel = float((ds / np.maximum(np.abs(exp_s), 1e-30)).max())
    excess = float((ds / np.maximum(score_atol, score_rtol * np.abs(exp_s))).max())
    m_abs = float(np.abs(got_m - exp_m).max()) if exp_m.size else 0.0
    reasons = []
    if excess > 1.0:
        reasons.append("scores differ beyond tolerance")
    if m_abs > m_atol:
        reasons.append("maps differ beyond tolerance")
    return ExportParity(
        ok=not reasons,
        n=n,
        max_score_abs=s_abs,
        max_score_rel=s_rel,
        max_score_excess=excess,
        max_map_abs=m_abs,
        score_rtol=score_rtol,
        score_atol=score_atol,
        map_atol=m_atol,
        reason="; ".join(reasons) or None,
    )


def _labelled_for_metrics(labelled: FolderIndex) -> list[Sample]:
    """The labelled folder's test images that metrics count: those its dataset.json sets aside (ELPV's uncertain
    cells) are neither normal nor anomalous."""
    return [t for t in labelled.test if t.defect not in labelled.report_apart]


def quantile_threshold(normal_scores: np.ndarray, false_alarm_rate: float) -> float:
    """The ``1 - false_alarm_rate`` quantile q (linear interpolation) of held-out normal scores, as a threshold
    for the daemon's rule "alarm when score >= threshold" that alarms exactly the scores above q.

    Where q falls on a held-out score (an integer quantile position: 201 scores at a 0.5% rate), the threshold
    is moved halfway to the next higher score (just above q when there is none), so that score is not an alarm;
    at q itself the daemon would alarm on it too and double the held-out false-alarm rate. Coarse with few
    scores: n scores resolve the rate only to about 1/n.
    """
    s = np.asarray(normal_scores, dtype=np.float64)
    q = float(np.quantile(s, 1.0 - false_alarm_rate))
    if not (s == q).any():
        return q
    above = s[s > q]
    if above.size:
        return float((q + above.min()) / 2.0)
    return q + max(abs(q), float(s.max() - s.min()), 1e-12) * 1e-6


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising F1 with anomalies (label 1) as positives and alarms at score > threshold.

    The threshold lies halfway between the lowest alarmed score and the next lower distinct score
    (below the minimum when everything is alarmed), so it is robust to float round-off. Ties in F1
    go to the higher threshold (fewer alarms).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not y.any() or y.all():
        raise UserError("an F1-optimal threshold needs both normal and anomalous labelled images")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    k = np.arange(1, len(s) + 1)  # alarms if the cut is after position k-1
    f1 = 2 * tp / (k + y.sum())
    # only cut between distinct scores: position k-1 must be strictly above position k
    cut_ok = np.append(s_sorted[:-1] > s_sorted[1:], True)
    f1 = np.where(cut_ok, f1, -1.0)
    best = int(np.argmax(f1))  # first maximum = fewest alarms
    lowest_alarm = s_sorted[best]
    if best + 1 < len(s_sorted):
        threshold = (lowest_alarm + s_sorted[best + 1]) / 2
    else:
        threshold = lowest_alarm - max(1e-6, abs(lowest_alarm) * 1e-6)
    return float(threshold), float(f1[best])


def _golden_sources(samples: list[Sample]) -> dict[str, bytes]:
    """Golden row -> its source file's bytes under ``source_name``, in golden order, while the total stays within
    ``GOLDEN_SOURCES_MAX_BYTES``. UserError when a file cannot be read (it was read moments ago)."""
    out: dict[str, bytes] = {}
    total = 0
    for row, sample in enumerate(samples):
        try:
            data = sample.path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {sample.path}: {exc.strerror or exc}") from None
        total += len(data)
        if total > GOLDEN_SOURCES_MAX_BYTES:
            break
        out[source_name(row, sample.path.suffix)] = data
    return out


def _pick_anomalous(index: FolderIndex, k: int) -> list[Sample]:
    """Up to ``k`` anomalous test samples: defect types in turn, each defect's picks spread over its images."""
    by_defect: dict[str, list[Sample]] = {}
    for s in index.test:
        if s.label == 1:
            by_defect.setdefault(s.defect, []).append(s)
    queues = {d: [items[i] for i in spread_indices(len(items), k)] for d, items in sorted(by_defect.items())}
    picked: list[Sample] = []
    while len(picked) < k and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    return picked


@torch.no_grad()
def torch_outputs(model: Detector, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The torch model's (scores [N], maps [N, 1, H, W]) for float32 [N, C, H, W] in [0, 1], CPU, in batches."""
    model.eval()
    scores, maps = [], []
    for i in range(0, len(x), BATCH):
        s, m = model(torch.from_numpy(x[i : i + BATCH]))
        scores.append(s.float().numpy())
        maps.append(m.float().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def export_onnx(model: Detector, spec: InputSpec, path: Path) -> None:
    """Export ``model.forward`` to ``path`` (legacy exporter, opset 17, dynamic batch only) and check it."""
    import onnx

    example = torch.rand(2, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["score", "map"],
                dynamic_axes={"x": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; report it as the work failing
            raise ExportError(f"ONNX export of model {type(model).__name__} failed: {exc}") from exc
    proto = onnx.load(str(path))
    _fix_graph_io(proto, spec)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX graph does not pass onnx.checker: {exc}") from exc


def _fix_graph_io(proto: Any, spec: InputSpec) -> None:
    """Check the interface x [B,C,H,W] -> score [B], map [B,1,H,W] and pin the declared output shapes.

    The batch axis is named ``batch`` everywhere. The legacy exporter cannot always infer an output's
    static size through shape arithmetic (CBiGAN's patch assembly declares ``map`` as four symbolic
    axes); such symbolic non-batch axes are set to their known sizes, so that consumers (TensorRT,
    the daemon) see fixed H/W. A fixed size that differs, a wrong rank or wrong names is an
    ExportError. The ONNX Runtime parity run then checks the shapes the graph really produces.
    """
    c, h, w = spec.channels, spec.height, spec.width
    want = {"x": [c, h, w], "score": [], "map": [1, h, w]}
    names_in = [v.name for v in proto.graph.input]
    names_out = [v.name for v in proto.graph.output]
    if names_in != ["x"] or names_out != ["score", "map"]:
        raise ExportError(f"the exported ONNX graph has inputs {names_in} and outputs {names_out}, not x -> score, map")
    for v in [*proto.graph.input, *proto.graph.output]:
        rest = want[v.name]
        dims = v.type.tensor_type.shape.dim
        shown = [d.dim_param or d.dim_value for d in dims]
        expected = ["batch", *rest]
        if len(dims) != len(expected) or v.type.tensor_type.elem_type != 1:  # 1 = FLOAT
            raise ExportError(f"the exported ONNX graph's {v.name} is {shown}, expected float32 {expected}")
        for d, size in zip(dims, expected, strict=True):
            if isinstance(size, str):
                if d.HasField("dim_value"):
                    raise ExportError(f"the exported ONNX graph's {v.name} has a fixed batch axis: {shown}")
                d.dim_param = size
            elif d.HasField("dim_value") and d.dim_value != size:
                raise ExportError(f"the exported ONNX graph's {v.name} is {shown}, expected {expected}")
            else:
                d.dim_value = size


def ort_outputs(onnx_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime (CPU) outputs for ``x``, in batches of ``BATCH`` (which also exercises the dynamic batch)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CapabilityError(
            "the export parity check needs onnxruntime (pip install onnxruntime, or the 'daemon' extra)"
        ) from None
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    scores, maps = [], []
    for i in range(0, len(x), BATCH):
        s, m = sess.run(["score", "map"], {"x": x[i : i + BATCH]})
        scores.append(np.asarray(s))
        maps.append(np.asarray(m))
    return np.concatenate(scores), np.concatenate(maps)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} already exists; choose a new path (a bundle is never overwritten)")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new or empty folder")


def _check_private_key(sign_key: Path) -> str:
    """Load the key now (fail before the slow work); returns its key id."""
    try:
        private = load_private_key(sign_key)
    except BundleError as exc:
        raise UserError(f"--sign-key: {exc}") from None
    return key_id(private.public_key())


def _read_metrics(run: Path, checkpoint: str, epoch: int, sha256: str, console: Console) -> dict[str, Any] | None:
    """The eval metrics of exactly these weights (``checkpoint`` saved at ``epoch``, file hash ``sha256``),
    or None when there are none or they evaluate other weights (another checkpoint, an older best
    before a resumed run found a new one, a ``last`` saved again since): a manifest never ships
    metrics of weights it does not hold. Metrics written before eval recorded the checkpoint's hash
    are compared by epoch only."""
    path = eval_dir(run, checkpoint) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path} is not a JSON object")
    # The file's hash decides where eval recorded it (the same file has the same epoch); else the epoch.
    evaluated_sha = metrics.get("checkpoint_sha256")
    stale: str | None = None
    if metrics.get("checkpoint", "best") != checkpoint:
        stale = f"evaluates the {metrics.get('checkpoint')!r} checkpoint, not {checkpoint!r}"
    elif evaluated_sha is not None and evaluated_sha != sha256:
        stale = (
            f"evaluates other weights than the {checkpoint} checkpoint now holds (the file changed since: "
            "the run went on)"
        )
    elif evaluated_sha is None and metrics.get("epoch") != epoch:
        stale = (
            f"evaluates the {checkpoint} checkpoint of epoch {metrics.get('epoch')}, but it is now the one of "
            f"epoch {epoch} (the run went on)"
        )
    if stale is not None:
        console.print(
            f"note: {path} {stale}: metrics left out of the manifest (run edge-trainer eval --checkpoint "
            f"{checkpoint} to include them)",
            highlight=False,
        )
        return None
    return metrics


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _scratch(near: Path) -> Iterator[Path]:
    """A temporary folder beside ``near`` (same filesystem), removed afterwards."""
    try:
        near.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.export-", dir=near.parent))
    except OSError as exc:
        raise UserError(f"cannot write beside --out {near}: {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_held_out(
    cfg: RunConfig, index: FolderIndex, spec: InputSpec, digests: list[tuple[str, str]]
) -> tuple[list[Sample], np.ndarray]:
    """The run's held-out images (``digests``: ``file_digests`` of ``index.train``), checked against the run."""
    n = len(index.train)
    if n != cfg.n_train + cfg.n_val:
        raise UserError(
            f"the run's data {cfg.data} changed since training: train/good holds {n} images, the run used "
            f"{cfg.n_train + cfg.n_val}; the held-out split cannot be reproduced"
        )
    _, va_idx = split_train_val(n, cfg.val_fraction, cfg.seed)
    held = [index.train[i] for i in va_idx]
    if cfg.held_out_digest and combined_digest([digests[i] for i in va_idx]) != cfg.held_out_digest:
        raise UserError(
            f"the run's data {cfg.data} changed since training: train/good still holds {n} images, but not the "
            "same ones (a file replaced, renamed or edited), so the held-out split would now pick images the "
            "model may have trained on; export a run trained on the data as it is now"
        )
    return held, load_images(held, spec)


MAX_HELD_OUT_ALARMS = 0.1
"""An F1 threshold (``--labelled-val``) that alarms on more than this share of the held-out normal images is refused
(unless forced): tuned on a few labelled images, it can fall below the normal scores and alarm on most good parts."""


def _calibrate(
    model: Detector,
    held_scores: np.ndarray,
    n_held: int,
    val_fraction: float,
    spec: InputSpec,
    false_alarm_rate: float,
    labelled: FolderIndex | None,
    data: Path,
    console: Console,
    force: bool = False,
) -> Calibration:
    """The bundle's calibration (module docstring, step 4). UserError, unless ``force``, for a threshold that the
    held-out normal images show, or cannot rule out, to alarm far too often (``trainer.calibration_floor``,
    ``MAX_HELD_OUT_ALARMS``)."""
    s = held_scores.astype(np.float64)
    if not s.max() > s.min():  # every normalised score would be clamped to 0 or 1 around one value
        raise UserError(
            f"the {n_held} held-out normal image(s) all score {s[0]:.6g}: calibration needs a spread of normal "
            f"scores; put more images in train/good (the run holds out {val_fraction:.0%} of them) and train again"
        )
    quantiles = {f"{q:g}": float(np.quantile(s, q)) for q in QUANTILES}
    held_text = f"held-out {val_fraction:.0%} of train/good ({n_held} images, the run's validation split)"
    if labelled is None:
        if too_few(n_held, false_alarm_rate) and not force:
            resolved, need = resolvable_rate(n_held), images_needed(false_alarm_rate, val_fraction)
            raise UserError(
                f"only {n_held} held-out normal image(s): a threshold set on them alarms on about 1 in {n_held + 1} "
                f"good parts ({resolved:.1%}), over {COARSE_FACTOR:g} times the --false-alarm-rate "
                f"{false_alarm_rate:g}; "
                f"put at least {need} images in train/good (the run holds out {val_fraction:.0%}) and train again, or "
                "pass --force-threshold to export it anyway"
            )
        threshold = quantile_threshold(s, false_alarm_rate)
        return Calibration(
            method="quantile",
            target_false_alarm_rate=false_alarm_rate,
            threshold=threshold,
            raw_min=float(s.min()),
            raw_max=float(s.max()),
            quantiles=quantiles,
            n_images=n_held,
            source=held_text,
        )
    counted = _labelled_for_metrics(labelled)
    labels = np.array([t.label for t in counted])
    own_test = labelled.root.resolve() == Path(data).resolve()
    if own_test:
        console.print(
            f"[yellow]warning:[/] --labelled-val {labelled.root} is the run's own data: the threshold is tuned on "
            "the test images eval reports on, so its F1 here, and any check of it on those images, overstate how "
            "it does on new parts; a labelled folder of other images avoids that",
            highlight=False,
        )
    console.print(f"scoring {len(counted)} labelled images of {labelled.root}/test for the F1 threshold")
    x = to_float(load_images(counted, spec))
    val_scores, _ = torch_outputs(model, x)
    threshold, f1 = f1_optimal_threshold(val_scores, labels)
    held_alarms = float(np.mean(s >= threshold))
    if held_alarms > MAX_HELD_OUT_ALARMS and not force:
        raise UserError(
            f"the F1 threshold {threshold:.6g} from {labelled.root}/test alarms on {held_alarms:.0%} of the run's "
            f"{n_held} held-out normal images (held-out scores {s.min():.6g} to {s.max():.6g}): it would reject good "
            "parts on the line; use more labelled images, drop --labelled-val (quantile threshold), or pass "
            "--force-threshold to export it anyway"
        )
    n_anom = int(labels.sum())
    own_note = "; the run's own test split: F1 measured where it was tuned" if own_test else ""
    return Calibration(
        method="f1",
        target_false_alarm_rate=None,
        threshold=threshold,
        raw_min=float(s.min()),
        raw_max=float(s.max()),
        quantiles=quantiles,
        n_images=n_held,
        source=(
            f"threshold: F1-optimal (F1 {f1:.4f}) on {labelled.root}/test ({len(labels) - n_anom} normal, "
            f"{n_anom} anomalous{own_note}; it alarms on {held_alarms:.1%} of the held-out normal images); raw range "
            f"and quantiles: {held_text}"
        ),
    )


def export_run(
    run: Path,
    out: Path,
    *,
    sign_key: Path | None = None,
    checkpoint: str = "best",
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    labelled_val: Path | None = None,
    tar: bool = False,
    force_threshold: bool = False,
    console: Console | None = None,
) -> ExportResult:
    """Export ``run`` as a bundle at ``out``; see the module docstring.

    ``out`` is the bundle folder (new, or empty); with ``tar`` (or when ``out`` ends in ``.tar``) it
    is a new ``.tar`` file holding the folder's contents. ``sign_key`` is an Ed25519 private key
    (``edge-deploy keygen``); without it the bundle is unsigned and ``verify`` says so. ``force_threshold``
    exports a threshold the held-out normal images cannot vouch for (``_calibrate``) instead of refusing it.
    Raises UserError (exit 2) for bad input, ExportError / ExportParityError (exit 1) when the model
    cannot be exported faithfully.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    run, out = Path(run), Path(out)
    tar = tar or out.suffix == ".tar"
    if tar and out.suffix != ".tar":
        raise UserError(f"--tar writes one file: give --out a name ending in .tar, not {out}")
    if not 0.0 < false_alarm_rate < 1.0:
        raise UserError(f"--false-alarm-rate must be between 0 and 1 (exclusive), not {false_alarm_rate}")
    cfg = read_run_config(run)
    _check_out(out)
    signer = _check_private_key(sign_key) if sign_key is not None else None
    labelled = scan_folder(labelled_val, need_test=True) if labelled_val is not None else None
    if labelled is not None and not any(t.label for t in _labelled_for_metrics(labelled)):
        apart = f" (besides {', '.join(sorted(labelled.report_apart))}, set aside by its dataset.json)"
        raise UserError(
            f"--labelled-val {labelled_val} has no anomalous images in test/<defect>/"
            + (apart if labelled.report_apart else "")
        )
    model, ckpt = load_model(run, checkpoint, "cpu")
    mc = model.config
    spec = InputSpec(mc.image_size, mc.image_size, mc.channels)
    data = Path(cfg.data)
    index = scan_folder(data, need_test=False)
    epoch = weights_epoch(ckpt)
    metrics = _read_metrics(run, checkpoint, epoch, ckpt[FILE_SHA256], console)

    # Held-out normal images (the run's validation split) and the golden anomalous ones.
    digests = file_digests(data, index.train)  # each image read and hashed once: held-out check and data_digest
    held, held_u8 = _load_held_out(cfg, index, spec, digests)
    anomalous = _pick_anomalous(index, N_GOLDEN_ANOMALOUS)
    anom_u8 = load_images(anomalous, spec) if anomalous else held_u8[:0]
    x_all = to_float(np.concatenate([held_u8, anom_u8]))  # the daemon's own conversion: golden = what it feeds
    console.print(
        f"exporting {cfg.model} ({checkpoint} checkpoint, epoch {epoch}) from {run}: "
        f"{len(held)} held-out normal + {len(anomalous)} anomalous images at "
        f"{spec.height}x{spec.width}x{spec.channels}",
        highlight=False,
    )
    t_scores, t_maps = torch_outputs(model, x_all)
    n_held = len(held)

    with _scratch(out) as scratch:
        onnx_path = scratch / "model.onnx"
        export_onnx(model, spec, onnx_path)
        o_scores, o_maps = ort_outputs(onnx_path, x_all)
        parity = compare_outputs(t_scores, t_maps, o_scores, o_maps, score_atol=score_tolerance(t_scores[:n_held]))
        console.print(f"ONNX Runtime vs torch: {parity.summary()}", highlight=False)
        if not parity.ok:
            raise ExportParityError(parity)

        calibration = _calibrate(
            model,
            t_scores[:n_held],
            n_held,
            cfg.val_fraction,
            spec,
            false_alarm_rate,
            labelled,
            data,
            console,
            force=force_threshold,
        )

        g_norm = spread_indices(n_held, N_GOLDEN_NORMAL)
        g_idx = g_norm + list(range(n_held, len(x_all)))
        labels = [0] * len(g_norm) + [1] * len(anomalous)
        created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        manifest = Manifest(
            model={
                "name": cfg.model,
                "revision": cfg.model_revision,  # which fix level of the model's code trained it
                "version": f"{run.resolve().name}-{created.date().isoformat()}",
                "config": dict(cfg.model_config_values),
            },
            created=created.isoformat().replace("+00:00", "Z"),
            input=InputSpecModel(height=spec.height, width=spec.width, channels=mc.channels, colour_order="RGB"),
            outputs={
                "score": {"shape": ["B"], "dtype": "float32"},
                "map": {"shape": ["B", 1, spec.height, spec.width], "dtype": "float32"},
            },
            calibration=calibration,
            metrics=metrics,
            training={
                "data": cfg.data,
                "data_digest": combined_digest(digests),
                "n_train": cfg.n_train,
                "n_val": cfg.n_val,
                "epochs": cfg.epochs,
                "seed": cfg.seed,
                "checkpoint": checkpoint,
                "checkpoint_epoch": epoch,
            },
            golden=GoldenSpec(
                n=len(g_idx),
                labels=labels,
                score_rtol=PARITY_RTOL,
                score_atol=parity.score_atol,
                map_atol=parity.map_atol,
            ),
            files={},
        )
        files: dict[str, Path | bytes] = {
            "model.onnx": onnx_path,
            "golden/inputs.npy": _npy_bytes(np.ascontiguousarray(x_all[g_idx], dtype=np.float32)),
            "golden/scores.npy": _npy_bytes(np.ascontiguousarray(t_scores[g_idx], dtype=np.float32)),
            "golden/maps.npy": _npy_bytes(np.ascontiguousarray(t_maps[g_idx], dtype=np.float32)),
        }
        sources = _golden_sources([held[i] for i in g_norm] + anomalous)
        files.update(sources)
        bundle_dir = scratch / "bundle" if tar else out
        try:
            manifest = write_bundle(bundle_dir, manifest, files, sign_key)
            if tar:
                pack_tar(bundle_dir, out)  # atomic (temp file + rename)
        except BundleError as exc:
            raise UserError(str(exc)) from None
        sizes = {name: (bundle_dir / name).stat().st_size for name in ("manifest.json", *sorted(manifest.files))}
        if (bundle_dir / "signature").is_file():
            sizes["signature"] = (bundle_dir / "signature").stat().st_size
        total = out.stat().st_size if tar else _dir_bytes(out)

    seconds = time.perf_counter() - t0
    _print_summary(console, out, manifest, parity, sizes, total, signer, seconds)
    return ExportResult(
        bundle=out, manifest=manifest, parity=parity, seconds=seconds, bundle_bytes=total, signed_by=signer
    )


def _print_summary(
    console: Console,
    out: Path,
    manifest: Manifest,
    parity: ExportParity,
    sizes: dict[str, int],
    total: int,
    signer: str | None,
    seconds: float,
) -> None:
    cal = manifest.calibration
    lines = [f"bundle {out} ({total:,} bytes, {seconds:.1f} s):"]
    n_sources = len(golden_sources(manifest))
    shown: dict[str, int] = {}
    for name, size in sizes.items():  # the golden source files add up to one line
        key = f"{GOLDEN_SOURCES}/ ({n_sources} files)" if name.startswith(GOLDEN_SOURCES) else name
        shown[key] = shown.get(key, 0) + size
    lines += [f"  {name:<26} {size:>12,} bytes" for name, size in shown.items()]
    if cal.method == "quantile":
        how = f"{1 - (cal.target_false_alarm_rate or 0):g} quantile of {cal.n_images} held-out normal scores"
        if cal.n_images < 200:
            how += f" (coarse: {cal.n_images} images resolve the rate only to ~{1 / cal.n_images:.2g})"
        lines.append(f"  threshold {cal.threshold:.6g} = {how}")
    else:
        lines.append(f"  threshold {cal.threshold:.6g}: {cal.source.removeprefix('threshold: ')}")
    lines.append(f"  held-out normal scores: range [{cal.raw_min:.6g}, {cal.raw_max:.6g}], n = {cal.n_images}")
    lines.append(f"  golden {manifest.golden.n} images (labels {manifest.golden.labels}); parity {parity.summary()}")
    if n_sources < manifest.golden.n:
        lines.append(
            f"  golden source files: {n_sources} of {manifest.golden.n} carried (the rest are over "
            f"{GOLDEN_SOURCES_MAX_BYTES // 2**20} MiB in all): a device checks its preprocessing on those only"
        )
    lines.append(f"  signed by key {signer}" if signer else "  UNSIGNED (pass --sign-key, or edge-deploy sign later)")
    console.print("\n".join(lines), highlight=False)
