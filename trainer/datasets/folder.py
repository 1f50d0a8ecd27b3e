"""The MVTec-layout folder reader: the one way training and evaluation read images from disk.

Layout (DESIGN.md, "Command lines")::

    DIR/train/good/*                     normal training images
    DIR/test/good/*                      normal test images
    DIR/test/<defect>/*                  anomalous test images, one folder per defect type
    DIR/ground_truth/<defect>/<stem>_mask.png   optional pixel masks of anomalous test images
    DIR/dataset.json                     optional; its "report_apart" lists defect types kept out
                                         of the overall metrics (reported on their own)

Images are decoded and shaped by ``deploy.preprocess`` (``decode_image`` + ``prepare_uint8``), the
same functions the exporter and the edge daemon use, so training inputs equal deployment inputs.
Hidden files (names starting with ".") and files without an image suffix are ignored; a file with
an image suffix that cannot be decoded is an error (``DatasetError`` naming the file) when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from deploy.preprocess import ImageReadError, InputSpec, decode_image, prepare_uint8, resize
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes read as images (compared case-insensitively)."""

GOOD = "good"
MANIFEST_NAME = "dataset.json"

# Decoding runs in two threads: OpenCV releases the GIL while it decodes and resizes, and two
# workers measured 1.5-1.75x faster than one on the 2-core reference machine (all of
# magnetic_tile, 1,344 grey JPEGs: 0.78 s -> 0.51 s; bsdata_pitting, 1,104 colour JPEGs:
# 1.40 s -> 0.80 s, to 64x64). More workers than cores only add contention: capped at 2.
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
"""Decoding threads by default: cv2 releases the GIL; two threads measured 1.5-1.75x faster here."""
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Sample:
    """One image of a data folder.

    ``label`` is 0 for normal (``defect == "good"``) and 1 for anomalous; ``defect`` is "good" or
    the name of the ``test/<defect>`` folder; ``mask`` is ``ground_truth/<defect>/<stem>_mask.png``
    when that file exists, else None.
    """

    path: Path
    label: int
    defect: str
    mask: Path | None


@dataclass(frozen=True)
class FolderIndex:
    """The images of an MVTec-layout folder, in a fixed order.

    ``train``: ``train/good/*`` sorted by file name. ``test``: ``test/good/*`` then each
    ``test/<defect>/*`` (defects sorted by name), each sorted by file name. ``report_apart``: defect
    names that overall metrics exclude (from ``DIR/dataset.json``), usually empty.
    """

    root: Path
    train: list[Sample]
    test: list[Sample]
    report_apart: frozenset[str] = frozenset()

    @property
    def has_masks(self) -> bool:
        """True when at least one test sample has a ground-truth mask."""
        return any(s.mask is not None for s in self.test)

    @property
    def defects(self) -> list[str]:
        """The defect folder names that hold at least one test image, sorted."""
        return sorted({s.defect for s in self.test if s.label == 1})


def _is_image(entry: os.DirEntry[str]) -> bool:
    if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_SUFFIXES):
        return False
    try:
        return entry.is_file()
    except OSError:  # a symbolic link loop: not read, and said so (``_listing``)
        return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _not_read_name(entry: os.DirEntry[str]) -> str:
    """How ``_listing`` names an entry it leaves out: sub-folders with a trailing '/', links that lead nowhere
    with why."""
    if _is_dir(entry):
        return entry.name + "/"
    try:
        os.stat(entry.path)
    except OSError as exc:
        return f"{entry.name} ({exc.strerror or exc})"
    return entry.name


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name; [] if it is absent."""
    return _listing(folder)[0]


def _listing(folder: Path) -> tuple[list[Path], list[str]]:
    """``_images_in(folder)``, and the names of what it leaves out (sub-folders with a trailing '/', files of other
    types; hidden entries aside), sorted: one listing of the folder, so that no image is skipped without a word."""
    if not folder.is_dir():
        return [], []
    images, others = [], []
    with os.scandir(folder) as it:
        for e in it:
            if _is_image(e):
                images.append(e.name)
            elif not e.name.startswith("."):
                others.append(_not_read_name(e))
    return [folder / n for n in sorted(images)], sorted(others)


def _subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden folders directly inside ``folder``, sorted."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if _is_dir(e) and not e.name.startswith("."))


def _read_report_apart(root: Path) -> frozenset[str]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return frozenset()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    apart = data.get("report_apart", []) if isinstance(data, dict) else None
    if not isinstance(apart, list) or not all(isinstance(x, str) for x in apart):
        raise DatasetError(f"{path}: 'report_apart' must be a list of defect folder names")
    return frozenset(apart)


def _warn_not_read(folder: Path, ignored: list[str]) -> None:
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        log.warning("%s: %d entr%s not read: %s", folder, len(ignored), "y" if len(ignored) == 1 else "ies", shown)


def _warn_unmatched_masks(gt: Path, used: set[Path]) -> None:
    """Warn about files under ``gt/<defect>/`` that are the mask of no test image (a misnamed mask is otherwise
    silently unused: its image then counts as having no mask)."""
    if not gt.is_dir():
        return
    unused = sorted(
        str(p.relative_to(gt.parent)) for defect in _subfolders(gt) for p in _images_in(gt / defect) if p not in used
    )
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        log.warning(
            "%d mask file(s) match no test image (expected ground_truth/<defect>/<image stem>_mask.png for "
            "test/<defect>/<image>): %s",
            len(unused),
            shown,
        )


def scan_folder(root: Path, *, need_test: bool = True) -> FolderIndex:
    """Index the MVTec-layout folder ``root`` without decoding any image.

    Raises DatasetError (one line naming the problem) when ``root`` is missing or not a folder,
    ``train/good`` is missing or holds no image, or - with ``need_test`` - ``test/`` or
    ``test/good`` is missing or either holds no image. Without ``need_test`` a missing ``test/``
    gives an empty ``test`` list.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a folder")
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DatasetError(f"data folder {root} has no train/good folder (expected the MVTec AD layout)")
    train_images, ignored = _listing(train_dir)
    train = [Sample(p, 0, GOOD, None) for p in train_images]
    if not train:
        raise DatasetError(f"{train_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _warn_not_read(train_dir, ignored)

    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        good, ignored = _listing(test_dir / GOOD)
        _warn_not_read(test_dir / GOOD, ignored)
        test.extend(Sample(p, 0, GOOD, None) for p in good)
        gt = root / "ground_truth"
        for defect in _subfolders(test_dir):
            if defect == GOOD:
                continue
            images, ignored = _listing(test_dir / defect)
            _warn_not_read(test_dir / defect, ignored)
            for p in images:
                mask = gt / defect / f"{p.stem}_mask.png"
                test.append(Sample(p, 1, defect, mask if mask.is_file() else None))
        _warn_unmatched_masks(gt, {s.mask for s in test if s.mask is not None})
        if need_test:
            if not (test_dir / GOOD).is_dir():
                raise DatasetError(f"data folder {root} has no test/good folder")
            if not good:
                raise DatasetError(f"{test_dir / GOOD} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif need_test:
        raise DatasetError(f"data folder {root} has no test folder (expected test/good and test/<defect>)")
    return FolderIndex(root=root, train=train, test=test, report_apart=_read_report_apart(root))


def _ordered_map(fn: Callable[[_T], _R], items: Sequence[_T], workers: int = DEFAULT_WORKERS) -> Iterator[_R]:
    """``map(fn, items)`` in order, on up to ``workers`` threads when there is more than one item."""
    if workers < 2 or len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, items)


def _decode(path: Path) -> np.ndarray:
    try:
        return decode_image(path)
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from None


def load_images(
    samples: Sequence[Sample],
    spec: InputSpec,
    progress: Callable[[int], None] | None = None,
    workers: int = DEFAULT_WORKERS,
) -> np.ndarray:
    """Decode and shape ``samples``: uint8 ``[N, C, H, W]``, row i = ``prepare_uint8(decode_image(path_i), spec)``.

    Order is kept; ``workers`` decoding threads (1 = none). ``progress(1)`` is called once per image
    (from the calling thread) if given.
    An unreadable, truncated or non-image file raises DatasetError naming the file.
    """
    out = np.empty((len(samples), spec.channels, spec.height, spec.width), dtype=np.uint8)

    def one(sample: Sample) -> np.ndarray:
        return prepare_uint8(_decode(sample.path), spec)

    for i, arr in enumerate(_ordered_map(one, samples, workers)):
        out[i] = arr
        if progress is not None:
            progress(1)
    return out


def _mask_to_bool(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.ndim == 3:
        img = img.max(axis=2)
    return resize(img, height, width) > 127


def load_masks(samples: Sequence[Sample], height: int, width: int) -> np.ndarray:
    """Ground-truth masks as bool ``[N, height, width]``; all False for a sample without a mask.

    A mask is decoded with ``decode_image`` (a colour mask becomes its per-pixel channel maximum),
    resized with ``deploy.preprocess.resize`` - the same geometry as the images, so it stays
    aligned with its image - and thresholded at > 127. An unreadable mask raises DatasetError
    naming the file.
    """
    out = np.zeros((len(samples), height, width), dtype=bool)
    with_mask = [(i, s.mask) for i, s in enumerate(samples) if s.mask is not None]

    def one(item: tuple[int, Path | None]) -> np.ndarray:
        assert item[1] is not None
        return _mask_to_bool(_decode(item[1]), height, width)

    for (i, _), mask in zip(with_mask, _ordered_map(one, with_mask), strict=True):
        out[i] = mask
    return out


def infer_channels(index: FolderIndex, max_images: int = 64) -> int:
    """1 when the training images decode as single-channel grey, 3 when they decode as colour, judged on up to
    ``max_images`` of them spread over the whole (name-sorted) set.

    Raises DatasetError naming a file that cannot be decoded, and when grey and colour images are mixed (they used to
    be converted silently to whatever the first names were): the user says which with --channels.
    """
    picks = [index.train[i] for i in spread_indices(len(index.train), max_images)]
    grey = [s.path.name for s in picks if _decode(s.path).ndim == 2]
    if not grey:
        return 3
    if len(grey) == len(picks):
        return 1
    colour = sorted({s.path.name for s in picks} - set(grey))
    raise DatasetError(
        f"{index.root / 'train' / GOOD} mixes grey and colour images ({len(grey)} grey, e.g. {grey[0]}, and "
        f"{len(colour)} colour, e.g. {colour[0]}, among {len(picks)} checked): pass --channels 1 or 3 to say which "
        "the model is for (the others are converted)"
    )


def spread_indices(n_items: int, k: int) -> list[int]:
    """Up to ``k`` indices spread evenly over ``range(n_items)``, in order, without repeats."""
    if n_items <= k:
        return list(range(n_items))
    return sorted({int(round(i)) for i in np.linspace(0, n_items - 1, k)})


@dataclass(frozen=True)
class FolderReport:
    """What a data folder holds, measured by decoding every image and mask in it.

    ``counts``: images per ``"train/good"``, ``"test/good"``, ``"test/<defect>"``; ``masks``: number
    of test images with a mask; ``min_/max_height``/``width``: image sizes over all images;
    ``channels``: the channel counts seen after decoding (1 grey, 3 colour).
    """

    root: Path
    counts: dict[str, int]
    masks: int
    min_height: int
    max_height: int
    min_width: int
    max_width: int
    channels: frozenset[int]
    report_apart: frozenset[str] = field(default_factory=frozenset)

    @property
    def n_images(self) -> int:
        """Total number of images (train and test)."""
        return sum(self.counts.values())

    def size_text(self) -> str:
        """Image size(s) as ``WxH`` or ``W1-W2 x H1-H2`` when they vary."""
        if (self.min_height, self.min_width) == (self.max_height, self.max_width):
            return f"{self.min_width}x{self.min_height}"
        return f"{self.min_width}-{self.max_width} x {self.min_height}-{self.max_height} (WxH)"

    def to_text(self) -> str:
        """A short human table: one line per split/defect, then sizes, channels and masks."""
        width = max(len(k) for k in self.counts)
        lines = [f"{self.root}"]
        for key, n in self.counts.items():
            defect = key.split("/", 1)[1]
            apart = "  (reported apart)" if defect in self.report_apart else ""
            lines.append(f"  {key:<{width}}  {n:>6}{apart}")
        lines.append(f"  {'total':<{width}}  {self.n_images:>6}")
        chans = "/".join({1: "grey", 3: "colour"}.get(c, str(c)) for c in sorted(self.channels))
        lines.append(f"  size {self.size_text()}, {chans}, {self.masks} masks")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (sets as sorted lists, the root as a string)."""
        return {
            "root": str(self.root),
            "counts": dict(self.counts),
            "masks": self.masks,
            "min_height": self.min_height,
            "max_height": self.max_height,
            "min_width": self.min_width,
            "max_width": self.max_width,
            "channels": sorted(self.channels),
            "report_apart": sorted(self.report_apart),
        }


def index_counts(index: FolderIndex) -> dict[str, int]:
    """Images per ``"train/good"``, ``"test/good"`` and ``"test/<defect>"`` (defects sorted)."""
    counts = {"train/good": len(index.train)}
    if index.test:
        counts["test/good"] = sum(1 for s in index.test if s.label == 0)
        for defect in index.defects:
            counts[f"test/{defect}"] = sum(1 for s in index.test if s.defect == defect)
    return counts


def describe_folder(root: Path) -> FolderReport:
    """Decode every image and mask of the folder ``root`` and summarise it (see FolderReport).

    A folder without ``test/`` is described too. Raises DatasetError for a layout problem
    (see ``scan_folder``) or for the first file that cannot be decoded (naming it).
    """
    index = scan_folder(root, need_test=False)
    samples = index.train + index.test

    def shape(sample: Sample) -> tuple[int, int, int]:
        img = _decode(sample.path)
        return img.shape[0], img.shape[1], 1 if img.ndim == 2 else img.shape[2]

    shapes = list(_ordered_map(shape, samples))
    masks = [s.mask for s in index.test if s.mask is not None]
    for _ in _ordered_map(_decode, masks):
        pass
    heights = [h for h, _, _ in shapes]
    widths = [w for _, w, _ in shapes]
    return FolderReport(
        root=index.root,
        counts=index_counts(index),
        masks=len(masks),
        min_height=min(heights),
        max_height=max(heights),
        min_width=min(widths),
        max_width=max(widths),
        channels=frozenset(c for _, _, c in shapes),
        report_apart=index.report_apart,
    )


def data_digest(root: Path, samples: Sequence[Sample]) -> str:
    """sha256 over the sorted (path relative to ``root`` as posix, sha256 hex of the file bytes) pairs: what
    a bundle records of its training data, and a run of its held-out images. DatasetError on an unreadable file.

    Each pair is fed as ``"<relative name>\\0<hex>\\n"`` (UTF-8).
    """
    return combined_digest(file_digests(root, samples))


def file_digests(root: Path, samples: Sequence[Sample]) -> list[tuple[str, str]]:
    """(path relative to ``root`` as posix, sha256 hex of the file bytes) of each sample, in order: hashed once, for
    digests of several subsets (``combined_digest``). DatasetError on an unreadable file."""
    pairs = []
    for sample in samples:
        try:
            data = sample.path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read {sample.path}: {exc.strerror or exc}") from None
        pairs.append((sample.path.relative_to(root).as_posix(), hashlib.sha256(data).hexdigest()))
    return pairs


def combined_digest(pairs: Sequence[tuple[str, str]]) -> str:
    """``data_digest`` of the samples whose ``file_digests`` are ``pairs`` (in any order)."""
    h = hashlib.sha256()
    for name, hexdigest in sorted(pairs):
        h.update(f"{name}\0{hexdigest}\n".encode("utf-8", "surrogateescape"))  # a non-UTF-8 file name: its bytes
    return h.hexdigest()
