"""CPU throughput of each model's deployment graph: ONNX Runtime against torch eager, same inputs, same run.

    python scripts/bench_backends.py --results docs/results/backend-cpu.json

For every registered model at its deployment size (industrial 128 px colour, ALCN at 256 px) and at
the one-class MNIST protocol's size (32 px grey, ALCN at its paper's 28 px; the AE's is the figure
DESIGN.md's hot-path facts quote), the script builds the model with its
default widths (untrained: weights do not change the cost), exports it with the exporter the
bundles use (trainer.export.export_onnx), and measures images/s at batch 1 and 8 for torch eager
(1 intra-op thread) and ONNX Runtime (the bundle runner: 1 intra-op thread, no spinning), each the
best of 3 timed windows of at least 1 s after warm-up. Single-threaded on purpose: DESIGN.md's
daemon runs one single-threaded worker per core. Also records the export time and ONNX size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.parity import onnxruntime_runner  # noqa: E402
from deploy.preprocess import InputSpec  # noqa: E402
from trainer.export import export_onnx  # noqa: E402
from trainer.models import build_config, build_model  # noqa: E402
from trainer.run_dir import write_json_atomic  # noqa: E402

# (model, image size, channels, extra settings): the sizes a production line deploys, and the one-class
# MNIST protocol's (the inference cost on CPU its table asks for).
CASES: list[tuple[str, int, int, dict[str, Any]]] = [
    ("ae", 32, 1, {}),
    ("ganomaly", 32, 1, {}),
    ("ede", 32, 1, {}),
    ("oclr", 32, 1, {}),
    ("cbigan", 32, 1, {"mode": "object"}),
    ("alcn", 28, 1, {}),
    ("ae", 128, 3, {}),
    ("ganomaly", 128, 3, {}),
    ("ede", 128, 3, {}),
    ("oclr", 128, 3, {}),
    ("cbigan", 128, 3, {"mode": "object"}),
    ("alcn", 256, 3, {"batch_size": 16}),
]
BATCHES = (1, 8)


def images_per_s(fn: Callable[[np.ndarray], Any], x: np.ndarray, min_seconds: float = 1.0) -> float:
    """Best of 3 windows of >= ``min_seconds`` each, after 2 warm-up calls."""
    for _ in range(2):
        fn(x)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < min_seconds:
            fn(x)
            n += len(x)
        best = max(best, n / elapsed)
    return best


def _torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], Any]:
    def run(a: np.ndarray) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(a))

    return run


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--models", default="", help="comma-separated subset (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    wanted = {m for m in args.models.split(",") if m}
    records: list[dict[str, Any]] = json.loads(args.results.read_text()) if args.results.is_file() else []
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for name, size, channels, extra in CASES:
        if wanted and name not in wanted:
            continue
        torch.manual_seed(0)
        model = build_model(name, build_config(name, image_size=size, channels=channels, **extra)).eval()
        spec = InputSpec(size, size, channels)
        x = np.random.default_rng(0).random((max(BATCHES), channels, size, size), dtype=np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            t0 = time.perf_counter()
            export_onnx(model, spec, onnx_path)
            export_s = time.perf_counter() - t0
            onnx_bytes = onnx_path.stat().st_size
            ort_run = onnxruntime_runner(onnx_path, intra_op_threads=1)
            figures: dict[str, float] = {}
            torch_run = _torch_runner(model)
            for b in BATCHES:
                figures[f"torch_images_per_s_b{b}"] = images_per_s(torch_run, x[:b])
                figures[f"ort_images_per_s_b{b}"] = images_per_s(ort_run, x[:b])
        record = {
            "protocol": "backend-cpu",
            "model": name,
            "normal_class": f"{size}px-{channels}ch",
            "image_size": size,
            **figures,
            "export_seconds": export_s,
            "onnx_bytes": onnx_bytes,
            "device": "cpu (1 thread)",
            "machine": machine,
            "commit": _commit(),
            "command": f"python scripts/bench_backends.py --results docs/results/{args.results.name}",
            "date": time.strftime("%Y-%m-%d"),
        }
        records = [r for r in records if (r["model"], r["normal_class"]) != (name, record["normal_class"])]
        records.append(record)
        write_json_atomic(args.results, sorted(records, key=lambda r: (r["model"], r["normal_class"])))
        shown = ", ".join(f"{k.replace('_images_per_s_', ' ')} {v:.1f}" for k, v in figures.items())
        print(f"{name} {size}px: {shown} img/s; export {export_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
