"""Evaluate a trained RUN on a data folder's test split: scores, metrics, plots.

Writes metrics.json, roc.png and extremes.png (the most and least anomalous test images with
their anomaly maps) to RUN/eval for the best checkpoint, RUN/eval-last for the last (``eval_dir``),
and returns the metrics as a dict with at least
{"auroc", "max_balanced_accuracy", "n_normal", "n_anomalous", "model"} (DESIGN.md's contract).
The model is scored exactly as it will be deployed: THE preprocessing, then ``forward``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from deploy.preprocess import InputSpec
from trainer.datasets.folder import load_images, load_masks, scan_folder
from trainer.errors import UserError
from trainer.evaluate import image_metrics, pixel_auroc, save_extremes_grid, save_roc_plot
from trainer.run_dir import FILE_SHA256, eval_dir, load_model, read_run_config, weights_epoch, write_json_atomic
from trainer.train import resolve_device

BATCH = 64


@torch.no_grad()
def score_images(
    model: torch.nn.Module, images: np.ndarray, device: torch.device, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Score uint8 [N, C, H, W] images: (scores float32 [N], maps float32 [N, 1, H, W], images/s).

    images/s counts the model only (host->device copy, forward, device->host), not decoding.
    """
    scores, maps = [], []
    task = progress.add_task("scoring", total=len(images)) if progress else None
    elapsed = 0.0
    for i in range(0, len(images), BATCH):
        x = torch.from_numpy(images[i : i + BATCH])
        t0 = time.perf_counter()
        s, m = model(x.to(device).float().div_(255.0))
        s_np, m_np = s.float().cpu().numpy(), m.float().cpu().numpy()
        elapsed += time.perf_counter() - t0
        scores.append(s_np)
        maps.append(m_np)
        if progress and task is not None:
            progress.advance(task, len(x))
    return np.concatenate(scores), np.concatenate(maps), len(images) / max(elapsed, 1e-9)


def evaluate_run(
    run: Path,
    data: Path | None = None,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    console: Console | None = None,
) -> dict[str, Any]:
    """Evaluate ``run`` on ``data`` (default: the folder it was trained on); see the module docstring."""
    console = console or Console(stderr=True, soft_wrap=True)
    cfg = read_run_config(run)
    dev = resolve_device(device)
    model, ckpt = load_model(run, checkpoint, dev)
    mc = model.config
    index = scan_folder(data if data is not None else Path(cfg.data), need_test=True)
    if not any(s.label == 1 and s.defect not in index.report_apart for s in index.test):
        apart = f" (report_apart sets aside {', '.join(sorted(index.report_apart))})" if index.report_apart else ""
        raise UserError(
            f"{index.root / 'test'} has no anomalous images{apart}: AUROC needs test/<defect>/ folders beside "
            "test/good/"
        )
    spec = InputSpec(mc.image_size, mc.image_size, mc.channels)

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("loading test images", total=len(index.test))
        images = load_images(index.test, spec, progress=lambda n: progress.advance(task, n))
        scores, maps, rate = score_images(model, images, dev, progress)

    labels = np.array([s.label for s in index.test])
    defects = [s.defect for s in index.test]
    try:
        metrics = image_metrics(scores, labels, defects, index.report_apart)
    except ValueError as exc:  # e.g. NaN scores from a model whose training diverged
        raise UserError(f"cannot evaluate {run}: {exc}") from None
    pix: float | None = None
    if index.has_masks:
        masks = load_masks(index.test, spec.height, spec.width)
        # An anomalous image without a mask has unknown defect pixels: counting them as normal would lower the
        # metric, so it is left out (MVTec AD masks every anomalous image).
        unmasked = [s for s in index.test if s.label == 1 and s.mask is None and s.defect not in index.report_apart]
        if unmasked:
            console.print(
                f"[yellow]note:[/] pixel AUROC leaves out {len(unmasked)} anomalous test image(s) without a mask "
                f"(e.g. {unmasked[0].path.relative_to(index.root)}: no ground_truth/{unmasked[0].defect}/"
                f"{unmasked[0].path.stem}_mask.png)",
                highlight=False,
            )
        keep = np.array(
            [s.defect not in index.report_apart and (s.label == 0 or s.mask is not None) for s in index.test]
        )
        if masks[keep].any():
            pix = pixel_auroc(maps[keep], masks[keep])
    result: dict[str, Any] = {
        "model": cfg.model,
        **metrics,
        "pixel_auroc": pix,
        "images_per_s": rate,
        "device": str(dev),
        "checkpoint": checkpoint,
        "epoch": weights_epoch(ckpt),
        "checkpoint_sha256": ckpt[FILE_SHA256],
        "data": str(index.root.resolve()),
        "image_size": mc.image_size,
        "channels": mc.channels,
    }
    out = eval_dir(run, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", result)
    keep_idx = [i for i, d in enumerate(defects) if d not in index.report_apart]
    save_roc_plot(scores[keep_idx], labels[keep_idx], out / "roc.png", title=f"{cfg.model} on {index.root.name}")
    save_extremes_grid(images, maps, scores, labels, defects, out / "extremes.png")
    return result
