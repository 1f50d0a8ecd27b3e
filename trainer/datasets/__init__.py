"""Data sets: real data laid out as MVTec-style folders, and the reader of such folders.

``prepare(name, out, ...)`` is ``edge-trainer datasets prepare NAME --out DIR``:

- ``mnist``, ``fashion-mnist``: one-class protocol, ``normal_class`` required (see ``mnist.py``);
- ``elpv``: solar cells, ``cell_type`` mono|poly|all, seeded 80/20 split (see ``elpv.py``);
- ``folder``: validates an existing MVTec-layout folder ``out`` in place (writes nothing) and
  describes it.

Downloads and extracted source files live in ``cache_dir`` (default ``default_cache_dir()``).
The reader (``scan_folder``, ``load_images``, ``load_masks``, ...) is in ``folder.py``.
"""

from __future__ import annotations

from pathlib import Path

from trainer.datasets.cache import PrepareReport, default_cache_dir
from trainer.datasets.folder import (
    IMAGE_SUFFIXES,
    FolderIndex,
    FolderReport,
    Sample,
    describe_folder,
    infer_channels,
    load_images,
    load_masks,
    scan_folder,
)
from trainer.errors import UserError

DATASET_NAMES = ("mnist", "fashion-mnist", "elpv", "folder")

__all__ = [
    "DATASET_NAMES",
    "IMAGE_SUFFIXES",
    "FolderIndex",
    "FolderReport",
    "PrepareReport",
    "Sample",
    "default_cache_dir",
    "describe_folder",
    "infer_channels",
    "load_images",
    "load_masks",
    "prepare",
    "scan_folder",
]


def prepare(
    name: str,
    out: Path,
    *,
    normal_class: str | None = None,
    cell_type: str = "all",
    seed: int = 0,
    cache_dir: Path | None = None,
) -> PrepareReport:
    """Lay out data set ``name`` (one of DATASET_NAMES) in ``out`` and report what is there.

    Idempotent: a second call with the same parameters returns at once with ``cached=True``.
    Raises UserError (one clear line) for an unknown name, a missing or invalid ``normal_class``
    (mnist, fashion-mnist) or one given to another data set, a ``cell_type`` other than
    mono|poly|all (or one other than "all" given to another data set), a download failure, or an
    ``out`` that holds another data set; DatasetError (a UserError) for an invalid ``folder``.
    """
    if name not in DATASET_NAMES:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    out = Path(out).expanduser()
    if normal_class is not None and name not in ("mnist", "fashion-mnist"):
        raise UserError(f"--normal-class applies to mnist and fashion-mnist only, not to {name}")
    if cell_type != "all" and name != "elpv":
        from trainer.datasets.elpv import check_cell_type

        check_cell_type(cell_type)
        raise UserError(f"--cell-type applies to elpv only, not to {name}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if name in ("mnist", "fashion-mnist"):
        from trainer.datasets.mnist import prepare_one_class

        return prepare_one_class(name, out, normal_class, cache_dir)
    if name == "elpv":
        from trainer.datasets.elpv import prepare_elpv

        return prepare_elpv(out, cell_type, seed, cache_dir)

    scan_folder(out, need_test=True)
    report = describe_folder(out)
    notes = [f"size {report.size_text()}, channels {sorted(report.channels)}, {report.masks} masks"]
    if report.report_apart:
        notes.append(f"reported apart: {', '.join(sorted(report.report_apart))}")
    return PrepareReport(
        name="folder", out=out, counts=dict(report.counts), cached=False, notes=notes, description=report
    )
