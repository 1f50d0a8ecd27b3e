"""edge-trainer: prepare datasets, train detectors, evaluate them (DESIGN.md, "Command lines").

Exit codes: 0 ok, 1 failure of the work, 2 bad usage or bad input (one clear line, no traceback),
3 a capability missing on this machine, 130 interrupted (a checkpoint was written; rerun to resume).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from trainer.calibration_floor import DEFAULT_FALSE_ALARM_RATE
from trainer.datasets.folder import DEFAULT_WORKERS
from trainer.errors import CapabilityError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and evaluate one-class visual anomaly detectors.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Fetch real datasets and lay them out as MVTec-style folders.")
app.add_typer(datasets_app, name="datasets")

err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    """Run a command body, turning the product's own errors into one line and an exit code."""
    from trainer.train import Diverged, Interrupted

    try:
        return fn()
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except CapabilityError as exc:
        err.print(f"[red]missing capability:[/red] {exc}", highlight=False)
        raise typer.Exit(3) from None
    except Interrupted as exc:
        err.print(f"[yellow]{exc}[/yellow]", highlight=False)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C (train), or one outside training; files are written whole or not at all
        err.print("[yellow]interrupted; a training run resumes from its last checkpoint[/yellow]", highlight=False)
        raise typer.Exit(130) from None
    except Diverged as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, true/false), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@datasets_app.command("prepare")
def datasets_prepare(
    name: Annotated[str, typer.Argument(help="mnist | fashion-mnist | elpv | folder")],
    out: Annotated[Path, typer.Option("--out", help="target folder (for 'folder': the folder to validate)")],
    normal_class: Annotated[
        str | None,
        typer.Option("--normal-class", help="mnist/fashion-mnist: the normal class (0-9 or a name)"),
    ] = None,
    cell_type: Annotated[str, typer.Option("--cell-type", help="elpv: mono | poly | all")] = "all",
    seed: Annotated[int, typer.Option(help="seed of the elpv 80/20 split")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
) -> None:
    """Fetch a real dataset (cached, checksummed) and lay it out as DIR/train/good, DIR/test/<class>."""
    from trainer.datasets import prepare

    report = _run(lambda: prepare(name, out, normal_class=normal_class, cell_type=cell_type, seed=seed))
    if json_out:
        print(json.dumps(report.to_dict(), default=str))
    else:
        print(report.to_text())


@app.command()
def train(
    model: Annotated[str, typer.Option(help="registered model name (ae, ganomaly, ...)")],
    data: Annotated[Path, typer.Option(help="MVTec-layout folder; trains on DIR/train/good")],
    out: Annotated[Path, typer.Option(help="RUN folder; an existing run there is resumed")],
    epochs: Annotated[int | None, typer.Option(min=1, help="default: the model's")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="default: the model's")] = None,
    image_size: Annotated[int | None, typer.Option(help="input height = width in pixels; default: the model's")] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3; default: inferred from the images")] = None,
    lr: Annotated[float | None, typer.Option(help="base learning rate; default: the model's")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="seeds the split, the weights and the batch order")
    ] = 0,
    workers: Annotated[int, typer.Option(min=1, help="image decoding threads")] = DEFAULT_WORKERS,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="model setting key=value, e.g. --set loss=ssim (repeatable)"),
    ] = None,
) -> None:
    """Train a detector on normal images; writes RUN/ (config, checkpoints, metrics.jsonl). Ctrl-C saves and stops."""
    from trainer.train import TrainOptions
    from trainer.train import train as do_train

    def body() -> None:
        opts = TrainOptions(
            model=model,
            data=data,
            out=out,
            epochs=epochs,
            batch_size=batch_size,
            image_size=image_size,
            channels=channels,
            lr=lr,
            device=device,
            seed=seed,
            workers=workers,
            model_options=_parse_sets(set_ or []),
        )
        result = do_train(opts)
        if result.epochs_run == 0:
            return
        err.print(
            f"trained {model} for {result.epochs_done} epochs on {result.device}: best held-out loss "
            f"{result.best_val_loss:.5g}, {result.seconds_per_epoch:.1f} s/epoch -> {out}",
            highlight=False,
            soft_wrap=True,
        )

    _run(body)


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="RUN folder written by train")],
    data: Annotated[Path | None, typer.Option(help="MVTec-layout folder; default: the run's training data")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Evaluate a run on DIR/test: image AUROC, max balanced accuracy, per-defect and pixel AUROC.

    Metrics and plots go to RUN/eval (best checkpoint) or RUN/eval-last (--checkpoint last).
    """
    from trainer.eval_run import evaluate_run
    from trainer.run_dir import eval_dir

    result = _run(lambda: evaluate_run(run, data, checkpoint=checkpoint, device=device))
    if json_out:
        print(json.dumps(result, sort_keys=True))
        return
    table = Table(title=f"{result['model']} on {result['data']}", show_header=False, highlight=False)
    for key in (
        "auroc",
        "max_balanced_accuracy",
        "threshold",
        "pixel_auroc",
        "n_normal",
        "n_anomalous",
        "images_per_s",
        "epoch",
        "device",
    ):
        value = result.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if key == "threshold":  # chosen on these test images, in raw score units: not a value for the daemon's config
            key = "threshold (raw, best on this test set)"
        table.add_row(key, shown)
    for defect, value in sorted(result["per_defect_auroc"].items()):
        table.add_row(f"auroc {defect}", f"{value:.4f}")
    Console().print(table)
    err.print(f"plots: {eval_dir(run, checkpoint)}", highlight=False, soft_wrap=True)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="RUN folder written by train")],
    out: Annotated[Path, typer.Option(help="bundle directory to create (or a .tar with --tar)")],
    sign_key: Annotated[Path | None, typer.Option(help="Ed25519 private key (edge-deploy keygen)")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    false_alarm_rate: Annotated[
        float, typer.Option(help="target false-alarm rate on held-out normal images (threshold quantile)")
    ] = DEFAULT_FALSE_ALARM_RATE,
    labelled_val: Annotated[
        Path | None, typer.Option(help="MVTec-layout folder whose test/ is a labelled validation set: F1 threshold")
    ] = None,
    tar: Annotated[bool, typer.Option(help="write one .tar file instead of a directory")] = False,
    force_threshold: Annotated[
        bool,
        typer.Option(
            help="export a threshold that the held-out normal images show, or cannot rule out, to alarm too often"
        ),
    ] = False,
) -> None:
    """Export a run as a detector bundle: ONNX (checked against torch), calibration, golden set, signature."""
    from deploy.bundle import BundleError
    from trainer.export import ExportError, export_run

    def body() -> None:
        try:
            export_run(
                run,
                out,
                sign_key=sign_key,
                checkpoint=checkpoint,
                false_alarm_rate=false_alarm_rate,
                labelled_val=labelled_val,
                tar=tar,
                force_threshold=force_threshold,
            )
        except BundleError as exc:
            raise UserError(str(exc)) from None
        except ExportError as exc:
            err.print(f"[red]export failed:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None

    _run(body)


@app.command("compile")
def compile_(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    precision: Annotated[str, typer.Option(help="fp16 | fp32")] = "fp16",
    max_batch: Annotated[int, typer.Option(help="largest batch the engine takes")] = 8,
    sign_key: Annotated[Path | None, typer.Option(help="re-sign the bundle after adding the engine")] = None,
) -> None:
    """Build a TensorRT engine for this device from the bundle's ONNX and gate it on the golden set (exit 3 where
    TensorRT or a GPU is missing)."""
    from deploy.engines import compile_main

    raise typer.Exit(compile_main(bundle, precision, max_batch, sign_key))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
