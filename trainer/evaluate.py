"""Evaluation of one-class anomaly detectors: image and pixel metrics, ROC plots, extreme-case grids.

Pure numpy / scikit-learn / matplotlib: this module never imports torch, so that results can be
re-scored and re-plotted on any machine from saved score arrays.

Conventions used throughout:

- A *score* is a raw model score, higher = more anomalous, in whatever units the model produces
  (no normalisation is applied here; AUROC is invariant to monotone transforms anyway).
- A *label* is 0 for a normal test image, 1 for an anomalous one.
- A *defect* names the test sub-folder of an image: ``"good"`` for normal images, the defect type
  (``"crack"``, ``"pitting"``, ...) for anomalous ones, as in the MVTec AD layout.
- A sample is called anomalous at threshold ``t`` when ``score >= t`` (scikit-learn's convention in
  :func:`sklearn.metrics.roc_curve`).

The ``threshold`` that :func:`image_metrics` returns is chosen *on the test set* (it is the oracle
threshold that achieves the maximum balanced accuracy). It is a reporting figure only and must never
ship in a bundle: deployed thresholds are calibrated on held-out normal images (MODELS.md, "Scores,
thresholds, and what ships").

Plots are drawn with matplotlib's object-oriented API on an Agg canvas (``FigureCanvasAgg``), so they
never touch pyplot's global state or the process-wide backend and work without a display.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "MAX_PIXELS",
    "PIXEL_SUBSAMPLE_SEED",
    "image_metrics",
    "pixel_auroc",
    "save_extremes_grid",
    "save_roc_plot",
]

#: Above this many pixels, :func:`pixel_auroc` scores a deterministic random subsample of this size.
MAX_PIXELS: int = 20_000_000
#: Seed of the generator that draws that subsample (fixed: the same inputs always give the same value).
PIXEL_SUBSAMPLE_SEED: int = 0

GOOD = "good"


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _scores_1d(scores: Any, name: str = "scores") -> NDArray[np.float64]:
    """Return ``scores`` as a finite float64 vector [N]; ValueError on another shape or NaN/inf."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array [N], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return arr


def _labels_1d(labels: Any, n: int) -> NDArray[np.int64]:
    """Return ``labels`` as an int64 vector [n] of 0/1; ValueError on another shape or value."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be a 1-D array of length {n} (one per score), got shape {arr.shape}")
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers 0 (normal) / 1 (anomalous), got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    bad = np.setdiff1d(np.unique(out), [0, 1])
    if bad.size:
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), found {bad.tolist()}")
    return out


def _require_both_classes(labels: NDArray[np.int64], what: str) -> None:
    """Raise ValueError when ``labels`` lacks normal (0) or anomalous (1) samples."""
    n_anom = int(labels.sum())
    n_norm = int(labels.size - n_anom)
    need = "AUROC needs both normal and anomalous samples"
    if n_norm == 0:
        raise ValueError(f"{what}: no normal samples (label 0); {need}")
    if n_anom == 0:
        raise ValueError(f"{what}: no anomalous samples (label 1); {need}")


def _max_balanced_accuracy(scores: NDArray[np.float64], labels: NDArray[np.int64]) -> tuple[float, float]:
    """Return ``(max balanced accuracy, threshold)`` over the ROC thresholds of ``scores``.

    Balanced accuracy at threshold t is (TPR + TNR) / 2 with "anomalous" meaning ``score >= t``.
    Candidates are the distinct score values (``roc_curve(..., drop_intermediate=False)``); the
    curve's leading ``+inf`` threshold (nothing anomalous, balanced accuracy 0.5) is skipped because the
    lowest score (everything anomalous) gives the same 0.5, so the maximum is unchanged and the
    threshold stays a finite, JSON-safe number. Ties go to the highest threshold (first on the curve).
    """
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    balanced = (tpr[finite] + (1.0 - fpr[finite])) / 2.0
    best = int(np.argmax(balanced))
    return float(balanced[best]), float(thresholds[finite][best])


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def image_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    defects: Sequence[str],
    report_apart: Collection[str] = (),
) -> dict[str, Any]:
    """Image-level metrics of one detector on one labelled test set.

    Args:
        scores: float [N], raw anomaly scores (higher = more anomalous); must be finite.
        labels: int or bool [N], 0 = normal, 1 = anomalous.
        defects: N names: ``"good"`` exactly for the label-0 samples, a defect name for the others.
        report_apart: defect names whose samples are left out of the overall figures but still get a
            per-defect AUROC (e.g. ELPV's ambiguous probability-1/3 cells). ``"good"`` is not allowed.
            Names that do not occur are ignored.

    Returns:
        A JSON-serialisable dict:

        - ``"auroc"``: float, ``sklearn.metrics.roc_auc_score`` over the normal samples and the
          anomalous samples whose defect is not in ``report_apart`` (ties count one half).
        - ``"max_balanced_accuracy"``: float in [0.5, 1], the maximum over the ROC thresholds of
          (TPR + TNR) / 2 on that same set.
        - ``"threshold"``: float, a score value achieving it (a sample is anomalous when
          ``score >= threshold``; the highest such value on ties). Chosen on the test set: a
          reporting figure, never a deployment threshold.
        - ``"per_defect_auroc"``: ``{defect: AUROC of the normal samples vs that defect's samples}``
          for every defect present, those in ``report_apart`` included; keys sorted.
        - ``"n_normal"``, ``"n_anomalous"`` (excluding ``report_apart``), ``"n_report_apart"``: ints.

    Raises:
        ValueError: mismatched lengths, labels other than 0/1, non-finite scores, a label that
            disagrees with its defect name, or no normal / no anomalous sample in the overall set.
    """
    s = _scores_1d(scores)
    n = s.shape[0]
    y = _labels_1d(labels, n)
    d = np.asarray([str(x) for x in defects], dtype=object)
    if d.shape != (n,):
        raise ValueError(f"defects must name every sample: got {len(d)} names for {n} scores")
    apart = {str(x) for x in report_apart}
    if GOOD in apart:
        raise ValueError('report_apart cannot contain "good": normal samples are always in the overall set')

    is_good = d == GOOD
    mislabelled = np.flatnonzero(is_good != (y == 0))
    if mislabelled.size:
        i = int(mislabelled[0])
        raise ValueError(
            f"{mislabelled.size} sample(s) whose label disagrees with their defect name "
            f'(label 0 <=> defect "good"); first: index {i}, label {int(y[i])}, defect {d[i]!r}'
        )

    in_apart = np.isin(d, list(apart)) if apart else np.zeros(n, dtype=bool)
    overall = ~in_apart
    y_all, s_all = y[overall], s[overall]
    _require_both_classes(y_all, "image_metrics (report_apart excluded)")

    auroc = float(roc_auc_score(y_all, s_all))
    mba, threshold = _max_balanced_accuracy(s_all, y_all)

    per_defect: dict[str, float] = {}
    for name in sorted(set(d[~is_good].tolist())):
        sel = is_good | (d == name)
        per_defect[name] = float(roc_auc_score(y[sel], s[sel]))

    return {
        "auroc": auroc,
        "max_balanced_accuracy": mba,
        "threshold": threshold,
        "per_defect_auroc": per_defect,
        "n_normal": int(np.count_nonzero(y_all == 0)),
        "n_anomalous": int(np.count_nonzero(y_all == 1)),
        "n_report_apart": int(np.count_nonzero(in_apart)),
    }


def _squeeze_channel(a: np.ndarray, name: str) -> np.ndarray:
    """Return ``a`` as [N,H,W], accepting [N,1,H,W]; ValueError for any other shape."""
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be [N,H,W] or [N,1,H,W], got shape {a.shape}")
    return a


def _bernoulli_keep(n: int, p: float, rng: np.random.Generator, chunk: int = 1 << 22) -> NDArray[np.bool_]:
    """Boolean mask [n] keeping each position independently with probability ``p`` (drawn in chunks)."""
    keep = np.empty(n, dtype=bool)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        keep[start:stop] = rng.random(stop - start, dtype=np.float32) < p
    return keep


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level AUROC of anomaly maps against ground-truth defect masks (MVTec AD protocol).

    Every pixel of every given image counts: pass the good test images too, whose all-false masks
    contribute only negative pixels, as in MVTec AD. Maps and masks must already have the same
    resolution (resize the maps to the masks, or the masks to the maps, before calling).

    Subsampling: when there are more than :data:`MAX_PIXELS` (20 million) pixels, the AUROC is computed
    on a stratified random subsample of about that many pixels, drawn by a generator seeded with
    :data:`PIXEL_SUBSAMPLE_SEED` (same inputs -> same value): all anomalous pixels are kept if they are
    at most half the budget (else each is kept with probability (budget / 2) / n_anomalous), and each
    normal pixel is kept with probability (budget - anomalous kept) / n_normal. AUROC does not depend on
    the class ratio, so this is an unbiased estimate; with millions of pixels of each class its
    standard error is far below the 3 decimals reported.

    Args:
        maps: float [N,H,W] or [N,1,H,W], anomaly maps (higher = more anomalous); must be finite.
        masks: bool [N,H,W] or [N,1,H,W] (integer 0/1 accepted), True = defective pixel.

    Returns:
        The AUROC as a float in [0, 1].

    Raises:
        ValueError: shape mismatch, non-finite map values, masks that are not boolean, or masks with
            no positive (or no negative) pixel.
    """
    m = _squeeze_channel(np.asarray(maps), "maps")
    g = _squeeze_channel(np.asarray(masks), "masks")
    if m.shape != g.shape:
        raise ValueError(f"maps {m.shape} and masks {g.shape} must have the same [N,H,W] shape")
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
        raise ValueError(f"maps must be numeric, got dtype {m.dtype}")
    if g.dtype != np.bool_:
        if not np.issubdtype(g.dtype, np.integer) or np.setdiff1d(np.unique(g), [0, 1]).size:
            raise ValueError(
                f"masks must be boolean (or integer 0/1), got dtype {g.dtype}; "
                "binarise 0/255 mask images first (mask > 127)"
            )
        g = g.astype(bool)
    flat_m = m.reshape(-1)
    flat_g = g.reshape(-1)
    if not np.all(np.isfinite(flat_m)):
        raise ValueError("maps contain non-finite values (NaN or inf)")
    n = flat_g.size
    n_pos = int(np.count_nonzero(flat_g))
    if n_pos == 0:
        raise ValueError("masks contain no positive (defective) pixel: pixel AUROC is undefined")
    if n_pos == n:
        raise ValueError("masks contain no negative (normal) pixel: pixel AUROC is undefined")

    if n <= MAX_PIXELS:
        return float(roc_auc_score(flat_g, flat_m))

    rng = np.random.default_rng(PIXEL_SUBSAMPLE_SEED)
    pos_vals = flat_m[flat_g]
    neg_vals = flat_m[~flat_g]
    p_pos = min(1.0, (MAX_PIXELS / 2) / n_pos)
    if p_pos < 1.0:
        pos_vals = pos_vals[_bernoulli_keep(pos_vals.size, p_pos, rng)]
    p_neg = min(1.0, (MAX_PIXELS - pos_vals.size) / neg_vals.size)
    if p_neg < 1.0:
        neg_vals = neg_vals[_bernoulli_keep(neg_vals.size, p_neg, rng)]
    y = np.concatenate([np.ones(pos_vals.size, dtype=bool), np.zeros(neg_vals.size, dtype=bool)])
    return float(roc_auc_score(y, np.concatenate([pos_vals, neg_vals])))


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float, dpi: int) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: ROC figure size: 6 x 5 inches at 100 dpi, i.e. a PNG 600 px wide and 500 px high.
ROC_FIGSIZE_IN: tuple[float, float] = (6.0, 5.0)
PLOT_DPI: int = 100


def save_roc_plot(scores: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    """Write the ROC curve of ``scores`` against ``labels`` as a PNG.

    The legend gives the AUROC (3 decimals); the point of maximum balanced accuracy is marked, and the
    chance diagonal is drawn. The image is 600 x 500 px (width x height). Parent folders are created.

    Args:
        scores: float [N], higher = more anomalous (finite).
        labels: int [N], 0 normal / 1 anomalous; both classes must be present.
        path: the PNG file to write (overwritten).
        title: the figure title.

    Raises:
        ValueError: as :func:`image_metrics` for bad arrays or a missing class.
    """
    s = _scores_1d(scores)
    y = _labels_1d(labels, s.shape[0])
    _require_both_classes(y, "save_roc_plot")
    fpr, tpr, _ = roc_curve(y, s)
    auroc = float(roc_auc_score(y, s))
    mba, threshold = _max_balanced_accuracy(s, y)
    pred = s >= threshold
    tpr_b = float(np.count_nonzero(pred & (y == 1)) / np.count_nonzero(y == 1))
    fpr_b = float(np.count_nonzero(pred & (y == 0)) / np.count_nonzero(y == 0))

    fig = _new_figure(*ROC_FIGSIZE_IN, PLOT_DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"AUROC {auroc:.3f}  (n={y.size})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.plot([fpr_b], [tpr_b], "o", color="tab:red", label=f"max balanced acc. {mba:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (normal images flagged)")
    ax.set_ylabel("true positive rate (anomalies caught)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _image_hwc(img: np.ndarray) -> np.ndarray:
    """[C,H,W] uint8 (C 1 or 3) -> [H,W] or [H,W,3] for imshow."""
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def save_extremes_grid(
    images: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    defects: Sequence[str],
    path: Path,
    k: int = 6,
) -> None:
    """Write one PNG with the most and the least anomalous test images and their anomaly maps.

    Layout: up to four rows of ``max(n_top, n_bottom)`` columns: the ``n_top`` highest-scoring images
    (descending score), then the same images with their anomaly map overlaid (jet colour map,
    alpha 0.5), then the ``n_bottom`` lowest-scoring images (ascending score) and their overlays.
    ``n_top = min(k, ceil(N / 2))`` and ``n_bottom = min(k, N - n_top)``: with N >= 2k that is k of each;
    with fewer images they are split between both ends so that no image appears twice (N = 1 gives
    only the top rows). Each image panel is titled with its index in the arrays, its score and
    "normal" or "anomalous (defect)". All overlays share one colour scale (min..max of the maps shown,
    with a colour bar), so map intensities are comparable across panels. Maps may have another
    resolution than the images: both are stretched over the same extent. Parent folders are created.

    Args:
        images: uint8 [N,C,H,W], C = 1 (grey) or 3 (RGB).
        maps: float [N,1,h,w] (or [N,h,w]), anomaly maps, higher = more anomalous.
        scores: float [N], image scores (higher = more anomalous); ties keep array order.
        labels: int [N], 0 normal / 1 anomalous.
        defects: N names (``"good"`` for normal images).
        path: the PNG file to write (overwritten).
        k: how many images at each end, >= 1.

    Raises:
        ValueError: empty input, mismatched lengths or shapes, a wrong dtype, or ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N,C,H,W] with C 1 or 3, got shape {imgs.shape}")
    if imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {imgs.dtype}")
    n = imgs.shape[0]
    if n == 0:
        raise ValueError("save_extremes_grid needs at least one image")
    amaps = _squeeze_channel(np.asarray(maps, dtype=np.float32), "maps")
    if amaps.shape[0] != n:
        raise ValueError(f"maps has {amaps.shape[0]} entries for {n} images")
    s = _scores_1d(scores)
    if s.shape[0] != n:
        raise ValueError(f"scores has {s.shape[0]} entries for {n} images")
    y = _labels_1d(labels, n)
    names = [str(x) for x in defects]
    if len(names) != n:
        raise ValueError(f"defects has {len(names)} entries for {n} images")

    order = np.argsort(s, kind="stable")  # ascending
    n_top = min(k, math.ceil(n / 2))
    n_bottom = min(k, n - n_top)
    top = order[::-1][:n_top]
    bottom = order[:n_bottom]
    groups = [("most anomalous", top)] + ([("least anomalous", bottom)] if n_bottom else [])
    shown = np.concatenate([top, bottom])
    vmin = float(np.min(amaps[shown]))
    vmax = float(np.max(amaps[shown]))
    if vmax <= vmin:
        vmax = vmin + 1e-12

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n_cols = max(n_top, n_bottom)
    n_rows = 2 * len(groups)
    h, w = imgs.shape[2], imgs.shape[3]
    panel_w = 2.0
    panel_h = panel_w * h / w + 0.45  # room for a two-line title
    fig = _new_figure(panel_w * n_cols + 0.9, panel_h * n_rows, PLOT_DPI)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    norm = Normalize(vmin=vmin, vmax=vmax)
    cmap = colormaps["jet"]
    extent = (0.0, float(w), float(h), 0.0)
    for g, (group_name, idx) in enumerate(groups):
        for col in range(n_cols):
            ax_img, ax_map = axes[2 * g, col], axes[2 * g + 1, col]
            for ax in (ax_img, ax_map):
                ax.set_xticks([])
                ax.set_yticks([])
            if col >= len(idx):
                ax_img.set_axis_off()
                ax_map.set_axis_off()
                continue
            i = int(idx[col])
            pic = _image_hwc(imgs[i])
            grey = pic.ndim == 2
            for ax in (ax_img, ax_map):
                ax.imshow(
                    pic,
                    cmap="gray" if grey else None,
                    vmin=0,
                    vmax=255,
                    extent=extent,
                    interpolation="nearest",
                )
            ax_map.imshow(amaps[i], cmap=cmap, norm=norm, alpha=0.5, extent=extent, interpolation="bilinear")
            what = "normal" if y[i] == 0 else f"anomalous ({names[i]})"
            ax_img.set_title(f"#{i}  score {s[i]:.4g}\n{what}", fontsize=7)
            if col == 0:
                ax_img.set_ylabel(f"{group_name}\nimage", fontsize=8)
                ax_map.set_ylabel(f"{group_name}\nanomaly map", fontsize=8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), shrink=0.6, label="anomaly map value")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
