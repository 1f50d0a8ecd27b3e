"""Does this device prepare images as the trainer did? The golden gate cannot tell; this check can.

The golden parity gate feeds a backend the bundle's ``golden/inputs.npy``: images the trainer already
decoded and resized. A device whose OpenCV decodes or resizes differently (JetPack's own build, another
libjpeg, other SIMD paths) passes that gate and still scores its camera frames on slightly different
pixels. So a bundle also carries the golden images' source files, ``golden/sources/<row>.<ext>`` (``row``
the golden row, two digits, ``ext`` the file's own suffix: the bytes the trainer decoded). This module
prepares them with this device's ``deploy.preprocess`` and compares with the golden inputs, in uint8
levels (the golden inputs are ``to_float`` of uint8, so ``rint(x * 255)`` recovers those exactly), and,
given a backend, how far the differences move the normalised score.

A bundle exported before the sources existed carries none: the check then has nothing to say (None).
Never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from deploy.manifest import Manifest
from deploy.parity import load_golden
from deploy.preprocess import ImageReadError, decode_image, prepare_uint8, to_float

GOLDEN_SOURCES = "golden/sources"

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def source_name(row: int, suffix: str) -> str:
    """The bundle-relative name of golden row ``row``'s source file (``suffix`` with its dot, e.g. ``.png``)."""
    return f"{GOLDEN_SOURCES}/{row:02d}{suffix.lower()}"


@dataclass(frozen=True)
class PreprocessReport:
    """How this device's preparation of the golden sources compares with the trainer's.

    ``n`` sources checked; ``n_differ`` of them prepared to other pixels; ``max_levels`` the largest
    difference of one pixel value, in uint8 levels (0-255); ``share`` the fraction of all pixel values
    that differ; ``max_score_shift`` the largest change of the normalised score (0-1, threshold at 0.5)
    that the differences cause, or None when no backend was given.
    """

    n: int
    n_differ: int
    max_levels: int
    share: float
    max_score_shift: float | None

    @property
    def identical(self) -> bool:
        return self.n_differ == 0

    def summary(self) -> str:
        if self.identical:
            return f"this OpenCV prepares the {self.n} golden source images exactly as the trainer did"
        shift = (
            ""
            if self.max_score_shift is None
            else f"; normalised scores move by up to {self.max_score_shift:.4f} (threshold 0.5)"
        )
        return (
            f"this OpenCV prepares {self.n_differ} of the {self.n} golden source images differently from the "
            f"trainer: up to {self.max_levels} level(s) on {self.share:.2%} of pixel values{shift}"
        )


def golden_sources(manifest: Manifest) -> dict[int, str]:
    """Golden row -> bundle-relative name, for the sources the manifest lists (empty for older bundles)."""
    rows: dict[int, str] = {}
    prefix = GOLDEN_SOURCES + "/"
    for name in manifest.files:
        if not name.startswith(prefix):
            continue
        stem = Path(name).stem
        if stem.isdigit() and int(stem) < manifest.golden.n:
            rows[int(stem)] = name
    return dict(sorted(rows.items()))


def check_preprocessing(bundle_dir: Path, manifest: Manifest, run: Runner | None = None) -> PreprocessReport | None:
    """Prepare the bundle's golden sources here and compare them with its golden inputs (see the module docstring).

    ``run`` (a backend: float32 [B, C, H, W] -> (score [B], map)) adds the normalised-score shift. None when
    the bundle carries no sources. Raises ImageReadError naming a source file that cannot be decoded.
    """
    rows = golden_sources(manifest)
    if not rows:
        return None
    inputs, _, _ = load_golden(bundle_dir, manifest)
    spec = manifest.input.to_input_spec()
    order = list(rows)
    expected = np.rint(inputs[order] * 255.0).astype(np.int16)
    here = np.stack(
        [prepare_uint8(decode_image(Path(bundle_dir) / name, name=name), spec) for name in rows.values()]
    ).astype(np.int16)
    diff = np.abs(here - expected)
    per_image = diff.reshape(len(order), -1).max(axis=1)
    differ = per_image > 0
    shift: float | None = None
    if run is not None:
        shift = 0.0
        cal = manifest.calibration
        for i in np.flatnonzero(differ):  # one image a run: within any backend's batch range
            ref, _ = run(np.ascontiguousarray(inputs[order[i] : order[i] + 1]))
            got, _ = run(to_float(here[i : i + 1].astype(np.uint8)))
            moved = abs(cal.normalise(float(np.asarray(got)[0])) - cal.normalise(float(np.asarray(ref)[0])))
            shift = max(shift, moved)
    return PreprocessReport(
        n=len(order),
        n_differ=int(differ.sum()),
        max_levels=int(diff.max()),
        share=float((diff > 0).mean()),
        max_score_shift=shift,
    )


PreprocessLevel = Literal["ok", "warn", "unchecked"]


def preprocessing_verdict(bundle_dir: Path, manifest: Manifest, run: Runner | None) -> tuple[PreprocessLevel, str]:
    """``check_preprocessing`` as one line for the daemon's log and P/info and doctor's ``preprocess`` line, never
    raising: "ok" when identical; "warn" when the images differ or cannot be checked (a source this OpenCV cannot
    decode, a backend that fails on them); "unchecked" when the bundle carries no sources (an older export)."""
    try:
        report = check_preprocessing(bundle_dir, manifest, run)
    except Exception as exc:  # advice only: nothing about it may stop a model that passed its gate from serving
        return "warn", f"not checked: {exc}"
    if report is None:
        return "unchecked", "not checked: the bundle carries no golden source images (exported before they were added)"
    return ("ok" if report.identical else "warn"), report.summary()


__all__ = [
    "GOLDEN_SOURCES",
    "ImageReadError",
    "PreprocessReport",
    "check_preprocessing",
    "golden_sources",
    "preprocessing_verdict",
    "source_name",
]
