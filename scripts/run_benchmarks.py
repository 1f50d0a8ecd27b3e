"""Run a benchmark protocol (DESIGN.md, "Benchmark protocols") and append its records to a results file.

    python scripts/run_benchmarks.py mnist-oneclass --models ae,ganomaly --epochs 15 \
        --results docs/results/mnist-oneclass.json
    python scripts/run_benchmarks.py industrial --datasets mvtec_bottle,magnetic_tile,bsdata_pitting \
        --data-root ../shared/data --models ae,ganomaly --image-size 128 --batch-size 16 --epochs 100 \
        --results docs/results/industrial.json
    python scripts/run_benchmarks.py mnist-oneclass --models ede --digits 0,1,2,3 \
        --set ede.variant=one_ede --jobs 4 --results docs/results/mnist-oneclass-ede.json
    python scripts/run_benchmarks.py elpv --cell-types mono,poly,all --models ae --image-size 128 \
        --batch-size 16 --epochs 100 --results docs/results/elpv.json

``--set MODEL.key=value`` (repeatable) changes one setting of one model's config, as
``edge-trainer train --set key=value`` does (values parse as JSON when they can: numbers,
true/false; else text). The settings are recorded in each record ("settings") and are part of
its identity, so ``ede`` and ``ede`` with ``variant=one_ede`` are different rows of the tables.

``--jobs N`` runs N trainings at once, each in its own process, on the one device (small models
leave a GPU mostly idle); s/epoch and ms/image are then measured under that contention.

Finished (protocol, model, settings, normal_class) records with the same epochs, seed, image
size and model revision are kept and not recomputed, so an interrupted benchmark resumes where it
stopped. A model's ``revision`` (trainer/models) is bumped by a fix that changes what it computes:
its older records then stay in the file as that revision's and the model is run again.
Checkpoints are the trainer's own choice (lowest loss on held-out normal images); test data
never pick anything. Then run `python scripts/make_benchmarks.py` to regenerate docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.datasets import prepare  # noqa: E402
from trainer.eval_run import evaluate_run  # noqa: E402
from trainer.models import build_config, model_class  # noqa: E402
from trainer.run_dir import METRICS_FILE, write_json_atomic  # noqa: E402
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


#: Settings that the trainer takes as its own options (TrainOptions fields), not as model options.
TRAIN_OPTION_KEYS = frozenset({"lr", "batch_size", "channels", "image_size"})


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def _settings_text(settings: dict[str, Any]) -> str:
    """Settings as a stable text (part of a record's identity): sorted JSON, "" when none."""
    return json.dumps(settings, sort_keys=True) if settings else ""


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (
        r["protocol"],
        r["model"],
        _settings_text(r.get("settings") or {}),
        str(r["normal_class"]),
        r["epochs"],
        r["seed"],
        r.get("image_size"),
        r.get("revision", 1),  # records older than the field are revision 1
    )


def parse_sets(items: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """``MODEL.key=value`` items -> {model: {key: value}}; values parse as JSON when they can, else text.

    Exits with a one-line error for a malformed item or a model not in ``models``.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        model, dot, key = name.partition(".")
        if not sep or not dot or not model or not key:
            sys.exit(f"error: --set expects MODEL.key=value, got {item!r}")
        if model not in models:
            sys.exit(f"error: --set {item!r} names model {model!r}, which is not in --models {','.join(models)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(model, {})[key] = value
    return out


def _slug(settings: dict[str, Any]) -> str:
    """A folder-name-safe form of the settings ("" when none)."""
    if not settings:
        return ""
    text = "-".join(f"{k}={v}" for k, v in sorted(settings.items()))
    return "-" + "".join(c if c.isalnum() or c in "=._-" else "_" for c in text)


def _seconds_per_epoch(run: Path, fallback: float) -> float:
    """Mean wall time of every epoch in RUN/metrics.jsonl: all of a resumed run's epochs, and the
    right figure when this call trained nothing (the run was complete); ``fallback`` without it."""
    path = run / METRICS_FILE
    if not path.is_file():
        return fallback
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seconds = [float(e["seconds"]) for e in events if e.get("event") == "epoch" and "seconds" in e]
    return sum(seconds) / len(seconds) if seconds else fallback


def _probe(
    protocol: str, model: str, normal_class: str, settings: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The identity of one benchmark run (what the results cache compares)."""
    image_size = build_config(model, **{"image_size": args.image_size, **settings}).image_size
    probe: dict[str, Any] = {
        "protocol": protocol,
        "model": model,
        "normal_class": normal_class,
        "epochs": args.epochs,
        "seed": args.seed,
        "image_size": image_size,
        "revision": model_class(model).revision,
    }
    if settings:
        probe["settings"] = settings
    return probe


def run_one(probe: dict[str, Any], data: Path, work: Path, args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Train and evaluate one (model, settings, normal class); returns the record (runs in a worker with --jobs)."""
    protocol, model, normal_class = probe["protocol"], probe["model"], probe["normal_class"]
    settings = probe.get("settings") or {}
    image_size = probe["image_size"]
    revision = f"-r{probe['revision']}" if probe["revision"] > 1 else ""  # never resume an older model's run
    name = f"{model}{revision}{_slug(settings)}-{normal_class}-{image_size}px-e{args.epochs}-s{args.seed}"
    run = work / "runs" / protocol / name
    t0 = time.time()
    result = train(
        TrainOptions(
            model=model,
            data=data,
            out=run,
            epochs=args.epochs,
            batch_size=settings.get("batch_size", args.batch_size),
            image_size=image_size,
            channels=settings.get("channels"),
            lr=settings.get("lr"),
            device=args.device,
            seed=args.seed,
            # lr, batch_size, channels and image_size are the trainer's own options, not model options
            model_options={k: v for k, v in settings.items() if k not in TRAIN_OPTION_KEYS},
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
        "n_report_apart": metrics.get("n_report_apart") or None,
        "checkpoint_epoch": metrics["epoch"],
        "seconds_per_epoch": _seconds_per_epoch(run, result.seconds_per_epoch),
        "batch_size": json.loads((run / "config.json").read_text())["batch_size"],
        "inference_ms_per_image": 1000.0 / metrics["images_per_s"],
        "device": result.device,
        "machine": _machine(),
        "commit": _commit(),
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
    }
    shown = model + (f"[{_slug(settings)[1:]}]" if settings else "")
    print(
        f"{protocol} {shown} {normal_class}: auroc {record['auroc']:.4f} (checkpoint epoch "
        f"{record['checkpoint_epoch']}, {time.time() - t0:.0f} s, {record['seconds_per_epoch']:.2f} s/epoch)",
        flush=True,
    )
    return record


def _prepare(protocol: str, name: str, args: argparse.Namespace) -> Path:
    """The data folder of one normal class (MNIST digit, ELPV cell type) or industrial data set, laid out."""
    if protocol == "mnist-oneclass":
        data = args.work / "data" / f"mnist-{name}"
        prepare("mnist", data, normal_class=name)
    elif protocol == "elpv":
        data = args.work / "data" / f"elpv-{name}-s{args.seed}"
        prepare("elpv", data, cell_type=name, seed=args.seed)
    else:
        data = args.data_root / name
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["mnist-oneclass", "industrial", "elpv"])
    p.add_argument("--models", default="ae,ganomaly")
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="mnist-oneclass: the normal digits")
    p.add_argument("--datasets", default="mvtec_bottle,bsdata_pitting,magnetic_tile", help="industrial: folders")
    p.add_argument("--cell-types", default="mono,poly,all", help="elpv: mono, poly, all")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="MODEL.key=value",
        help="one setting of one model's config, e.g. --set ede.variant=one_ede (repeatable)",
    )
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, each in its own process")
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "work")
    p.add_argument("--results", type=Path, required=True)
    args = p.parse_args()
    if args.jobs < 1:
        sys.exit("error: --jobs must be >= 1")

    records = _load(args.results)
    models = [m for m in args.models.split(",") if m]
    sets = parse_sets(args.sets, models)
    classes = {
        "mnist-oneclass": args.digits,
        "industrial": args.datasets,
        "elpv": args.cell_types,
    }[args.protocol].split(",")
    command = _command(args)

    todo: list[tuple[dict[str, Any], str]] = []
    for name in [c for c in classes if c]:
        for model in models:
            probe = _probe(args.protocol, model, name, sets.get(model, {}), args)
            if any(_key(r) == _key(probe) for r in records):
                print(f"cached: {args.protocol} {model}{_slug(sets.get(model, {}))} {name}", flush=True)
            else:
                todo.append((probe, name))

    def save(record: dict[str, Any]) -> None:
        records.append(record)
        order = sorted(
            records, key=lambda r: (r["model"], _settings_text(r.get("settings") or {}), str(r["normal_class"]))
        )
        write_json_atomic(args.results, order)

    failed = 0
    if args.jobs == 1:
        for probe, name in todo:
            save(run_one(probe, _prepare(args.protocol, name, args), args.work, args, command))
    else:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            names = sorted({name for _, name in todo})
            prepared = pool.map(_prepare, [args.protocol] * len(names), names, [args] * len(names))
            folders = dict(zip(names, prepared, strict=True))
            futures: dict[Future[dict[str, Any]], dict[str, Any]] = {
                pool.submit(run_one, probe, folders[name], args.work, args, command): probe for probe, name in todo
            }
            for fut in as_completed(futures):
                try:
                    save(fut.result())
                except Exception as exc:  # one failed run must not lose the others
                    failed += 1
                    probe = futures[fut]
                    print(f"FAILED: {probe['model']} {probe.get('settings') or ''} {probe['normal_class']}: {exc!r}")
    if failed:
        sys.exit(f"error: {failed} run(s) failed")


if __name__ == "__main__":
    main()
