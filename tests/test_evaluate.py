"""Unit tests of trainer.evaluate: the metric arithmetic on constructed arrays, and the plot files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from trainer import evaluate
from trainer.evaluate import image_metrics, pixel_auroc, save_extremes_grid, save_roc_plot

REPO = Path(__file__).resolve().parents[1]


def _brute_force_mba(scores: np.ndarray, labels: np.ndarray) -> float:
    """Max over every distinct score used as threshold of (TPR + TNR) / 2, by counting."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tpr = np.mean(pred[labels == 1])
        tnr = np.mean(~pred[labels == 0])
        best = max(best, (tpr + tnr) / 2)
    return float(best)


# ---------------------------------------------------------------------------------------------- image


def test_perfect_separation() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = image_metrics(scores, labels, ["good"] * 3 + ["crack"] * 3)
    assert m["auroc"] == 1.0
    assert m["max_balanced_accuracy"] == 1.0
    # The highest threshold that separates perfectly is the lowest anomalous score.
    assert m["threshold"] == 0.7
    assert m["per_defect_auroc"] == {"crack": 1.0}
    assert (m["n_normal"], m["n_anomalous"], m["n_report_apart"]) == (3, 3, 0)


def test_reversed_scores() -> None:
    scores = np.array([0.9, 0.8, 0.2, 0.1])
    labels = np.array([0, 0, 1, 1])
    m = image_metrics(scores, labels, ["good", "good", "hole", "hole"])
    assert m["auroc"] == 0.0
    # No threshold does better than flagging everything (or nothing): 0.5.
    assert m["max_balanced_accuracy"] == 0.5
    assert np.isfinite(m["threshold"])


def test_ties_by_hand() -> None:
    # normal 0.1, 0.5; anomalous 0.5, 0.9. Pairs: 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    labels = np.array([0, 0, 1, 1])
    m = image_metrics(scores, labels, ["good", "good", "a", "a"])
    assert m["auroc"] == pytest.approx(0.875)
    # t = 0.9: TPR 1/2, TNR 1 -> 0.75; t = 0.5: TPR 1, TNR 1/2 -> 0.75; highest threshold wins ties.
    assert m["max_balanced_accuracy"] == pytest.approx(0.75)
    assert m["threshold"] == 0.9


def test_all_scores_equal() -> None:
    m = image_metrics(np.ones(6), np.array([0, 0, 0, 1, 1, 1]), ["good"] * 3 + ["x"] * 3)
    assert m["auroc"] == 0.5
    assert m["max_balanced_accuracy"] == 0.5
    assert m["threshold"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_and_threshold_achieves_reported_accuracy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    labels = (rng.random(n) < 0.4).astype(int)
    # Rounded scores: plenty of ties; anomalies shifted up a little.
    scores = np.round(rng.normal(size=n) + 0.8 * labels, 1).astype(np.float32)
    defects = np.where(labels == 1, np.where(rng.random(n) < 0.5, "scratch", "dent"), "good").tolist()
    m = image_metrics(scores, labels, defects)

    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["max_balanced_accuracy"] == pytest.approx(_brute_force_mba(scores, labels), abs=1e-12)
    pred = (scores >= m["threshold"]).astype(int)
    assert balanced_accuracy_score(labels, pred) == pytest.approx(m["max_balanced_accuracy"], abs=1e-12)
    for name in ("scratch", "dent"):
        sel = (labels == 0) | (np.asarray(defects) == name)
        assert m["per_defect_auroc"][name] == pytest.approx(roc_auc_score(labels[sel], scores[sel]))
    # JSON-safe: plain Python types, no inf/NaN.
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_report_apart_excluded_from_overall_but_in_per_defect() -> None:
    # "p13" (ambiguous cells) score lower than every normal: included, they would drag AUROC down.
    scores = np.array([0.2, 0.3, 0.4, 0.8, 0.9, 0.0, 0.1])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    defects = ["good", "good", "good", "crack", "crack", "p13", "p13"]
    m = image_metrics(scores, labels, defects, report_apart=["p13"])
    assert m["auroc"] == 1.0
    assert m["max_balanced_accuracy"] == 1.0
    assert m["per_defect_auroc"] == {"crack": 1.0, "p13": 0.0}
    assert (m["n_normal"], m["n_anomalous"], m["n_report_apart"]) == (3, 2, 2)
    # Without report_apart they count: 2 of the 4 anomalies are below every normal.
    together = image_metrics(scores, labels, defects)
    assert together["auroc"] == pytest.approx(0.5)
    assert together["n_report_apart"] == 0


def test_no_normal_or_no_anomalous_raises() -> None:
    with pytest.raises(ValueError, match="no normal"):
        image_metrics(np.array([0.1, 0.2]), np.array([1, 1]), ["a", "a"])
    with pytest.raises(ValueError, match="no anomalous"):
        image_metrics(np.array([0.1, 0.2]), np.array([0, 0]), ["good", "good"])
    # Every anomaly reported apart leaves none in the overall set.
    with pytest.raises(ValueError, match="no anomalous"):
        image_metrics(np.array([0.1, 0.2]), np.array([0, 1]), ["good", "p13"], report_apart={"p13"})


@pytest.mark.parametrize(
    ("scores", "labels", "defects", "match"),
    [
        ([0.1, 0.2], [0, 1, 1], ["good", "a", "a"], "length"),
        ([0.1, 0.2], [0, 1], ["good"], "defects"),
        ([0.1, np.nan], [0, 1], ["good", "a"], "non-finite"),
        ([0.1, 0.2], [0, 2], ["good", "a"], "0"),
        ([0.1, 0.2], [0, 1], ["good", "good"], "disagrees"),
        ([0.1, 0.2], [0, 1], ["crack", "a"], "disagrees"),
    ],
)
def test_bad_inputs_raise(scores: list[float], labels: list[int], defects: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_metrics(np.array(scores), np.array(labels), defects)


def test_good_cannot_be_reported_apart() -> None:
    with pytest.raises(ValueError, match="good"):
        image_metrics(np.array([0.1, 0.2]), np.array([0, 1]), ["good", "a"], report_apart=["good"])


# ---------------------------------------------------------------------------------------------- pixel


def test_pixel_auroc_by_hand_good_images_contribute_negatives() -> None:
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.95, 0.0], [0.0, 0.0]]], dtype=np.float32)
    # One positive pixel (0.9) against 7 negatives, one of which (0.95, on the good image) is higher.
    assert pixel_auroc(maps, masks) == pytest.approx(6 / 7)
    # Only the defective image: the positive beats all 3 negatives.
    assert pixel_auroc(maps[:1], masks[:1]) == 1.0
    # [N,1,H,W] maps and masks are accepted.
    assert pixel_auroc(maps[:, None], masks[:, None]) == pytest.approx(6 / 7)


def test_pixel_auroc_matches_sklearn_on_constructed_defects() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 32, 32), dtype=bool)
    masks[0, 4:10, 4:12] = True
    masks[2, 20:30, 1:5] = True
    maps = rng.random((5, 1, 32, 32)).astype(np.float32)
    maps[:, 0][masks] += 0.5
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(maps, masks.astype(np.uint8)) == pytest.approx(expected, abs=1e-12)
    perfect = masks.astype(np.float32)[:, None] * 2 + rng.random((5, 1, 32, 32)).astype(np.float32)
    assert pixel_auroc(perfect, masks) == 1.0


def test_pixel_auroc_subsamples_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    masks = np.zeros((10, 64, 64), dtype=bool)
    masks[:5, 10:30, 10:30] = True
    maps = rng.random((10, 64, 64)).astype(np.float32)
    maps[masks] += 0.4
    full = pixel_auroc(maps, masks)
    monkeypatch.setattr(evaluate, "MAX_PIXELS", 4_000)  # 40,960 pixels -> about 4,000 scored
    sub1 = pixel_auroc(maps, masks)
    sub2 = pixel_auroc(maps, masks)
    assert sub1 == sub2
    assert sub1 != full
    assert sub1 == pytest.approx(full, abs=0.03)


def test_pixel_auroc_errors() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="no positive"):
        pixel_auroc(maps, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="same"):
        pixel_auroc(maps, np.ones((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        pixel_auroc(maps, np.full((2, 4, 4), 255, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- plots


def test_save_roc_plot_writes_readable_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 20)
    scores = rng.normal(size=50) + labels
    path = tmp_path / "sub" / "roc.png"
    save_roc_plot(scores, labels, path, "ae on bottle")
    assert path.stat().st_size > 1000
    img = mpimg.imread(path)
    # 6 x 5 inches at 100 dpi: 500 rows (height) by 600 columns (width), RGB(A).
    assert img.shape[:2] == (500, 600)
    assert img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0  # not a blank canvas
    with pytest.raises(ValueError, match="no anomalous"):
        save_roc_plot(scores, np.zeros(50, dtype=int), tmp_path / "x.png", "x")


@pytest.mark.parametrize(("n", "channels"), [(20, 3), (7, 1), (1, 3)])
def test_save_extremes_grid_writes_readable_png(tmp_path: Path, n: int, channels: int) -> None:
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, channels, 24, 32), dtype=np.uint8)
    maps = rng.random((n, 1, 12, 16)).astype(np.float32)  # another resolution than the images
    scores = rng.random(n)
    labels = (np.arange(n) % 2).astype(int)
    defects = ["good" if lab == 0 else "crack" for lab in labels]
    path = tmp_path / f"grid_{n}.png"
    save_extremes_grid(images, maps, scores, labels, defects, path, k=6)
    assert path.stat().st_size > 1000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    if n >= 12:
        # 6 columns of landscape panels over 4 rows: wider than high ([H, W, C] order).
        assert img.shape[1] > img.shape[0]


def test_save_extremes_grid_rejects_bad_shapes(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    maps = np.zeros((4, 1, 8, 8), dtype=np.float32)
    args = (np.arange(4.0), np.array([0, 0, 1, 1]), ["good", "good", "a", "a"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="uint8"):
        save_extremes_grid(images.astype(np.float32), maps, *args)
    with pytest.raises(ValueError, match="C 1 or 3"):
        save_extremes_grid(np.zeros((4, 2, 8, 8), dtype=np.uint8), maps, *args)
    with pytest.raises(ValueError, match="maps"):
        save_extremes_grid(images, maps[:3], *args)


def test_module_does_not_import_torch() -> None:
    code = "import sys, trainer.evaluate; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
