"""scripts/intensity_baseline.py on real data: the no-training yardstick of a benchmark folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "intensity_baseline.py"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_pitted_surfaces_are_darker(shared_data: Path) -> None:
    # Measured 0.696 at 128 px grey (docs/benchmarks_notes/elpv.md): pitting darkens the surface.
    out = run(shared_data / "bsdata_pitting", "--image-size", "128")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    darkness = float(line.split("darkness AUROC ")[1].split(",")[0])
    brightness = float(line.split("brightness AUROC ")[1].split(" ")[0])
    assert 0.65 < darkness < 0.75 and abs(darkness + brightness - 1) < 1e-3, line
    assert "(142 normal, 394 anomalous, 128 px, 1 ch)" in line


def test_a_test_set_of_one_class_is_refused_by_name(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "only-good"
    for split in ("train", "test"):
        (folder / split / "good").mkdir(parents=True)
        for p in sorted((shared_data / "bsdata_pitting" / "train" / "good").iterdir())[:3]:
            shutil.copy(p, folder / split / "good" / p.name)
    out = run(folder)
    assert out.returncode == 1 and out.stderr.strip().startswith("error:"), out.stderr
    assert "both normal and anomalous" in out.stderr and "Traceback" not in out.stderr
