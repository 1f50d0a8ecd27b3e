"""Run a benchmark protocol (DESIGN.md, "Benchmark protocols") and append its records to a results file.

    python scripts/run_benchmarks.py mnist-oneclass --models ae,ganomaly --epochs 15 \
        --results docs/results/mnist-oneclass.json
    python scripts/run_benchmarks.py industrial --datasets mvtec_bottle,magnetic_tile,bsdata_pitting \
        --data-root ../shared/data --models ae,ganomaly --image-size 128 --batch-size 16 --epochs 100 \
        --results docs/results/industrial.json

Finished (protocol, model, normal_class) records with the same epochs, seed and image size are
kept and not recomputed, so an interrupted benchmark resumes where it stopped. Checkpoints are
the trainer's own choice (lowest loss on held-out normal images); test data never pick anything.
Then run `python scripts/make_benchmarks.py` to regenerate docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.datasets import prepare  # noqa: E402
from trainer.eval_run import evaluate_run  # noqa: E402
from trainer.models import build_config  # noqa: E402
from trainer.run_dir import write_json_atomic  # noqa: E402
from trainer.train import TrainOptions, train  # noqa: E402


def _commit() -> str:
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {cpu}, torch {torch.__version__}"
    return f"CPU only, {cpu}, torch {torch.__version__}"


def _command(args: argparse.Namespace) -> str:
    """The command line as a reader would rerun it: results under docs/results, no scratch folder."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--work", "--results"):
            skip = True
            continue
        argv.append(a)
    return f"python scripts/run_benchmarks.py {shlex.join(argv)} --results docs/results/{args.results.name}"


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["protocol"], r["model"], str(r["normal_class"]), r["epochs"], r["seed"], r.get("image_size"))


def run_one(
    protocol: str,
    model: str,
    normal_class: str,
    data: Path,
    work: Path,
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    results: Path,
) -> None:
    image_size = build_config(model, image_size=args.image_size).image_size
    probe = {
        "protocol": protocol,
        "model": model,
        "normal_class": normal_class,
        "epochs": args.epochs,
        "seed": args.seed,
        "image_size": image_size,
    }
    if any(_key(r) == _key(probe) for r in records):
        print(f"cached: {protocol} {model} {normal_class}", flush=True)
        return
    run = work / "runs" / protocol / f"{model}-{normal_class}-{image_size}px-e{args.epochs}-s{args.seed}"
    t0 = time.time()
    result = train(
        TrainOptions(
            model=model,
            data=data,
            out=run,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=image_size,
            device=args.device,
            seed=args.seed,
        )
    )
    metrics = evaluate_run(run, data, device=args.device)
    record = {
        **probe,
        "auroc": metrics["auroc"],
        "max_balanced_accuracy": metrics["max_balanced_accuracy"],
        "per_defect_auroc": metrics["per_defect_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "n_normal": metrics["n_normal"],
        "n_anomalous": metrics["n_anomalous"],
        "seconds_per_epoch": result.seconds_per_epoch,
        "batch_size": json.loads((run / "config.json").read_text())["batch_size"],
        "inference_ms_per_image": 1000.0 / metrics["images_per_s"],
        "device": result.device,
        "machine": _machine(),
        "commit": _commit(),
        "command": _command(args),
        "date": time.strftime("%Y-%m-%d"),
    }
    records.append(record)
    write_json_atomic(results, sorted(records, key=lambda r: (r["model"], str(r["normal_class"]))))
    print(
        f"{protocol} {model} {normal_class}: auroc {record['auroc']:.4f} "
        f"({time.time() - t0:.0f} s, {record['seconds_per_epoch']:.2f} s/epoch)",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["mnist-oneclass", "industrial"])
    p.add_argument("--models", default="ae,ganomaly")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--datasets", default="mvtec_bottle,bsdata_pitting,magnetic_tile")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "work")
    p.add_argument("--results", type=Path, required=True)
    args = p.parse_args()

    records = _load(args.results)
    models = [m for m in args.models.split(",") if m]
    if args.protocol == "mnist-oneclass":
        for digit in args.digits.split(","):
            data = args.work / "data" / f"mnist-{digit}"
            prepare("mnist", data, normal_class=digit)
            for model in models:
                run_one(args.protocol, model, digit, data, args.work, args, records, args.results)
    else:
        for name in args.datasets.split(","):
            for model in models:
                run_one(args.protocol, model, name, args.data_root / name, args.work, args, records, args.results)


if __name__ == "__main__":
    main()
