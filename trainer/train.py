"""The training loop: devices, data, epochs, checkpoints, resume, progress, Ctrl-C.

The model owns its losses and optimisers (``Detector.training_step``); this module owns the
rest. Data are decoded once with THE preprocessing (deploy.preprocess via the folder reader)
and kept in memory as uint8; batches are converted to float32 [0, 1] on the device.

Determinism: with the same seed on CPU a run is bit-for-bit repeatable, and a run interrupted
with Ctrl-C and resumed gives the same weights as an uninterrupted one: the shuffle order of
epoch e is a pure function of (seed, e), the torch RNG state is checkpointed, and Ctrl-C is only
acted on between two steps (never inside an optimiser update). It also needs MKL's reproducible mode, which
``trainer/__init__.py`` sets (MKL_CBWR=COMPATIBLE).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deploy.preprocess import InputSpec
from trainer.calibration_floor import DEFAULT_FALSE_ALARM_RATE, images_needed, resolvable_rate, too_few
from trainer.datasets.folder import (
    DEFAULT_WORKERS,
    FolderIndex,
    combined_digest,
    file_digests,
    infer_channels,
    load_images,
    scan_folder,
)
from trainer.errors import CapabilityError, DatasetError, UserError
from trainer.models import Detector, build_config, build_model, model_class
from trainer.run_dir import (
    CHECKPOINTS,
    CONFIG_FILE,
    RunConfig,
    append_metrics,
    load_checkpoint,
    read_run_config,
    save_torch_atomic,
    write_json_atomic,
)

EVAL_BATCH = 256


class Diverged(Exception):
    """A loss or the held-out loss became NaN or infinite (exit 1): training stopped, the checkpoints of the last good
    epoch are kept, and the message says where it happened and what to try."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C / SIGINT / SIGTERM after writing a checkpoint; the message says how to resume."""


@dataclass
class TrainOptions:
    """What the command line asked for; None means "the model's default" (or, on resume, the run's)."""

    model: str
    data: Path
    out: Path
    epochs: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    channels: int | None = None
    lr: float | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = DEFAULT_WORKERS
    val_fraction: float = 0.1
    model_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run: Path
    epochs_done: int
    epochs_run: int  # by this call (0 when the run was already complete)
    best_val_loss: float
    seconds_per_epoch: float
    device: str


def resolve_device(requested: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without CUDA raises CapabilityError (exit 3)."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CapabilityError("--device cuda asked for, but this machine has no CUDA GPU visible to PyTorch")
        return torch.device(requested)
    raise UserError(f"--device must be auto, cpu or cuda, not {requested!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_train_val(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train/good split into (train, held-out) with a seeded permutation; at least one of each."""
    if n < 2:
        raise DatasetError(f"train/good has {n} image(s); training needs at least 2 (one is held out)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a pure function of (n, seed, epoch), so a resume replays it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of ``order``; the last short batch is dropped (BatchNorm dislikes tiny batches)
    unless it would be the only one."""
    full = len(order) // batch_size
    if full == 0:
        return [order]
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second Ctrl-C stops at once (KeyboardInterrupt),
    except while a checkpoint is being written (``writing``): then it stops right after it."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[signal.Signals, Any] = {}
        self._writing = False
        self._deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop and signum == signal.SIGINT:
            if self._writing:  # torch.save interrupted mid-file raises its own RuntimeError: finish the file first
                self._deferred = True
                return
            raise KeyboardInterrupt
        self.stop = True

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self._deferred:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopFlag]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._old[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for signum, old in self._old.items():
                signal.signal(signum, old)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _resolve_config(opts: TrainOptions, existing: RunConfig | None, index: FolderIndex) -> RunConfig:
    """The run's settings: from an existing run (resume) checked against the command line, else new."""
    data = index.root.resolve()
    if existing is not None:
        mc = dict(existing.model_config_values)
    else:
        channels = opts.channels or infer_channels(index)
        mc = build_config(
            opts.model,
            image_size=opts.image_size,
            channels=channels,
            lr=opts.lr,
            batch_size=opts.batch_size,
            epochs=opts.epochs,
            **opts.model_options,
        ).model_dump()
    n = len(index.train)
    tr, va = split_train_val(n, opts.val_fraction, opts.seed)
    digests = file_digests(index.root, index.train)  # each image read and hashed once for both digests
    fresh = RunConfig(
        model=opts.model,
        model_revision=model_class(opts.model).revision,
        model_config_values=mc,
        data=str(data),
        epochs=opts.epochs or mc["epochs"],
        batch_size=opts.batch_size or mc["batch_size"],
        lr=opts.lr or mc["lr"],
        seed=opts.seed,
        val_fraction=opts.val_fraction,
        n_train=len(tr),
        n_val=len(va),
        held_out_digest=combined_digest([digests[i] for i in va]),
        train_digest=combined_digest(digests),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if existing is None:
        return fresh
    asked = fresh.model_copy(
        update={
            "batch_size": opts.batch_size or existing.batch_size,
            "lr": opts.lr or existing.lr,
            "epochs": opts.epochs or existing.epochs,
        }
    )
    asked_model = {"image_size": opts.image_size, "channels": opts.channels, **opts.model_options}
    changed = sorted(k for k, v in asked_model.items() if v is not None and mc.get(k) != v)
    if changed:
        raise UserError(
            f"{opts.out} holds a run with other model settings ("
            + ", ".join(f"{k}={mc.get(k)!r}" for k in changed)
            + "); use another --out for a new run"
        )
    if existing.model_revision != fresh.model_revision:
        raise UserError(
            f"{opts.out} holds a run of revision {existing.model_revision} of {opts.model!r}, and this code is "
            f"revision {fresh.model_revision} (a fix changed what the model computes): resuming would mix "
            "the two; use another --out for a new run"
        )
    diff = asked.same_run_as(existing)
    settings = [d for d in diff if d not in ("train_digest", "held_out_digest")]
    if settings:  # first: another --seed also changes the held-out images, and must not be blamed on the files
        raise UserError(
            f"{opts.out} already holds a different run ({', '.join(settings)} differ); "
            "use another --out, or the same settings to resume it"
        )
    if diff:
        raise UserError(
            f"the images in {data}/train/good are not those {opts.out} started with (a file added, removed or "
            "changed): resuming would train one model on two data sets; use another --out for a new run"
        )
    return existing.model_copy(update={"epochs": asked.epochs})


def train(opts: TrainOptions, console: Console | None = None) -> TrainResult:
    """Train (or resume) the run in ``opts.out``; see the module docstring for the guarantees.

    Raises UserError/DatasetError for bad input, CapabilityError for a missing device, and
    Interrupted after a Ctrl-C/SIGTERM once the checkpoint is written.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    device = resolve_device(opts.device)
    run = opts.out
    if opts.lr is not None and not (math.isfinite(opts.lr) and opts.lr > 0):
        raise UserError(f"--lr must be a positive number, got {opts.lr}")
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder; choose an empty or new folder")
    existing = read_run_config(run) if (run / CONFIG_FILE).is_file() else None
    if existing is None and run.exists() and any(run.iterdir()):
        raise UserError(f"--out {run} exists and is not a training run folder; choose an empty or new folder")
    try:  # before the data are read: a folder that cannot be made is said at once, not after minutes of decoding
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {run}: {exc.strerror or exc}") from None
    model_class(opts.model)  # an unknown model is refused before the data are read
    index = scan_folder(opts.data, need_test=False)
    cfg = _resolve_config(opts, existing, index)
    mc = build_config(cfg.model, **cfg.model_config_values)

    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    model: Detector = build_model(cfg.model, mc).to(device)
    optimizers = model.make_optimizers(cfg.lr)

    # Data: decoded once through THE preprocessing, kept as uint8.
    tr_idx, va_idx = split_train_val(len(index.train), cfg.val_fraction, cfg.seed)
    if too_few(len(va_idx), DEFAULT_FALSE_ALARM_RATE):
        console.print(
            f"[yellow]note:[/] {len(va_idx)} held-out normal image(s) can set a threshold for a false-alarm rate no "
            f"lower than about {resolvable_rate(len(va_idx)):.1%}: export will refuse its default "
            f"{DEFAULT_FALSE_ALARM_RATE:.1%} target unless given --force-threshold or a higher --false-alarm-rate; "
            f"{images_needed(DEFAULT_FALSE_ALARM_RATE, cfg.val_fraction)} images in train/good are enough",
            highlight=False,
        )
    spec = InputSpec(mc.image_size, mc.image_size, mc.channels)
    console.print(
        f"loading {len(index.train)} training images from {cfg.data} at {spec.height}x{spec.width}x{spec.channels}"
    )
    images = torch.from_numpy(load_images(index.train, spec, workers=opts.workers))
    train_x, val_x = images[torch.from_numpy(tr_idx)], images[torch.from_numpy(va_idx)]

    start_epoch, start_batch, best_val = 1, 0, float("inf")
    last_path = run / CHECKPOINTS / "last.pt"
    if existing is not None and last_path.is_file():
        ckpt = load_checkpoint(last_path, device)
        model.load_state_dict(ckpt["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        model.load_extra_state(ckpt.get("extra", {}))
        _set_rng_state(ckpt["rng"])
        start_epoch, start_batch, best_val = ckpt["epoch"], ckpt["batch"], ckpt["best_val"]
        append_metrics(run, {"event": "resumed", "epoch": start_epoch, "batch": start_batch})
        console.print(f"resuming {run} at epoch {start_epoch}, batch {start_batch}")
    else:
        model.before_training(lambda: _float_batches(train_x, device))
    if start_epoch > cfg.epochs:  # nothing to train; config.json keeps the run's own epochs, not this --epochs
        done = start_epoch - 1
        partly = f" and part of epoch {start_epoch}" if start_batch else ""
        console.print(
            f"{run} has already trained {done} epoch(s){partly}; pass --epochs {start_epoch if partly else done + 1} "
            "or more to train on"
        )
        return TrainResult(
            run=run,
            epochs_done=done,
            epochs_run=0,
            best_val_loss=best_val,
            seconds_per_epoch=float("nan"),
            device=str(device),
        )
    write_json_atomic(run / CONFIG_FILE, cfg.model_dump())

    stop = _StopFlag()

    def checkpoint(epoch: int, batch: int) -> None:
        with stop.writing():
            save_torch_atomic(
                last_path,
                {
                    "model": model.state_dict(),
                    "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "extra": model.extra_state(),
                    "rng": _rng_state(),
                    "epoch": epoch,
                    "batch": batch,
                    "best_val": best_val,
                    "model_name": cfg.model,
                },
            )

    epoch_seconds: list[float] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )
    with stop.installed(), progress:
        for epoch in range(start_epoch, cfg.epochs + 1):
            model.train()
            model.on_epoch_start(epoch)
            plan = batches(epoch_order(len(train_x), cfg.seed, epoch), cfg.batch_size)
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(plan), completed=start_batch, info="")
            sums: dict[str, float] = {}
            t0, seen = time.perf_counter(), 0
            for b in range(start_batch, len(plan)):
                if stop.stop:
                    try:
                        checkpoint(epoch, b)
                    finally:  # also when a second Ctrl-C came while it was written (KeyboardInterrupt after it)
                        append_metrics(run, {"event": "interrupted", "epoch": epoch, "batch": b})
                    raise Interrupted(
                        f"interrupted at epoch {epoch}, batch {b}/{len(plan)}; checkpoint written to {last_path}; "
                        f"run the same command again to resume"
                    )
                x = train_x[plan[b]].to(device, non_blocking=True).float().div_(255.0)
                losses = model.training_step(x, optimizers)
                bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
                if bad:
                    _diverged(run, epoch, f"batch {b}/{len(plan)}", bad, cfg.lr)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen += len(x)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                shown = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
                progress.update(task, advance=1, info=f"{shown}  {rate:,.0f} img/s")
            seconds = time.perf_counter() - t0
            n_steps = max(1, len(plan) - start_batch)
            start_batch = 0
            progress.remove_task(task)

            val = validation_loss(model, val_x, device)
            if not math.isfinite(val):
                _diverged(run, epoch, "the held-out loss", {"val": val}, cfg.lr)
            improved = val < best_val
            if improved:
                best_val = val
                with stop.writing():
                    save_torch_atomic(
                        run / CHECKPOINTS / "best.pt",
                        {"model": model.state_dict(), "epoch": epoch, "val_loss": val, "model_name": cfg.model},
                    )
            checkpoint(epoch + 1, 0)
            epoch_seconds.append(seconds)
            mean_losses = {k: v / n_steps for k, v in sums.items()}
            append_metrics(
                run,
                {
                    "event": "epoch",
                    "epoch": epoch,
                    "losses": mean_losses,
                    "val_loss": val,
                    "best": improved,
                    "seconds": seconds,
                    "images_per_s": seen / max(seconds, 1e-9),
                },
            )
            shown = " ".join(f"{k}={v:.4g}" for k, v in mean_losses.items())
            console.print(
                f"epoch {epoch}/{cfg.epochs}  {shown}  val={val:.5g}{' *' if improved else ''}  "
                f"{seen / max(seconds, 1e-9):,.0f} img/s  {seconds:.1f}s"
            )
    return TrainResult(
        run=run,
        epochs_done=cfg.epochs,
        epochs_run=len(epoch_seconds),
        best_val_loss=best_val,
        seconds_per_epoch=float(np.mean(epoch_seconds)) if epoch_seconds else float("nan"),
        device=str(device),
    )


def _float_batches(images: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 [N, C, H, W] -> float32 [0, 1] batches of EVAL_BATCH on ``device``, in order."""
    for i in range(0, len(images), EVAL_BATCH):
        yield images[i : i + EVAL_BATCH].to(device).float().div_(255.0)


def _diverged(run: Path, epoch: int, where: str, losses: dict[str, float], lr: Any) -> NoReturn:
    """Record the divergence in metrics.jsonl and raise Diverged (nothing of the diverged epoch is saved)."""
    append_metrics(
        run, {"event": "diverged", "epoch": epoch, "where": where, "losses": {k: str(v) for k, v in losses.items()}}
    )
    shown = ", ".join(f"{k}={v}" for k, v in losses.items())
    kept = (
        f"the checkpoints of the last good epoch are kept in {run / CHECKPOINTS}"
        if (run / CHECKPOINTS / "last.pt").is_file()
        else "no epoch finished, so there is no checkpoint"
    )
    raise Diverged(
        f"training diverged at epoch {epoch}, {where}: {shown}; {kept}; train again into a new --out with a lower "
        f"--lr (now {lr})"
    )


@torch.no_grad()
def validation_loss(model: Detector, images: torch.Tensor, device: torch.device) -> float:
    """Mean of ``model.validation_loss`` over held-out uint8 images, in eval mode."""
    model.eval()
    total, n = 0.0, 0
    for x in _float_batches(images, device):
        total += float(model.validation_loss(x).sum())
        n += len(x)
    model.train()
    return total / max(n, 1)
