"""Tests of scripts/make_benchmarks.py, run as a subprocess the way a person or CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_benchmarks.py"


def _record(protocol: str, model: str, normal_class: Any, auroc: float, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "protocol": protocol,
        "model": model,
        "normal_class": normal_class,
        "auroc": auroc,
        "max_balanced_accuracy": 0.75,
        "epochs": 15,
        "seconds_per_epoch": 2.0,
        "seed": 0,
        "device": "cpu",
        "commit": "0123abc",
    }
    rec.update(extra)
    return rec


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--results",
        str(tmp / "results"),
        "--out",
        str(tmp / "bench.md"),
        "--notes",
        str(tmp / "notes"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=60)


def _row(text: str, *first_cells: str) -> list[str]:
    """The cells of the one table row whose leading cells are ``first_cells``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[: len(first_cells)] == list(first_cells):
                rows.append(cells)
    assert len(rows) == 1, f"expected one row starting {first_cells}, found {rows}"
    return rows[0]


def _header(text: str, first_cell: str) -> list[str]:
    return _row(text, first_cell)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """Two results files: ae on all 10 digits split across them, ganomaly on 3, one industrial record."""
    res = tmp_path / "results"
    res.mkdir()
    ae = [0.99, 0.98, 0.85, 0.87, 0.90, 0.80, 0.95, 0.92, 0.81, 0.93]
    a = [
        _record("mnist-oneclass", "ae", d, ae[d], command="edge-trainer train --model ae", date="2025-01-02")
        for d in range(5)
    ]
    a.append(
        _record(
            "industrial",
            "ae",
            "mvtec_bottle",
            0.9512,
            pixel_auroc=0.8844,
            n_normal=20,
            n_anomalous=63,
            per_defect_auroc={"contamination": 0.9, "broken_large": 0.99},
            machine="1x H100",
            device="cuda:0",
        )
    )
    b = [_record("mnist-oneclass", "ae", str(d), ae[d], date="2025-01-02") for d in range(5, 10)]
    b += [_record("mnist-oneclass", "ganomaly", d, 0.7 + d / 100) for d in (1, 2, 3)]
    (res / "a.json").write_text(json.dumps(a))
    (res / "b.json").write_text(json.dumps(b))
    return res


def test_tables_rows_and_mean(tmp_path: Path, results: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mnist-oneclass.md").write_text("Hand-written commentary on MNIST.\n")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()

    assert "do not edit" in text.lower()
    assert "scripts/make_benchmarks.py" in text.splitlines()[0]
    # Notes go under their protocol's heading, before the table.
    mnist_at = text.index("## mnist-oneclass")
    assert mnist_at < text.index("Hand-written commentary on MNIST.") < text.index("| model |")
    assert text.index("## mnist-oneclass") < text.index("## industrial")

    header = _header(text, "model")
    assert header[:11] == ["model", *[str(d) for d in range(10)]]
    assert header[11:15] == ["mean AUROC", "s/epoch", "epochs", "device"]
    ae = _row(text, "ae")
    assert ae[1:11] == ["0.990", "0.980", "0.850", "0.870", "0.900", "0.800", "0.950", "0.920", "0.810", "0.930"]
    assert ae[11] == "0.900"  # mean of the ten
    assert ae[12:15] == ["2.000", "15", "cpu"]
    gan = _row(text, "ganomaly")
    assert gan[1:11] == ["–", "0.710", "0.720", "0.730"] + ["–"] * 6
    assert gan[11] == "0.720 (3 of 10)"

    bottle = _row(text, "mvtec_bottle", "ae")
    assert bottle[2:5] == ["0.951", "0.750", "0.884"]
    assert "broken_large 0.990, contamination 0.900" in bottle
    assert "20/63" in bottle
    # Timings are only comparable on one device, so every industrial row names its own.
    assert _header(text, "dataset")[-2:] == ["device", "per-defect AUROC"]
    assert bottle[-2] == "cuda:0"
    # Provenance under the sections.
    assert "edge-trainer train --model ae" in text
    assert "1x H100" in text and "0123abc" in text and "cuda:0" in text


def test_output_is_deterministic_and_check(tmp_path: Path, results: Path) -> None:
    out = tmp_path / "bench.md"
    missing = _run(tmp_path, "--check")
    assert missing.returncode == 1 and "missing" in missing.stderr
    assert not out.exists()

    assert _run(tmp_path).returncode == 0
    first = out.read_text()
    assert _run(tmp_path).returncode == 0
    assert out.read_text() == first

    ok = _run(tmp_path, "--check")
    assert ok.returncode == 0, ok.stderr
    out.write_text(first.replace("0.990", "0.991"))
    stale = _run(tmp_path, "--check")
    assert stale.returncode == 1
    assert "out of date" in stale.stderr and "Traceback" not in stale.stderr
    assert out.read_text() == first.replace("0.990", "0.991")  # --check writes nothing

    # A new results file makes the page stale too.
    assert _run(tmp_path).returncode == 0
    (results / "c.json").write_text(json.dumps([_record("elpv", "ae", "mono", 0.66)]))
    assert _run(tmp_path, "--check").returncode == 1
    assert _run(tmp_path).returncode == 0
    assert _row(out.read_text(), "mono", "ae")[2] == "0.660"


def test_duplicate_key_latest_date_wins(tmp_path: Path, results: Path) -> None:
    # "0" and 0 are the same normal class; the record dated later wins whatever the file order.
    newer = _record("mnist-oneclass", "ae", "0", 0.5, date="2025-03-01T00:00:00Z")
    older = _record("mnist-oneclass", "ae", 0, 0.4, date="2024-12-31")
    (results / "0_newer.json").write_text(json.dumps([newer]))
    (results / "z_older.json").write_text(json.dumps([older]))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    ae = _row((tmp_path / "bench.md").read_text(), "ae")
    assert ae[1] == "0.500"


def test_bad_record_is_a_clear_error(tmp_path: Path, results: Path) -> None:
    bad = _record("industrial", "ae", "bsdata_pitting", 0.8)
    del bad["auroc"]
    typo = _record("industrial", "cbigan", "bsdata_pitting", 0.8, pixel_aurco=0.7)
    wrong_type = _record("industrial", "oclr", "bsdata_pitting", 0.8, epochs="15")
    (results / "bad.json").write_text(json.dumps([_record("elpv", "ae", "all", 0.6), bad, typo, wrong_type]))
    proc = _run(tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any("bad.json" in ln and "record 1" in ln and "'auroc'" in ln for ln in lines), lines
    assert any("bad.json" in ln and "record 2" in ln and "'pixel_aurco'" in ln for ln in lines), lines
    assert any("bad.json" in ln and "record 3" in ln and "'epochs'" in ln for ln in lines), lines
    assert not any("record 0" in ln for ln in lines)
    assert not (tmp_path / "bench.md").exists()


def test_invalid_json_and_missing_folder(tmp_path: Path, results: Path) -> None:
    (results / "broken.json").write_text('[{"protocol": "elpv",')
    proc = _run(tmp_path)
    assert proc.returncode == 2
    assert "broken.json" in proc.stderr and "invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr

    (results / "broken.json").write_text('{"protocol": "elpv"}')
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "list" in proc.stderr

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "x.md")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_mnist_normal_class_must_be_a_digit(tmp_path: Path, results: Path) -> None:
    (results / "c.json").write_text(json.dumps([_record("mnist-oneclass", "ae", "ten", 0.6)]))
    proc = _run(tmp_path)
    assert proc.returncode == 2
    assert "c.json: record 0" in proc.stderr and "normal_class" in proc.stderr


def test_null_optional_keys_mean_not_recorded(tmp_path: Path, results: Path) -> None:
    rec = _record(
        "industrial",
        "ae",
        "magnetic_tile",
        0.7,
        pixel_auroc=None,
        image_size=None,
        command=None,
        date=None,
        inference_ms_per_image=None,
    )
    (results / "c.json").write_text(json.dumps([rec]))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = _row((tmp_path / "bench.md").read_text(), "magnetic_tile", "ae")
    assert row[2:5] == ["0.700", "0.750", "–"]
    # A required key may not be null.
    (results / "c.json").write_text(json.dumps([_record("industrial", "ae", "magnetic_tile", 0.7, seed=None)]))
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "'seed'" in proc.stderr


def test_empty_results_folder(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "No results recorded yet." in (tmp_path / "bench.md").read_text()


def _throughput(model: str, shape: str, torch_b1: float, ort_b1: float, **extra: Any) -> dict[str, Any]:
    return {
        "protocol": "backend-cpu",
        "model": model,
        "normal_class": shape,
        "image_size": int(shape.split("px")[0]),
        "torch_images_per_s_b1": torch_b1,
        "torch_images_per_s_b8": 2 * torch_b1,
        "ort_images_per_s_b1": ort_b1,
        "ort_images_per_s_b8": 2 * ort_b1,
        "export_seconds": 0.5,
        "onnx_bytes": 2_000_000,
        "device": "cpu (1 thread)",
        "commit": "abc1234",
        **extra,
    }


def test_throughput_records_have_their_own_table_and_schema(tmp_path: Path, results: Path) -> None:
    (results / "backend.json").write_text(
        json.dumps([_throughput("ae", "32px-1ch", 200.0, 800.0), _throughput("ae", "128px-3ch", 10.0, 30.0)])
    )
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    assert "## backend-cpu" in text
    assert _row(text, "ae", "32px-1ch")[2:5] == ["200.0", "800.0", "4.00x"]
    assert _row(text, "ae", "128px-3ch")[5:8] == ["20.0", "60.0", "3.00x"]
    # A detection key on a throughput record is refused, and a missing figure is named.
    bad = _throughput("ae", "64px-3ch", 1.0, 2.0, auroc=0.9)
    del bad["ort_images_per_s_b8"]
    (results / "backend.json").write_text(json.dumps([bad]))
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'ort_images_per_s_b8'" in proc.stderr and "'auroc'" in proc.stderr


def test_settings_make_a_distinct_row(tmp_path: Path, results: Path) -> None:
    # ede with its defaults and two ablation variants: three rows, none superseding another.
    recs = [_record("mnist-oneclass", "ede", 0, 0.98, date="2025-01-02")]
    recs.append(_record("mnist-oneclass", "ede", 0, 0.95, settings={"variant": "ae"}, checkpoint_epoch=3))
    recs.append(_record("mnist-oneclass", "ede", 0, 0.96, settings={"variant": "one_ede", "lr": 0.001}))
    recs.append(_record("industrial", "cbigan", "magnetic_tile", 0.8, settings={"mode": "texture"}))
    recs.append(_record("mnist-oneclass", "oclr", 1, 0.9, settings={}))  # empty = the defaults
    (results / "c.json").write_text(json.dumps(recs))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    assert _row(text, "ede")[1] == "0.980"
    assert _row(text, "ede[variant=ae]")[1:3] == ["0.950", "–"]
    assert _row(text, "ede[lr=0.001,variant=one_ede]")[1] == "0.960"  # keys sorted, numbers as JSON
    assert _row(text, "magnetic_tile", "cbigan[mode=texture]")[2] == "0.800"
    assert _row(text, "oclr")[2] == "0.900"
    models = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ede")]
    assert models == ["ede", "ede[lr=0.001,variant=one_ede]", "ede[variant=ae]"]


def test_revisions_are_apart_only_where_several_exist(tmp_path: Path, results: Path) -> None:
    # oclr was fixed (revision 2) and re-run on digit 3 only: the old figures must not mix into the new
    # row, nor be superseded by a newer date; its industrial row, not re-run yet, is marked as the old
    # revision's. ganomaly (one revision) keeps its plain name.
    recs = [_record("mnist-oneclass", "oclr", d, 0.6, date="2025-01-02") for d in (1, 3)]
    recs.append(_record("mnist-oneclass", "oclr", 3, 0.9, revision=2, date="2025-02-02"))
    recs.append(_record("industrial", "oclr", "magnetic_tile", 0.7, settings={"k": 0}))
    recs.append(_throughput("oclr", "32px-1ch", 200.0, 800.0))  # speed, not quality: no revision mark
    (results / "c.json").write_text(json.dumps(recs))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    assert _row(text, "oclr@r1")[2:5] == ["0.600", "–", "0.600"]
    assert _row(text, "oclr@r2")[2:5] == ["–", "–", "0.900"]
    assert _row(text, "magnetic_tile", "oclr[k=0]@r1")[2] == "0.700"
    assert _row(text, "ganomaly")[2] == "0.710"
    assert _row(text, "oclr", "32px-1ch")[2] == "200.0"
    (results / "c.json").write_text(json.dumps([_record("elpv", "ae", "all", 0.6, revision=0)]))
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "'revision'" in proc.stderr and "Traceback" not in proc.stderr


def test_seeds_are_repeats_shown_as_mean_and_sd(tmp_path: Path, results: Path) -> None:
    # ede on digit 2 with seeds 0, 1, 2 and digit 3 with seed 0 only; a re-run of seed 1 with a later
    # date supersedes the first seed-1 record (same key), and the other seeds are not superseded.
    recs = [_record("mnist-oneclass", "ede", 2, a, seed=s) for a, s in ((0.90, 0), (0.70, 1), (0.94, 2))]
    recs.append(_record("mnist-oneclass", "ede", 2, 0.92, seed=1, date="2026-01-01", device="cuda"))
    recs.append(_record("mnist-oneclass", "ede", 3, 0.80, seed=0))
    recs += [_record("industrial", "ae", "magnetic_tile", a, seed=s) for a, s in ((0.7, 0), (0.6, 1))]
    (results / "c.json").write_text(json.dumps(recs))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    header = _header(text, "model")
    assert header[-1] == "seeds"
    ede = _row(text, "ede")
    assert ede[3] == "0.920 ± 0.020"  # digit 2: mean and sample sd of 0.90, 0.92, 0.94
    assert ede[4] == "0.800"  # digit 3: one seed, no ±
    assert ede[11] == "0.860 (2 of 10)"  # the mean of the digits' means
    assert ede[-1] == "0, 1, 2"
    assert ede[12] == "2.000 cpu; 2.000 cuda"  # s/epoch is never averaged across devices
    ae = _row(text, "ae")  # one seed only: the same figures as before, and the column is there
    assert ae[1] == "0.990" and ae[-1] == "0"
    assert _row(text, "magnetic_tile", "ae", "0")[3] == "0.700"
    assert _row(text, "magnetic_tile", "ae", "1")[3] == "0.600"
    # Without repeats there is no seeds column at all.
    (results / "c.json").unlink()
    assert _run(tmp_path).returncode == 0
    assert "seeds" not in _header((tmp_path / "bench.md").read_text(), "model")


def test_bad_settings_are_clear_errors(tmp_path: Path, results: Path) -> None:
    bad = [
        _record("elpv", "ae", "all", 0.6, settings="variant=ae"),
        _record("elpv", "ae", "mono", 0.6, settings={"variant": ["ae"]}),
        _record("elpv", "ae", "poly", 0.6, checkpoint_epoch=-1),
    ]
    (results / "c.json").write_text(json.dumps(bad))
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any("record 0" in ln and "'settings'" in ln for ln in lines), lines
    assert any("record 1" in ln and "'settings'" in ln for ln in lines), lines
    assert any("record 2" in ln and "'checkpoint_epoch'" in ln for ln in lines), lines


def test_streaming_records_have_their_own_table(tmp_path: Path, results: Path) -> None:
    rec = {
        "protocol": "streaming",
        "model": "ae",
        "normal_class": "4 camera(s), 2 worker(s)",
        "cameras": 4,
        "workers": 2,
        "image_size": 64,
        "daemon_fps": 300.0,
        "loop_fps": 200.0,
        "raw_fps": 210.0,
        "daemon_cores": 2.0,
        "loop_cores": 1.0,
        "latency_p50_ms": 12.5,
        "latency_p99_ms": 40.0,
        "rss_mb": 250.0,
        "device": "cpu",
        "commit": "abc1234",
    }
    (results / "streaming.json").write_text(json.dumps([rec]))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    assert "## streaming" in text
    section = text.split("## streaming", 1)[1]
    row = next(r for r in (ln.split("|") for ln in section.splitlines()) if len(r) > 5 and r[1].strip() == "ae")
    cells = [c.strip() for c in row[1:-1]]
    assert cells[4:10] == ["300", "200", "210", "-", "1.50x", "0.75x"]  # per core: (300 / 2) / (200 / 1)
    (results / "streaming.json").write_text(json.dumps([{**rec, "raw_worker_fps": 190.0}]))
    assert _run(tmp_path).returncode == 0
    section = (tmp_path / "bench.md").read_text().split("## streaming", 1)[1]
    row = next(r for r in (ln.split("|") for ln in section.splitlines()) if len(r) > 5 and r[1].strip() == "ae")
    assert [c.strip() for c in row[1:-1]][6:8] == ["210", "190"]  # all cameras in one call; one worker's batch
    del rec["rss_mb"]
    (results / "streaming.json").write_text(json.dumps([rec]))
    proc = _run(tmp_path)
    assert proc.returncode == 2 and "'rss_mb'" in proc.stderr


def test_budgets_are_apart_only_where_several_exist(tmp_path: Path, results: Path) -> None:
    # ELPV's ae ran short on a CPU (64 px, 20 epochs) and then in full (128 px, 100 epochs), newer: both
    # rows stay, named by their budget, rather than the newer hiding the older. ganomaly ran once: plain.
    recs = [
        _record("elpv", "ae", "all", 0.61, image_size=64, epochs=20, date="2025-01-02"),
        _record("elpv", "ae", "all", 0.72, image_size=128, epochs=100, date="2025-02-02"),
        _record("elpv", "ganomaly", "all", 0.55, image_size=64, epochs=20),
        _record("mnist-oneclass", "oclr", 3, 0.8, image_size=32, epochs=15),
        _record("mnist-oneclass", "oclr", 3, 0.9, image_size=32, epochs=60),
    ]
    (results / "c.json").write_text(json.dumps(recs))
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "bench.md").read_text()
    header = _header(text, "normal class")
    short = dict(zip(header, _row(text, "all", "ae (64 px, 20 epochs)"), strict=True))
    full = dict(zip(header, _row(text, "all", "ae (128 px, 100 epochs)"), strict=True))
    assert (short["AUROC"], short["image px"], short["epochs"]) == ("0.610", "64", "20")
    assert (full["AUROC"], full["image px"], full["epochs"]) == ("0.720", "128", "100")
    assert _row(text, "all", "ganomaly")[2] == "0.550"
    # On one-class MNIST the two budgets are two rows too, not two seeds of one figure.
    assert _row(text, "oclr (32 px, 15 epochs)")[4] == "0.800"
    assert _row(text, "oclr (32 px, 60 epochs)")[4] == "0.900"
    assert _row(text, "ae")[1] == "0.990"  # the fixture's records carry no image size: unchanged
