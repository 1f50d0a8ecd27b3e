"""Diagnostic: how well other anomaly scores of a trained run rank its data folder's test split.

For each run folder, scores the test images of ``--data`` (or the run's own training folder) with the
run's best checkpoint and prints the image AUROC of each variant its model has here:

``alcn`` (x' is the model's input space, after ``input_norm``):

- ``l1``: mean |x' - G_denoise(x')| (the model's ``score="l1"``);
- ``l2``: mean (x' - G_denoise(x'))^2 (``score="l2"``);
- ``ffl``: the focal frequency loss of each image alone (the model's own training loss object).

``oclr`` (images in [-1, 1] as inside the model; G = (Ge, Gd) the generator, D' = (Ge', Gd') the auxiliary AE):

- ``dprime_g``: mean |x - D'(G(x))| (the model's score);
- ``g``: mean |x - G(x)| (the generator's reconstruction error alone);
- ``dprime``: mean |x - D'(x)| (the auxiliary autoencoder alone);
- ``g_vs_dprime``: mean |G(x) - D'(G(x))| (the BEGAN-style discrepancy G and D' play on);
- ``centre``: ||Ge(x) - c||^2 (the Deep SVDD distance of the code to the fixed centre);
- ``latent``: ||Ge(x) - Ge'(G(x))|| (the latent consistency term);
- ``d_fake``: -D(x), the discriminator's logit for "fake" (higher = less like a training image).

Every model also gets ``brightness``: the mean intensity of x in [0, 1] (no model: what a score that only
measures the amount of ink or light would reach).

A diagnostic for docs/benchmarks.md, never a way to pick a checkpoint or a setting for a result.

    python scripts/score_variants.py RUN [RUN ...] [--data FOLDER]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from deploy.preprocess import InputSpec
from trainer.datasets.folder import load_images, scan_folder
from trainer.errors import UserError
from trainer.models import Detector
from trainer.models.alcn import ALCN
from trainer.models.blocks import to_signed
from trainer.models.oclr import OCLR
from trainer.run_dir import load_model, read_run_config

BATCH = 1000

Variants = dict[str, torch.Tensor]


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(dim=1)


def alcn_variants(model: Detector, x: torch.Tensor) -> Variants:
    """``alcn``'s variants of one chunk ``x`` (float32 [N, C, H, W] in [0, 1])."""
    assert isinstance(model, ALCN)
    xs = model.normalise(x)
    diff = xs - model.g_denoise(xs)
    # The model's own loss object, one image at a time (it averages over the batch it is given).
    per_image = [model.ffl(p[None], t[None]) for p, t in zip(xs - diff, xs, strict=True)]
    return {
        "l1": diff.abs().flatten(1).mean(dim=1),
        "l2": (diff * diff).flatten(1).mean(dim=1),
        "ffl": torch.stack(per_image),
    }


def oclr_variants(model: Detector, x: torch.Tensor) -> Variants:
    """``oclr``'s variants of one chunk ``x`` (float32 [N, C, H, W] in [0, 1])."""
    assert isinstance(model, OCLR)
    xs = to_signed(x)
    z, fake = model.generate(xs)
    z_aux, rec = model.auxiliary(fake)
    _, rec_x = model.auxiliary(xs)
    return {
        "dprime_g": _mean_abs(xs, rec) * 0.5,  # [0, 1] units, as forward
        "g": _mean_abs(xs, fake),
        "dprime": _mean_abs(xs, rec_x),
        "g_vs_dprime": _mean_abs(fake, rec),
        "centre": ((z - model.center) ** 2).sum(dim=1),
        "latent": (z - z_aux).norm(dim=1),
        "d_fake": -model.discriminator(xs).flatten(),
    }


VARIANTS: dict[str, Callable[[Detector, torch.Tensor], Variants]] = {"alcn": alcn_variants, "oclr": oclr_variants}


@torch.no_grad()
def scores(model: Detector, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every variant of ``model``'s kind plus ``brightness`` for ``x`` (float32 [N, C, H, W] in [0, 1]),
    by name, float64 [N] each. ``model`` must be in eval mode."""
    variants = VARIANTS[model.name]
    out: dict[str, list[torch.Tensor]] = {}
    for chunk in x.split(BATCH):
        found = {**variants(model, chunk), "brightness": chunk.flatten(1).mean(dim=1)}
        for name, value in found.items():
            out.setdefault(name, []).append(value.double())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def run_aurocs(run: Path, data: Path | None = None) -> dict[str, float]:
    """The image AUROC of each score (``scores``) for ``run``'s best checkpoint on ``data``'s test split
    (default: the run's training folder), without the defects the folder reports apart."""
    cfg = read_run_config(run)
    if cfg.model not in VARIANTS:
        raise UserError(f"{run} is a {cfg.model!r} run; this diagnostic knows {', '.join(sorted(VARIANTS))}")
    model, _ = load_model(run, "best", "cpu")
    folder = scan_folder(data or Path(cfg.data), need_test=True)
    test = [s for s in folder.test if s.defect not in folder.report_apart]  # as the overall AUROC does
    y = np.array([s.label for s in test])
    if len(set(y.tolist())) < 2:
        raise UserError(f"the test split of {folder.root} needs both normal and anomalous images")
    c = model.config
    x = torch.from_numpy(load_images(test, InputSpec(c.image_size, c.image_size, c.channels))).float()
    return {k: float(roc_auc_score(y, v)) for k, v in scores(model, x / 255.0).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (alcn or oclr)")
    p.add_argument("--data", type=Path, help="data folder to score (default: each run's training folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        for run in args.runs:
            print(run.name, "  ".join(f"{k} {v:.3f}" for k, v in run_aurocs(run, args.data).items()), flush=True)
    except UserError as exc:  # a folder that is not a run, a run of another model, data without test images
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
