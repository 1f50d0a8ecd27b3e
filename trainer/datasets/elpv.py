"""ELPV solar-cell electroluminescence images laid out as an MVTec-style folder.

Source: the PyPI wheel ``elpv-dataset==1.0.0.post1`` (CC BY-NC-SA 4.0; fetched with
``pip download --no-deps``, sha256-pinned, never installed): 2,624 cells, 300x300 8-bit grey PNG,
each labelled in ``elpv_dataset/data/labels.csv`` with a defect probability (0, 1/3, 2/3, 1) and a
cell type (mono, poly). The PNG files are copied byte for byte from the wheel.

Protocol (DESIGN.md, "Benchmark protocols"): normal = probability 0; anomalous = probability
>= 2/3. Per cell type, a fixed seeded 80% of the normal cells (``numpy.random.default_rng(seed)``
permutation: mono first, then poly, always both so that a type's split does not depend on
``cell_type``) is ``train/good``; the other 20% is ``test/good``. ``test/defect_p067`` and
``test/defect_p100`` hold the anomalous cells; the uncertain cells (probability 1/3) go to
``test/uncertain_p033``, which ``dataset.json`` lists in ``report_apart``: overall metrics exclude
them and report them on their own. ``cell_type`` mono|poly keeps one type; "all" keeps both
(the union of the mono and poly folders, so the three runs are consistent).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from trainer.datasets import cache
from trainer.datasets.cache import PrepareReport
from trainer.errors import DatasetError, UserError

ELPV_REQUIREMENT = "elpv-dataset==1.0.0.post1"
ELPV_WHEEL = "elpv_dataset-1.0.0.post1-py3-none-any.whl"
ELPV_WHEEL_SHA256 = "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"
ELPV_DATA = "elpv_dataset/data/"
CELL_TYPES = ("mono", "poly", "all")
TRAIN_FRACTION = (4, 5)  # 80% of each type's normal cells, rounded down
FOLDER_BY_THIRDS = {0: "good", 1: "uncertain_p033", 2: "defect_p067", 3: "defect_p100"}
REPORT_APART = ["uncertain_p033"]


def check_cell_type(cell_type: str) -> str:
    """Return ``cell_type`` if it is mono, poly or all; else raise UserError."""
    if cell_type not in CELL_TYPES:
        raise UserError(f"invalid cell type {cell_type!r} for elpv: use one of {', '.join(CELL_TYPES)}")
    return cell_type


def read_labels(zf: zipfile.ZipFile) -> list[tuple[str, int, str]]:
    """The wheel's labels.csv as (image path inside the data folder, probability in thirds 0-3,
    cell type), in file order. Raises DatasetError for a line that does not parse."""
    rows: list[tuple[str, int, str]] = []
    text = zf.read(ELPV_DATA + "labels.csv").decode("ascii")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            path, prob, kind = parts[0], float(parts[1]), parts[2]
        except (IndexError, ValueError):
            raise DatasetError(f"elpv labels.csv line {n} does not parse: {line!r}") from None
        thirds = round(prob * 3)
        if abs(prob * 3 - thirds) > 1e-6 or thirds not in FOLDER_BY_THIRDS or kind not in ("mono", "poly"):
            raise DatasetError(f"elpv labels.csv line {n} has an unexpected label: {line!r}")
        rows.append((path, thirds, kind))
    return rows


def split_rows(rows: list[tuple[str, int, str]], seed: int) -> dict[str, tuple[str, str]]:
    """Assign each image path to (folder, cell type): folder is ``train/good``, ``test/good`` or
    ``test/<defect>``. The normal cells of each type are split 80/20 by one
    ``default_rng(seed)`` (mono permuted first, then poly)."""
    rng = np.random.default_rng(seed)
    where: dict[str, tuple[str, str]] = {}
    for kind in ("mono", "poly"):
        normals = [p for p, t, k in rows if k == kind and t == 0]
        order = rng.permutation(len(normals))
        n_train = len(normals) * TRAIN_FRACTION[0] // TRAIN_FRACTION[1]
        for rank, i in enumerate(order):
            where[normals[i]] = ("train/good" if rank < n_train else "test/good", kind)
    for path, thirds, kind in rows:
        if thirds:
            where[path] = (f"test/{FOLDER_BY_THIRDS[thirds]}", kind)
    return where


def prepare_elpv(out: Path, cell_type: str, seed: int, cache_dir: Path) -> PrepareReport:
    """``prepare("elpv", out, cell_type=..., seed=...)``: see the module docstring.

    Returns at once (``cached=True``) when ``out`` already holds this dataset. Raises UserError for
    a bad cell type or seed, a download failure, or an ``out`` holding something else.
    """
    check_cell_type(cell_type)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"invalid seed {seed!r} for elpv: use an integer >= 0")
    parameters = {"cell_type": cell_type, "seed": seed}
    found = cache.existing_dataset(out, "elpv", parameters)
    if found is not None:
        return found
    wheel = cache.fetch_wheel(ELPV_REQUIREMENT, ELPV_WHEEL, ELPV_WHEEL_SHA256, cache_dir)
    protocol = (
        f"elpv, {cell_type} cells, seed {seed}: train/good = a seeded 80% of the normal cells "
        "(defect probability 0) of each type, test/good = the other 20%; anomalous = probability "
        ">= 2/3 (test/defect_p067, test/defect_p100); probability 1/3 in test/uncertain_p033 is "
        "reported apart (excluded from overall metrics)"
    )
    notes = [protocol, f"source: {ELPV_REQUIREMENT} from PyPI (CC BY-NC-SA 4.0, sha256-checked wheel)"]
    with zipfile.ZipFile(wheel) as zf, cache.staging(out) as tmp:
        rows = read_labels(zf)
        where = split_rows(rows, seed)
        chosen = [(p, where[p][0]) for p, _, kind in rows if cell_type in ("all", kind)]
        keys = ["train/good", "test/good"] + [f"test/{f}" for f in sorted(set(FOLDER_BY_THIRDS.values()) - {"good"})]
        for key in keys:
            (tmp / key).mkdir(parents=True)
        with cache.progress(f"writing {len(chosen)} ELPV cells", len(chosen)) as advance:
            for path, folder in chosen:
                (tmp / folder / Path(path).name).write_bytes(zf.read(ELPV_DATA + path))
                advance(1)
        counts = {k: sum(1 for _, f in chosen if f == k) for k in keys}
        cache.write_manifest(
            tmp,
            {
                "name": "elpv",
                "parameters": parameters,
                "source": {
                    "package": ELPV_REQUIREMENT,
                    "wheel_sha256": ELPV_WHEEL_SHA256,
                    "file": ELPV_DATA + "labels.csv",
                    "sha256": hashlib.sha256(zf.read(ELPV_DATA + "labels.csv")).hexdigest(),
                },
                "counts": counts,
                "report_apart": REPORT_APART,
                "protocol": protocol,
                "notes": notes,
            },
        )
    return PrepareReport(name="elpv", out=out, counts=counts, cached=False, notes=notes)
