#!/usr/bin/env python3
"""Generate docs/benchmarks.md from the results files docs/results/*.json (never type the tables).

Usage::

    python scripts/make_benchmarks.py [--results docs/results] [--out docs/benchmarks.md]
                                      [--notes docs/benchmarks_notes] [--check]

Each results file is a JSON list of records, one per (protocol, model, normal_class). Required keys:

    protocol (str: "mnist-oneclass", "industrial", "elpv", ...; lower-case letters, digits, ".", "_", "-")
    model (str)   normal_class (str, or int for MNIST digits)
    auroc (number in [0, 1])   max_balanced_accuracy (number in [0, 1])
    epochs (int >= 0)   seconds_per_epoch (number >= 0, seconds of wall time per training epoch)
    seed (int)   device (str, e.g. "cuda:0 (H100)" or "cpu")   commit (str, git commit of the code)

Optional keys (null = not recorded, the same as leaving the key out): per_defect_auroc ({defect:
number in [0, 1]}), pixel_auroc (number in [0, 1]), image_size (int, or [height, width], pixels),
batch_size (int), inference_ms_per_image (number, milliseconds), n_normal, n_anomalous,
n_report_apart (ints: test-set sizes), command (str: the command that produced the record),
machine (str), date (ISO 8601 date or date-time; no time zone = UTC), settings ({key: string,
number, boolean or null}: the model settings that differ from its defaults, e.g. {"variant":
"one_ede"}), checkpoint_epoch (int >= 0: the epoch of the checkpoint evaluated), revision (int >= 1:
the model's revision, trainer/models; missing = 1). Any other key is an error (it is most likely a
misspelling).

Settings make a distinct row: a record with settings is shown, and identified, as the model
``MODEL[key=value,...]`` (keys sorted), e.g. ``ede[variant=one_ede]`` beside ``ede``. So does a
model's revision, but only where the quality results (not throughput or streaming) hold several
revisions of that model, in any protocol: then every quality row of it is named ``MODEL@rN``
(``oclr@r1`` beside ``oclr@r2``, and ``cbigan[mode=texture]@r1`` on a protocol not yet re-run),
since an older revision's figures belong to code that no longer exists. So does a budget, where
a protocol holds one model (with its settings and revision) at several (image size, epochs): then
each such row is named ``MODEL (64 px, 20 epochs)``, so that a short CPU run and a full GPU run
of the same model stand side by side instead of the newer hiding the other.

Duplicates: when several records share (protocol, model with settings, normal_class, seed) (normal_class
compared as text, so 3 and "3" are the same), the one with the latest "date" wins; a record without
a date is older than any dated one; equal dates go to the later file (by file name), then the later
index.

Seeds: records that differ only in their seed are repeats of one experiment, not duplicates. The
one-class MNIST table shows, per digit, the mean over the seeds and their sample standard deviation
("0.932 ± 0.010"; a cell without ± holds one seed), the mean AUROC over the digits' means, and a
"seeds" column; the per-record tables (industrial, ELPV, ...) show one row per seed with a "seed"
column, when any of their records repeat with another seed.

The page: a generated-file header naming this command; then one section per protocol ("mnist-oneclass",
"industrial", "elpv" first, any other protocol after them in name order), each with the hand-written
prose of <notes>/<protocol>.md if that file exists, the table, and the distinct commands, machines,
devices and commits of its records. Figures have 3 decimals; rows are sorted; output is deterministic.

Exit codes: 0 written (or, with --check, up to date); 1 with --check when the page on disk differs from
what would be generated (or is missing); 2 bad input (a missing folder, invalid JSON, a bad record:
every problem is printed as one line naming the file and record index, no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "docs" / "results"
DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
DEFAULT_NOTES = REPO / "docs" / "benchmarks_notes"
SCRIPT = "scripts/make_benchmarks.py"

#: Protocols shown first, in this order; any other protocol follows in name order.
PROTOCOL_ORDER: tuple[str, ...] = ("mnist-oneclass", "industrial", "elpv", "backend-cpu", "streaming")
PROTOCOL_TITLES: dict[str, str] = {
    "backend-cpu": "CPU throughput of the deployment graph (ONNX Runtime vs torch eager)",
    "streaming": "the daemon on a video at full speed, against the raw backend and a minimal loop",
    "mnist-oneclass": "One-class MNIST",
    "industrial": "Industrial folders (MVTec layout)",
    "elpv": "ELPV solar cells",
}
PROTOCOL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MNIST_DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
DASH = "–"


class InputError(Exception):
    """Bad input (exit code 2); ``lines`` are the messages, one problem per line."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _nonempty_str(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return "must be a non-empty string"
    return None


def _unit_interval(v: Any) -> str | None:
    if not _is_number(v):
        return "must be a finite number"
    if not 0.0 <= v <= 1.0:
        return f"must be in [0, 1], got {v}"
    return None


def _nonneg_number(v: Any) -> str | None:
    if not _is_number(v):
        return "must be a finite number"
    if v < 0:
        return f"must be >= 0, got {v}"
    return None


def _int_at_least(lo: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return "must be an integer"
        if v < lo:
            return f"must be >= {lo}, got {v}"
        return None

    return check


def _any_int(v: Any) -> str | None:
    return None if _is_int(v) else "must be an integer"


def _protocol(v: Any) -> str | None:
    if not isinstance(v, str) or not PROTOCOL_RE.match(v):
        return 'must be a lower-case name of letters, digits, ".", "_", "-" (e.g. "mnist-oneclass")'
    return None


def _normal_class(v: Any) -> str | None:
    if _is_int(v):
        return None
    return _nonempty_str(v)


def _budget(rec: dict[str, Any]) -> tuple[str, str]:
    """(image size, epochs) of a quality record as text: "64" or "64x48" (height x width), "?" if absent."""
    size = rec.get("image_size")
    size_text = "?" if size is None else "x".join(map(str, size)) if isinstance(size, list) else str(size)
    return size_text, str(rec["epochs"])


def _image_size(v: Any) -> str | None:
    if _is_int(v) and v > 0:
        return None
    if isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return None
    return "must be a positive integer or [height, width]"


def _per_defect(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "must be an object {defect: AUROC}"
    for name, x in v.items():
        if not name.strip():
            return "has an empty defect name"
        problem = _unit_interval(x)
        if problem:
            return f"[{name!r}] {problem}"
    return None


def _parse_date(v: str) -> datetime:
    """ISO 8601 date or date-time -> aware datetime (no zone = UTC). ValueError if unparseable."""
    text = v.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _settings(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "must be an object {setting: value}"
    for name, x in v.items():
        if not name.strip():
            return "has an empty setting name"
        if x is not None and not isinstance(x, (str, int, float, bool)):
            return f"[{name!r}] must be a string, number, boolean or null"
    return None


def _date(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be an ISO 8601 date string (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
    try:
        _parse_date(v)
    except ValueError:
        return "must be an ISO 8601 date (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
    return None


REQUIRED: dict[str, Callable[[Any], str | None]] = {
    "protocol": _protocol,
    "model": _nonempty_str,
    "normal_class": _normal_class,
    "auroc": _unit_interval,
    "max_balanced_accuracy": _unit_interval,
    "epochs": _int_at_least(0),
    "seconds_per_epoch": _nonneg_number,
    "seed": _any_int,
    "device": _nonempty_str,
    "commit": _nonempty_str,
}
OPTIONAL: dict[str, Callable[[Any], str | None]] = {
    "per_defect_auroc": _per_defect,
    "pixel_auroc": _unit_interval,
    "image_size": _image_size,
    "batch_size": _int_at_least(1),
    "inference_ms_per_image": _nonneg_number,
    "n_normal": _int_at_least(0),
    "n_anomalous": _int_at_least(0),
    "n_report_apart": _int_at_least(0),
    "command": _nonempty_str,
    "machine": _nonempty_str,
    "date": _date,
    "settings": _settings,
    "checkpoint_epoch": _int_at_least(0),
    "revision": _int_at_least(1),
}


# Throughput records (scripts/bench_backends.py) measure speed, not detection: their own keys.
THROUGHPUT_PROTOCOLS = frozenset({"backend-cpu"})
THROUGHPUT_REQUIRED: dict[str, Callable[[Any], str | None]] = {
    "protocol": _protocol,
    "model": _nonempty_str,
    "normal_class": _nonempty_str,  # the deployment shape, e.g. "128px-3ch"
    "image_size": _image_size,
    "torch_images_per_s_b1": _nonneg_number,
    "torch_images_per_s_b8": _nonneg_number,
    "ort_images_per_s_b1": _nonneg_number,
    "ort_images_per_s_b8": _nonneg_number,
    "export_seconds": _nonneg_number,
    "onnx_bytes": _int_at_least(0),
    "device": _nonempty_str,
    "commit": _nonempty_str,
}
THROUGHPUT_OPTIONAL: dict[str, Callable[[Any], str | None]] = {
    "command": _nonempty_str,
    "machine": _nonempty_str,
    "date": _date,
}


# Streaming records (scripts/bench_streaming.py): the daemon's pipeline against two baselines in the same run.
STREAMING_PROTOCOLS = frozenset({"streaming"})
STREAMING_REQUIRED: dict[str, Callable[[Any], str | None]] = {
    "protocol": _protocol,
    "model": _nonempty_str,
    "normal_class": _nonempty_str,  # the configuration, e.g. "4 camera(s), 2 worker(s)"
    "cameras": _int_at_least(1),
    "workers": _int_at_least(1),
    "image_size": _image_size,
    "daemon_fps": _nonneg_number,
    "loop_fps": _nonneg_number,
    "raw_fps": _nonneg_number,
    "daemon_cores": _nonneg_number,
    "loop_cores": _nonneg_number,
    "latency_p50_ms": _nonneg_number,
    "latency_p99_ms": _nonneg_number,
    "rss_mb": _nonneg_number,
    "device": _nonempty_str,
    "commit": _nonempty_str,
}
STREAMING_OPTIONAL: dict[str, Callable[[Any], str | None]] = {
    **THROUGHPUT_OPTIONAL,
    "frames_per_run": _int_at_least(0),
    "repeats": _int_at_least(1),
    "dropped": _int_at_least(0),
    "daemon_vs_loop": _nonneg_number,
    "daemon_vs_raw": _nonneg_number,
    "daemon_vs_loop_per_core": _nonneg_number,
    "raw_worker_fps": _nonneg_number,  # the raw backend at one worker's batch, ceil(cameras / workers)
}


def _schema(
    rec: dict[str, Any],
) -> tuple[dict[str, Callable[[Any], str | None]], dict[str, Callable[[Any], str | None]]]:
    """(required, optional) key checks for this record's protocol."""
    if rec.get("protocol") in THROUGHPUT_PROTOCOLS:
        return THROUGHPUT_REQUIRED, THROUGHPUT_OPTIONAL
    if rec.get("protocol") in STREAMING_PROTOCOLS:
        return STREAMING_REQUIRED, STREAMING_OPTIONAL
    return REQUIRED, OPTIONAL


def validate_record(rec: Any) -> list[str]:
    """Return the problems of one record (empty list = valid), each naming the key concerned."""
    if not isinstance(rec, dict):
        return [f"must be a JSON object, got {type(rec).__name__}"]
    problems: list[str] = []
    required, optional = _schema(rec)
    for key, check in required.items():
        if key not in rec:
            problems.append(f"missing required key {key!r}")
            continue
        problem = check(rec[key])
        if problem:
            problems.append(f"key {key!r} {problem} (got {rec[key]!r})")
    for key, check in optional.items():
        if rec.get(key) is not None:
            problem = check(rec[key])
            if problem:
                problems.append(f"key {key!r} {problem} (got {rec[key]!r})")
    unknown = sorted(set(rec) - set(required) - set(optional))
    for key in unknown:
        problems.append(f"unknown key {key!r} (allowed: {', '.join(sorted({**required, **optional}))})")
    if not problems and rec["protocol"] == "mnist-oneclass" and str(rec["normal_class"]) not in MNIST_DIGITS:
        got = rec["normal_class"]
        problems.append(f"key 'normal_class' must be a digit 0..9 for mnist-oneclass (got {got!r})")
    return problems


@dataclass(frozen=True)
class Record:
    """One validated results record and where it came from (file name, index in that file's list)."""

    data: dict[str, Any]
    file: str
    index: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(protocol, model, normal_class as text, seed as text): the identity of a benchmark figure."""
        return (self.data["protocol"], self.data["model"], str(self.data["normal_class"]), str(self.data.get("seed")))

    @property
    def normal_class(self) -> str:
        return str(self.data["normal_class"])

    def recency(self, file_rank: int) -> tuple[int, datetime, int, int]:
        """Sort key: undated first, then by date, then file order, then index (last = newest)."""
        date = self.data.get("date")
        if date is None:
            return (0, datetime.min.replace(tzinfo=timezone.utc), file_rank, self.index)
        return (1, _parse_date(date), file_rank, self.index)


def _display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it, else absolute, with forward slashes."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(REPO).as_posix()
    except ValueError:
        return resolved.as_posix()


def _settings_label(settings: dict[str, Any]) -> str:
    """``key=value`` pairs, keys sorted, comma-separated; text as is, other values as JSON."""
    return ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(settings.items()))


def load_records(results_dir: Path) -> tuple[list[Record], int]:
    """Read and validate every ``*.json`` in ``results_dir``; keep the newest record of each key.

    Returns:
        (the kept records, how many records were superseded by a newer one with the same key).

    Raises:
        InputError: the folder is missing, a file is not valid JSON or not a list, or any record is
            invalid (all problems are collected, one line each, naming file and record index).
    """
    if not results_dir.is_dir():
        raise InputError([f"results folder {_display_path(results_dir)} does not exist"])
    files = sorted(results_dir.glob("*.json"), key=lambda p: p.name)
    errors: list[str] = []
    records: list[tuple[int, Record]] = []
    for rank, path in enumerate(files):
        shown = _display_path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{shown}: cannot read: {exc}")
            continue
        except json.JSONDecodeError as exc:
            errors.append(f"{shown}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
            continue
        if not isinstance(content, list):
            errors.append(f"{shown}: must hold a JSON list of records, got {type(content).__name__}")
            continue
        for i, rec in enumerate(content):
            problems = validate_record(rec)
            errors.extend(f"{shown}: record {i}: {p}" for p in problems)
            if not problems:
                # An optional key set to null means "not recorded": drop it.
                kept = {k: v for k, v in rec.items() if v is not None or k in _schema(rec)[0]}
                records.append((rank, Record(kept, path.name, i)))
    if errors:
        raise InputError(errors)
    # Revisions concern what a model computes, so only detection-quality records are told apart by
    # them (throughput and streaming figures depend on the graph, which a fix usually leaves alone).
    quality = {id(rec): rec for _, rec in records if _schema(rec.data)[0] is REQUIRED}
    revisions: dict[str, set[int]] = {}
    for rec in quality.values():
        revisions.setdefault(rec.data["model"], set()).add(rec.data.get("revision", 1))
    for _, rec in records:
        name = rec.data["model"]
        if rec.data.get("settings"):
            # The settings are part of the model's identity: "ede[variant=one_ede]".
            rec.data["model"] = f"{name}[{_settings_label(rec.data['settings'])}]"
        if id(rec) in quality and len(revisions[name]) > 1:
            rec.data["model"] += f"@r{rec.data.get('revision', 1)}"
    budgets: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for rec in quality.values():
        budgets.setdefault((rec.data["protocol"], rec.data["model"]), set()).add(_budget(rec.data))
    for rec in quality.values():
        if len(budgets[(rec.data["protocol"], rec.data["model"])]) > 1:
            size, epochs = _budget(rec.data)
            rec.data["model"] += f" ({size} px, {epochs} epochs)"
    newest: dict[tuple[str, str, str, str], tuple[int, Record]] = {}
    for rank, rec in records:
        held = newest.get(rec.key)
        if held is None or rec.recency(rank) > held[1].recency(held[0]):
            newest[rec.key] = (rank, rec)
    return [rec for _, rec in newest.values()], len(records) - len(newest)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _f3(v: Any) -> str:
    """A figure with 3 decimals, or a dash when absent."""
    return DASH if v is None else f"{float(v):.3f}"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, one line)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


#: Table columns holding text (left-aligned); every other column holds numbers (right-aligned).
TEXT_COLUMNS = frozenset({"model", "dataset", "normal class", "device", "per-defect AUROC", "seeds"})


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table; text columns (:data:`TEXT_COLUMNS`) left-aligned, numbers right-aligned."""
    align = [":--" if h in TEXT_COLUMNS else "--:" for h in header]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _range_int(values: Iterable[int]) -> str:
    distinct = sorted(set(values))
    if not distinct:
        return DASH
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]}{DASH}{distinct[-1]}"


def _joined(values: Iterable[Any]) -> str:
    distinct = sorted({str(v) for v in values})
    return ", ".join(distinct) if distinct else DASH


def _per_defect_text(rec: Record) -> str:
    per = rec.data.get("per_defect_auroc") or {}
    return ", ".join(f"{name} {per[name]:.3f}" for name in sorted(per)) or DASH


def _has(records: Sequence[Record], key: str) -> bool:
    return any(r.data.get(key) is not None for r in records)


def _repeated_seeds(records: Sequence[Record]) -> bool:
    """True when some (model, normal_class) figure was measured with more than one seed."""
    seeds: dict[tuple[str, str], set[Any]] = {}
    for r in records:
        seeds.setdefault((r.data["model"], r.normal_class), set()).add(r.data.get("seed"))
    return any(len(s) > 1 for s in seeds.values())


def _mean_sd(values: Sequence[float]) -> str:
    """The mean with 3 decimals, and ``± sd`` (sample standard deviation) when there are several values."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mean_per_device(records: Sequence[Record], key: str) -> str:
    """The mean of ``key`` over ``records`` (3 decimals); when they ran on several devices, one mean per
    device ("1.446 cuda; 90.100 cpu"), since a timing averaged across devices means nothing."""
    by_device: dict[str, list[float]] = {}
    for r in records:
        if key in r.data:
            by_device.setdefault(str(r.data["device"]), []).append(float(r.data[key]))
    if len(by_device) <= 1:
        return _f3(_mean(next(iter(by_device.values()), [])))
    return "; ".join(f"{_f3(_mean(v))} {device}" for device, v in sorted(by_device.items()))


def _mnist_table(records: Sequence[Record]) -> list[str]:
    """Rows = models; columns = AUROC per normal digit (mean ± sd over seeds), mean AUROC, s/epoch, epochs,
    device, and the seeds when some figure was repeated with another seed."""
    with_ms = _has(records, "inference_ms_per_image")
    with_seeds = _repeated_seeds(records)
    header = ["model", *MNIST_DIGITS, "mean AUROC", "s/epoch", "epochs", "device"]
    if with_ms:
        header.insert(-1, "ms/image")
    if with_seeds:
        header.append("seeds")
    rows: list[list[str]] = []
    for model in sorted({r.data["model"] for r in records}):
        mine = [r for r in records if r.data["model"] == model]
        by_digit: dict[str, list[float]] = {}
        for r in mine:
            by_digit.setdefault(r.normal_class, []).append(float(r.data["auroc"]))
        digit_means = [statistics.fmean(by_digit[d]) for d in MNIST_DIGITS if d in by_digit]
        mean = _f3(_mean(digit_means))
        if len(digit_means) < len(MNIST_DIGITS):
            mean += f" ({len(digit_means)} of {len(MNIST_DIGITS)})"
        row = [
            model,
            *(_mean_sd(by_digit[d]) if d in by_digit else DASH for d in MNIST_DIGITS),
            mean,
            _mean_per_device(mine, "seconds_per_epoch"),
            _range_int(r.data["epochs"] for r in mine),
            _joined(r.data["device"] for r in mine),
        ]
        if with_ms:
            row.insert(-1, _mean_per_device(mine, "inference_ms_per_image"))
        if with_seeds:
            row.append(", ".join(str(seed) for seed in sorted({r.data["seed"] for r in mine})))
        rows.append(row)
    lines = _table(header, rows)
    lines += [
        "",
        "Cells: image AUROC with that digit as the normal class (the nine others anomalous). "
        'mean AUROC: over the 10 digits ("k of 10" when some are missing: not comparable). '
        "s/epoch: mean over the digits' runs (per device when a row ran on several).",
    ]
    if with_seeds:
        lines[-1] += (
            " A cell with ± is the mean ± sample standard deviation over the seeds that ran that digit (a cell "
            "without it: one seed); the mean AUROC is over the digits' means; seeds: those of any of the row's cells."
        )
    return lines


def _industrial_table(records: Sequence[Record]) -> list[str]:
    """Rows = (dataset = normal_class, model); image/pixel figures, training cost, the device the row ran on
    (its s/epoch and ms/image compare only with rows of the same device), per-defect AUROC."""
    with_ms = _has(records, "inference_ms_per_image")
    header = [
        "dataset",
        "model",
        "image AUROC",
        "max bal. acc.",
        "pixel AUROC",
        "test normal/anomalous",
        "epochs",
        "s/epoch",
    ]
    if with_ms:
        header.append("ms/image")
    header += ["device", "per-defect AUROC"]
    with_seeds = _repeated_seeds(records)
    if with_seeds:
        header.insert(2, "seed")
    rows: list[list[str]] = []
    for rec in sorted(records, key=lambda r: (r.normal_class, r.data["model"], r.data["seed"])):
        d = rec.data
        counts = f"{d['n_normal']}/{d['n_anomalous']}" if "n_normal" in d and "n_anomalous" in d else DASH
        row = [
            rec.normal_class,
            d["model"],
            *([str(d["seed"])] if with_seeds else []),
            _f3(d["auroc"]),
            _f3(d["max_balanced_accuracy"]),
            _f3(d.get("pixel_auroc")),
            counts,
            str(d["epochs"]),
            _f3(d["seconds_per_epoch"]),
        ]
        if with_ms:
            row.append(_f3(d.get("inference_ms_per_image")))
        row += [d["device"], _per_defect_text(rec)]
        rows.append(row)
    return _table(header, rows)


def _generic_table(records: Sequence[Record]) -> list[str]:
    """Rows = (normal_class, model); every figure the records carry."""
    with_pixel = _has(records, "pixel_auroc")
    with_defects = _has(records, "per_defect_auroc")
    with_counts = _has(records, "n_normal") or _has(records, "n_anomalous")
    with_ms = _has(records, "inference_ms_per_image")
    with_seeds = _repeated_seeds(records)
    header = ["normal class", "model", *(["seed"] if with_seeds else []), "AUROC", "max bal. acc."]
    header += ["pixel AUROC"] if with_pixel else []
    header += ["test normal/anomalous"] if with_counts else []
    header += (["image px"] if _has(records, "image_size") else []) + ["epochs", "s/epoch"]
    header += (["ms/image"] if with_ms else []) + ["device"]
    header += ["per-defect AUROC"] if with_defects else []
    rows: list[list[str]] = []
    for rec in sorted(records, key=lambda r: (r.normal_class, r.data["model"], r.data["seed"])):
        d = rec.data
        row = [rec.normal_class, d["model"], *([str(d["seed"])] if with_seeds else [])]
        row += [_f3(d["auroc"]), _f3(d["max_balanced_accuracy"])]
        if with_pixel:
            row.append(_f3(d.get("pixel_auroc")))
        if with_counts:
            row.append(f"{d.get('n_normal', DASH)}/{d.get('n_anomalous', DASH)}")
        if _has(records, "image_size"):
            row.append(_budget(d)[0] if d.get("image_size") is not None else DASH)
        row += [str(d["epochs"]), _f3(d["seconds_per_epoch"])]
        if with_ms:
            row.append(_f3(d.get("inference_ms_per_image")))
        row.append(d["device"])
        if with_defects:
            row.append(_per_defect_text(rec))
        rows.append(row)
    return _table(header, rows)


def _throughput_table(records: Sequence[Record]) -> list[str]:
    """Rows = (model, deployment shape): images/s of torch eager and ONNX Runtime at batch 1 and 8."""
    header = ["model", "shape", "torch b1", "ORT b1", "ORT/torch b1", "torch b8", "ORT b8", "ORT/torch b8"]
    header += ["export s", "ONNX MB", "device"]
    rows: list[list[str]] = []
    for rec in sorted(records, key=lambda r: (r.data["model"], r.data["image_size"], r.normal_class)):
        d = rec.data
        row = [d["model"], rec.normal_class]
        for b in (1, 8):
            torch_ips, ort_ips = d[f"torch_images_per_s_b{b}"], d[f"ort_images_per_s_b{b}"]
            row += [f"{torch_ips:.1f}", f"{ort_ips:.1f}", f"{ort_ips / torch_ips:.2f}x" if torch_ips else DASH]
        row += [f"{d['export_seconds']:.2f}", f"{d['onnx_bytes'] / 1e6:.1f}", d["device"]]
        rows.append(row)
    return _table(header, rows) + [
        "",
        "Cells: images/s, best of 3 windows of at least 1 s; the same random inputs for both backends in the same run.",
    ]


def _streaming_table(records: Sequence[Record]) -> list[str]:
    """Rows = (model, cameras x workers): frames/s of the daemon, the minimal loop and the raw backend."""
    header = ["model", "px", "cameras", "workers", "daemon fps", "loop fps", "raw fps", "raw fps, worker batch"]
    header += ["daemon/loop"]
    header += ["daemon/loop per core", "daemon cores", "p50 ms", "p99 ms", "RSS MB"]
    rows: list[list[str]] = []
    for rec in sorted(records, key=lambda r: (r.data["model"], r.data["cameras"], r.data["workers"])):
        d = rec.data
        per_core = (d["daemon_fps"] / d["daemon_cores"]) / (d["loop_fps"] / d["loop_cores"]) if d["daemon_cores"] else 0
        rows.append(
            [
                d["model"],
                str(d["image_size"]),
                str(d["cameras"]),
                str(d["workers"]),
                f"{d['daemon_fps']:.0f}",
                f"{d['loop_fps']:.0f}",
                f"{d['raw_fps']:.0f}",
                f"{d['raw_worker_fps']:.0f}" if "raw_worker_fps" in d else "-",
                f"{d['daemon_fps'] / d['loop_fps']:.2f}x",
                f"{per_core:.2f}x",
                f"{d['daemon_cores']:.2f}",
                f"{d['latency_p50_ms']:.1f}",
                f"{d['latency_p99_ms']:.1f}",
                f"{d['rss_mb']:.0f}",
            ]
        )
    return _table(header, rows) + [
        "",
        "Cells: medians of the runs; fps = frames scored per second of wall time (all cameras together); cores = "
        "CPU-seconds per second; latency = capture to outbox, per frame; raw fps = ONNX Runtime alone with all "
        "cameras' frames in one call, and at one worker's batch (its share of the cameras): workers x that is the "
        "most the daemon could score.",
    ]


def _provenance(records: Sequence[Record]) -> list[str]:
    """How to reproduce a section: distinct commands, machines, devices, commits, source files."""
    lines: list[str] = []
    commands = sorted({r.data["command"] for r in records if "command" in r.data})
    missing = sum(1 for r in records if "command" not in r.data)
    lines.append("Commands that produced these figures:")
    lines.append("")
    if commands:
        lines.append("```sh")
        lines += [c.rstrip() for c in commands]
        lines.append("```")
    if missing:
        if commands:
            lines.append("")
        lines.append(f"({missing} record(s) carry no command.)")
    lines.append("")
    machines = sorted({r.data["machine"] for r in records if "machine" in r.data})
    lines.append(f"- Machines: {'; '.join(_cell(m) for m in machines) if machines else DASH}")
    lines.append(f"- Devices: {_joined(r.data['device'] for r in records)}")
    lines.append(f"- Commits: {_joined(r.data['commit'] for r in records)}")
    dates = sorted({r.data["date"] for r in records if "date" in r.data})
    if dates:
        lines.append(f"- Dates: {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else ""))
    lines.append(f"- Results files: {', '.join(sorted({r.file for r in records}))}")
    return lines


def _protocol_sort_key(protocol: str) -> tuple[int, int, str]:
    if protocol in PROTOCOL_ORDER:
        return (0, PROTOCOL_ORDER.index(protocol), protocol)
    return (1, 0, protocol)


def _read_notes(notes_dir: Path, protocol: str) -> str:
    """The stripped text of ``notes_dir/<protocol>.md`` ("" when absent); InputError if unreadable."""
    notes = notes_dir / f"{protocol}.md"
    if not notes.is_file():
        return ""
    try:
        return notes.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([f"{_display_path(notes)}: cannot read notes: {exc}"]) from exc


def render(records: Sequence[Record], notes_dir: Path, command: str, results_shown: str) -> str:
    """The whole page as text (ends with one newline). Deterministic for the same inputs.

    Raises:
        InputError: a notes file exists but cannot be read as UTF-8 text.
    """
    out: list[str] = [
        "<!-- GENERATED FILE: do not edit by hand. Regenerate with: " + command + " -->",
        "",
        "# Benchmarks",
        "",
        f"This page is generated by `{command}` from the results files `{results_shown}/*.json`; "
        "do not edit it by hand (`--check` fails when it is stale). Commentary belongs in "
        f"`{_display_path(notes_dir)}/<protocol>.md`, which is inserted under that protocol's heading.",
        "",
        "AUROC and max balanced accuracy are image-level and computed on the test split only; the "
        "balanced-accuracy threshold is an oracle chosen on that test set (a reporting figure, not "
        "the threshold a bundle ships). Figures have 3 decimals.",
    ]
    if not records:
        out += ["", "No results recorded yet."]
    for protocol in sorted({r.data["protocol"] for r in records}, key=_protocol_sort_key):
        mine = [r for r in records if r.data["protocol"] == protocol]
        title = PROTOCOL_TITLES.get(protocol)
        out += ["", f"## {protocol}" + (f": {title}" if title else ""), ""]
        text = _read_notes(notes_dir, protocol)
        if text:
            out += [text, ""]
        if protocol == "mnist-oneclass":
            out += _mnist_table(mine)
        elif protocol == "industrial":
            out += _industrial_table(mine)
        elif protocol in THROUGHPUT_PROTOCOLS:
            out += _throughput_table(mine)
        elif protocol in STREAMING_PROTOCOLS:
            out += _streaming_table(mine)
        else:
            out += _generic_table(mine)
        out += [""] + _provenance(mine)
    return "\n".join(out).rstrip("\n") + "\n"


def _command_line(results: Path, out: Path, notes: Path) -> str:
    """The canonical command for the page header: default paths are left out."""
    parts = ["python", SCRIPT]
    if results.resolve() != DEFAULT_RESULTS:
        parts += ["--results", _display_path(results)]
    if out.resolve() != DEFAULT_OUT:
        parts += ["--out", _display_path(out)]
    if notes.resolve() != DEFAULT_NOTES:
        parts += ["--notes", _display_path(notes)]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 stale with --check, 2 bad input)."""
    parser = argparse.ArgumentParser(description="Generate docs/benchmarks.md from docs/results/*.json.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of results *.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown page to write")
    parser.add_argument(
        "--notes",
        type=Path,
        default=DEFAULT_NOTES,
        help="folder of hand-written <protocol>.md notes (optional)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the page on disk differs from what would be generated",
    )
    args = parser.parse_args(argv)

    command = _command_line(args.results, args.out, args.notes)
    try:
        records, superseded = load_records(args.results)
        text = render(records, args.notes, command, _display_path(args.results))
    except InputError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    out_shown = _display_path(args.out)
    summary = f"{len(records)} records" + (f", {superseded} superseded by newer ones" if superseded else "")
    if args.check:
        try:
            current = args.out.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            why = "is missing" if current is None else "is out of date"
            print(f"{out_shown} {why}: run {command}", file=sys.stderr)
            return 1
        print(f"{out_shown} is up to date ({summary})")
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {out_shown}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out_shown} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
