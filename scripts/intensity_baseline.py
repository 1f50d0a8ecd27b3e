#!/usr/bin/env python3
"""A yardstick for a benchmark folder: how well the image's mean intensity alone ranks its test set.

Usage::

    python scripts/intensity_baseline.py DIR [DIR ...] [--image-size 64] [--channels 1]

For each MVTec-layout folder (train/good, test/<class>), prints the image AUROC of two scores that
need no training: darkness (1 - mean intensity) and brightness (mean intensity), over the test set
as the benchmarks score it (``dataset.json``'s report-apart classes left out), images prepared by
THE preprocessing at the given size. A detector that does not beat the better of the two has not
learned more than "defective parts are darker (or brighter)": on ELPV, darkness alone ranks cracked
cells well (docs/benchmarks_notes/elpv.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy.preprocess import InputSpec  # noqa: E402
from trainer.datasets.folder import load_images, scan_folder  # noqa: E402
from trainer.errors import UserError  # noqa: E402


def intensity_aurocs(folder: Path, image_size: int, channels: int) -> dict[str, float | int]:
    """{"darkness": AUROC, "brightness": AUROC, "n_normal": int, "n_anomalous": int} for ``folder``'s test set.

    Raises UserError when the folder is not MVTec-layout or its test set lacks normal or anomalous images.
    """
    index = scan_folder(folder)
    test = [s for s in index.test if s.defect not in index.report_apart]
    labels = np.array([s.label for s in test])
    if labels.size == 0 or labels.min() == labels.max():
        raise UserError(f"{folder}: the test set needs both normal and anomalous images to rank")
    images = load_images(test, InputSpec(height=image_size, width=image_size, channels=channels))
    mean = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64) / 255.0
    brightness = float(roc_auc_score(labels, mean))
    return {
        "darkness": 1.0 - brightness,  # AUROC of -score is exactly 1 - AUROC of score, ties included
        "brightness": brightness,
        "n_normal": int((labels == 0).sum()),
        "n_anomalous": int((labels == 1).sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1, choices=[1, 3])
    args = p.parse_args()
    for folder in args.folders:
        try:
            r = intensity_aurocs(folder, args.image_size, args.channels)
        except UserError as exc:
            sys.exit(f"error: {exc}")
        print(
            f"{folder}: darkness AUROC {r['darkness']:.3f}, brightness AUROC {r['brightness']:.3f} "
            f"({r['n_normal']} normal, {r['n_anomalous']} anomalous, {args.image_size} px, {args.channels} ch)"
        )


if __name__ == "__main__":
    main()
