"""The RUN folder: what a training run writes and what eval/export read back.

RUN/config.json           RunConfig (model name, resolved model config, data, seed, ...)
RUN/metrics.jsonl         one JSON object per line: epochs, interruptions, resumes
RUN/checkpoints/last.pt   everything an exact resume needs (weights, optimisers, RNG, position)
RUN/checkpoints/best.pt   weights with the lowest loss on the held-out 10% of train/good
RUN/eval/                 metrics.json, roc.png, extremes.png (written by eval of the best checkpoint)
RUN/eval-last/            the same for ``eval --checkpoint last`` (so it never overwrites the best's)
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from deploy.durable import atomic_file, write_bytes_atomic
from trainer.errors import UserError
from trainer.models import Detector, build_config, build_model

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class RunConfig(BaseModel):
    """The resolved settings of a run; a resume must match them (except ``epochs``, which may grow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    model_revision: int = Field(1, ge=1, description="the model's revision when the run started (older runs: 1)")
    model_config_values: dict[str, Any] = Field(description="the model's resolved pydantic config")
    data: str = Field(description="absolute path of the training data folder")
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    seed: int
    val_fraction: float = Field(0.1, gt=0, lt=1)
    n_train: int = Field(ge=1, description="images trained on (train/good minus the held-out part)")
    n_val: int = Field(ge=1, description="held-out normal images used to pick the best checkpoint")
    held_out_digest: str = Field(
        "", description="data_digest of the held-out images (export calibrates on them); empty in older runs"
    )
    train_digest: str = Field(
        "", description="data_digest of every train/good image (a resume must see the same); empty in older runs"
    )
    created: str = ""

    def same_run_as(self, other: RunConfig) -> list[str]:
        """Names of the settings that differ from ``other``, ignoring ``epochs`` and ``created`` (and
        a digest that either run predates)."""
        skip = {"epochs", "created"} | {
            k for k in ("held_out_digest", "train_digest") if "" in (getattr(self, k), getattr(other, k))
        }
        mine, theirs = self.model_dump(exclude=skip), other.model_dump(exclude=skip)
        return sorted(k for k in mine if mine[k] != theirs[k])


def eval_dir(run: Path, checkpoint: str) -> Path:
    """Where eval writes (and export reads) the metrics of ``checkpoint`` (best | last): RUN/eval for
    the best checkpoint, RUN/eval-last for the last, so evaluating one never overwrites the other's."""
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint must be 'best' or 'last', not {checkpoint!r}")
    return run / ("eval" if checkpoint == "best" else f"eval-{checkpoint}")


def weights_epoch(ckpt: dict[str, Any]) -> int:
    """The epoch the checkpoint's weights were trained up to (1-based; 0 = untrained).

    best.pt stores it directly. last.pt stores where a resume starts, (epoch, batch): (E + 1, 0) after
    a whole epoch E, (E, b) when epoch E was interrupted after b batches (its weights are then part of
    the way into E).
    """
    epoch = int(ckpt.get("epoch", 0))
    if ckpt.get("batch") == 0:
        return max(0, epoch - 1)
    return epoch


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically and durably (``deploy.durable``)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def save_torch_atomic(path: Path, obj: Any) -> None:
    """torch.save ``obj`` to ``path`` atomically and durably, so a crash or power cut never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    """Append one record (with a wall-clock ``time``) to RUN/metrics.jsonl."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
    with (run / METRICS_FILE).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_run_config(run: Path) -> RunConfig:
    """RUN/config.json, or UserError if RUN is not a training run folder."""
    path = run / CONFIG_FILE
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist (train one with: edge-trainer train --out {run} ...)")
    if not path.is_file():
        raise UserError(f"{run} is not a training run: it has no {CONFIG_FILE}")
    try:
        return RunConfig.model_validate_json(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not a valid run config: {exc}") from None


FILE_SHA256 = "file_sha256"


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer; UserError if it is missing or unreadable.

    The returned dict also holds ``FILE_SHA256``: the hex sha256 of the bytes loaded, the identity of
    these weights (eval records it; export ships only metrics of the same file). It is hashed from the
    very bytes loaded, so a training that replaces the file meanwhile cannot make the two disagree.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (has the run finished an epoch?)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
        ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn or foreign file
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"cannot read checkpoint {path}: not a trainer checkpoint (a {type(ckpt).__name__})")
    ckpt[FILE_SHA256] = hashlib.sha256(data).hexdigest()
    return ckpt


def load_model(run: Path, which: str = "best", device: torch.device | str = "cpu") -> tuple[Detector, dict[str, Any]]:
    """The run's model with the ``which`` ("best" or "last") weights, in eval mode, and the checkpoint."""
    if which not in ("best", "last"):
        raise UserError(f"--checkpoint must be 'best' or 'last', not {which!r}")
    cfg = read_run_config(run)
    model = build_model(cfg.model, build_config(cfg.model, **cfg.model_config_values))
    path = run / CHECKPOINTS / f"{which}.pt"
    ckpt = load_checkpoint(path, device)
    if not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a checkpoint of this trainer (no model weights in it)")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights: another model or image size
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise UserError(
            f"{path} does not fit the run's {cfg.model} model ({detail}): was it copied from another run?"
        ) from None
    model.to(device).eval()
    return model, ckpt
