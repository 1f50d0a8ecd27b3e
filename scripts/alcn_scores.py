"""Diagnostic: how well other anomaly scores of a trained ``alcn`` run rank its data folder's test split.

For each run folder, scores the test images of ``--data`` (or the run's own training folder) with the
run's best checkpoint and prints the image AUROC of:

- ``l1``: mean |x' - G_denoise(x')| (the model's ``score="l1"``), x' the model's input space;
- ``l2``: mean (x' - G_denoise(x'))^2 (``score="l2"``);
- ``ffl``: the focal frequency loss of each image alone (the model's own training loss object);
- ``brightness``: the mean intensity of x in [0, 1] (no model: what a score that only measures the
  amount of ink or light would reach).

A diagnostic for docs/benchmarks.md, never a way to pick a checkpoint or a setting for a result.

    python scripts/alcn_scores.py RUN [RUN ...] [--data FOLDER]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from deploy.preprocess import InputSpec
from trainer.datasets.folder import load_images, scan_folder
from trainer.errors import UserError
from trainer.models.alcn import ALCN
from trainer.run_dir import load_model, read_run_config

BATCH = 1000


@torch.no_grad()
def scores(model: ALCN, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The four scores of ``x`` (float32 [N, C, H, W] in [0, 1]) by name, float64 [N] each."""
    out: dict[str, list[torch.Tensor]] = {"l1": [], "l2": [], "ffl": [], "brightness": []}
    for chunk in x.split(BATCH):
        xs = model.normalise(chunk)
        diff = xs - model.g_denoise(xs)
        out["l1"].append(diff.abs().flatten(1).mean(dim=1).double())
        out["l2"].append((diff * diff).flatten(1).mean(dim=1).double())
        # The model's own loss object, one image at a time (it averages over the batch it is given).
        per_image = [model.ffl(p[None], t[None]) for p, t in zip(xs - diff, xs, strict=True)]
        out["ffl"].append(torch.stack(per_image).double())
        out["brightness"].append(chunk.flatten(1).mean(dim=1).double())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="alcn run folders")
    p.add_argument("--data", type=Path, help="data folder to score (default: each run's training folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        for run in args.runs:
            print(run.name, "  ".join(f"{k} {v:.3f}" for k, v in run_aurocs(run, args.data).items()), flush=True)
    except UserError as exc:  # a folder that is not a run, a run of another model, data without test images
        raise SystemExit(f"error: {exc}") from None


def run_aurocs(run: Path, data: Path | None = None) -> dict[str, float]:
    """The image AUROC of each score (``scores``) for ``run``'s best checkpoint on ``data``'s test split
    (default: the run's training folder), without the defects the folder reports apart."""
    cfg = read_run_config(run)
    model, _ = load_model(run, "best", "cpu")
    if not isinstance(model, ALCN):
        raise UserError(f"{run} is a {cfg.model!r} run, not an alcn one")
    folder = scan_folder(data or Path(cfg.data), need_test=True)
    test = [s for s in folder.test if s.defect not in folder.report_apart]  # as the overall AUROC does
    y = np.array([s.label for s in test])
    if len(set(y.tolist())) < 2:
        raise UserError(f"the test split of {folder.root} needs both normal and anomalous images")
    c = model.config
    x = torch.from_numpy(load_images(test, InputSpec(c.image_size, c.image_size, c.channels))).float()
    return {k: float(roc_auc_score(y, v)) for k, v in scores(model, x / 255.0).items()}


if __name__ == "__main__":
    main()
