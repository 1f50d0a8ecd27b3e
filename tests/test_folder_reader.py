"""The MVTec-layout reader on the real folders of shared/data, and on broken copies of them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from deploy.preprocess import ImageReadError, InputSpec, decode_image, prepare_uint8, resize
from trainer.datasets import prepare
from trainer.datasets.folder import (
    FolderIndex,
    data_digest,
    describe_folder,
    infer_channels,
    load_images,
    load_masks,
    scan_folder,
)
from trainer.errors import DatasetError

# shared/data/README.md's table: normal train / normal test / defective (per defect).
EXPECTED_COUNTS = {
    "mvtec_bottle": {
        "train/good": 209,
        "test/good": 20,
        "test/broken_large": 20,
        "test/broken_small": 22,
        "test/contamination": 21,
    },
    "bsdata_pitting": {"train/good": 568, "test/good": 142, "test/pitting": 394},
    "magnetic_tile": {
        "train/good": 762,
        "test/good": 190,
        "test/blowhole": 115,
        "test/break": 85,
        "test/crack": 57,
        "test/fray": 32,
        "test/uneven": 103,
    },
}
# Four "uneven" masks of magnetic_tile are empty in the source data itself (no pixel > 0).
EMPTY_SOURCE_MASKS = {
    "exp3_num_45042_mask.png",
    "exp4_num_124690_mask.png",
    "exp4_num_352527_mask.png",
    "exp4_num_45057_mask.png",
}


@pytest.fixture(scope="module")
def indexes(shared_data: Path) -> dict[str, FolderIndex]:
    return {name: scan_folder(shared_data / name) for name in EXPECTED_COUNTS}


def _counts(index: FolderIndex) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split, samples in (("train", index.train), ("test", index.test)):
        for s in samples:
            key = f"{split}/{s.defect}"
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_counts_match_the_readme(indexes: dict[str, FolderIndex], name: str) -> None:
    index = indexes[name]
    assert _counts(index) == EXPECTED_COUNTS[name]
    assert all(s.label == 0 and s.defect == "good" and s.mask is None for s in index.train)
    assert all(s.label == (s.defect != "good") for s in index.test)
    assert index.report_apart == frozenset()


def test_order_is_sorted_good_first(indexes: dict[str, FolderIndex]) -> None:
    index = indexes["magnetic_tile"]
    names = [s.path.name for s in index.train]
    assert names == sorted(names)
    defects = [s.defect for s in index.test]
    assert defects == ["good"] * 190 + sorted(defects[190:])
    for defect in set(defects):
        names = [s.path.name for s in index.test if s.defect == defect]
        assert names == sorted(names)


def test_masks_found_where_they_exist(indexes: dict[str, FolderIndex]) -> None:
    assert not indexes["mvtec_bottle"].has_masks
    for name in ("magnetic_tile", "bsdata_pitting"):
        index = indexes[name]
        assert index.has_masks
        for s in index.test:
            assert (s.mask is not None) == (s.label == 1)
            if s.mask is not None:
                assert s.mask == index.root / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"


def test_describe_folder(shared_data: Path) -> None:
    bottle = describe_folder(shared_data / "mvtec_bottle")
    assert bottle.counts == EXPECTED_COUNTS["mvtec_bottle"]
    assert (bottle.min_height, bottle.max_height, bottle.min_width, bottle.max_width) == (256, 256, 256, 256)
    assert bottle.channels == frozenset({3}) and bottle.masks == 0
    tiles = describe_folder(shared_data / "magnetic_tile")
    assert tiles.channels == frozenset({1}) and tiles.masks == 392
    assert tiles.min_height < tiles.max_height and tiles.min_width < tiles.max_width
    assert "test/uneven" in tiles.to_text() and "grey" in tiles.to_text()
    as_dict = tiles.to_dict()
    assert as_dict["counts"] == EXPECTED_COUNTS["magnetic_tile"] and as_dict["channels"] == [1]
    json.dumps(as_dict)


def test_prepare_folder_validates_in_place(shared_data: Path) -> None:
    report = prepare("folder", shared_data / "bsdata_pitting")
    assert report.counts == EXPECTED_COUNTS["bsdata_pitting"]
    assert report.description is not None and report.description.masks == 394
    assert report.description.channels == frozenset({3})
    assert "bsdata_pitting" in report.to_text()


def test_infer_channels(indexes: dict[str, FolderIndex]) -> None:
    assert infer_channels(indexes["magnetic_tile"]) == 1
    assert infer_channels(indexes["mvtec_bottle"]) == 3
    assert infer_channels(indexes["bsdata_pitting"]) == 3


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["mvtec_bottle", "magnetic_tile"])
def test_load_images_equals_deploy_preprocessing(indexes: dict[str, FolderIndex], name: str, channels: int) -> None:
    index = indexes[name]
    samples = index.train[:20] + index.test[-20:]
    spec = InputSpec(64, 64, channels)
    seen: list[int] = []
    batch = load_images(samples, spec, progress=seen.append)
    assert batch.shape == (40, channels, 64, 64) and batch.dtype == np.uint8
    assert seen == [1] * 40
    for i in (0, 7, 39):  # order kept, values = what the daemon computes
        np.testing.assert_array_equal(batch[i], prepare_uint8(decode_image(samples[i].path), spec))


def test_grey_to_colour_and_colour_to_grey(indexes: dict[str, FolderIndex]) -> None:
    tiles = indexes["magnetic_tile"].train[:8]
    grey = load_images(tiles, InputSpec(32, 48, 1))
    colour = load_images(tiles, InputSpec(32, 48, 3))
    assert grey.shape == (8, 1, 32, 48) and colour.shape == (8, 3, 32, 48)
    for c in range(3):  # a grey image repeated in each channel
        np.testing.assert_array_equal(colour[:, c], grey[:, 0])
    bottles = indexes["mvtec_bottle"].train[:8]
    rgb = load_images(bottles, InputSpec(32, 32, 3)).astype(np.float64)
    bottle_grey = load_images(bottles, InputSpec(32, 32, 1))
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # RGB order by default
    assert np.abs(luma - bottle_grey[:, 0]).max() <= 1.0
    bgr = load_images(bottles, InputSpec(32, 32, 3, colour_order="BGR"))
    np.testing.assert_array_equal(bgr[:, ::-1], rgb.astype(np.uint8))


def test_masks_aligned_with_images(indexes: dict[str, FolderIndex]) -> None:
    for name in ("magnetic_tile", "bsdata_pitting"):
        test = indexes[name].test
        masks = load_masks(test, 128, 128)
        assert masks.shape == (len(test), 128, 128) and masks.dtype == bool
        good = np.array([s.label == 0 for s in test])
        assert not masks[good].any()
        with_mask = [i for i, s in enumerate(test) if s.mask is not None]
        for i in with_mask:
            s = test[i]
            assert s.mask is not None
            native = decode_image(s.mask) > 127
            assert native.shape == decode_image(s.path).shape[:2]  # drawn on the image itself
            if s.mask.name in EMPTY_SOURCE_MASKS:
                assert not native.any() and not masks[i].any()
                continue
            expected = resize(decode_image(s.mask), 128, 128) > 127
            np.testing.assert_array_equal(masks[i], expected)
            # Same place as in the image: every mask pixel at 128x128 covers (within one pixel)
            # some defect pixel of the native mask, measured independently by area averaging.
            coverage = cv2.resize(native.astype(np.float32), (128, 128), interpolation=cv2.INTER_AREA)
            near = cv2.dilate((coverage > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            assert not (masks[i] & ~near).any(), s.mask
            if native.sum() >= 100:  # large enough to survive the downscale
                assert masks[i].any(), s.mask
        nonempty = masks[with_mask].any(axis=(1, 2)).mean()
        assert nonempty > 0.97, f"{name}: only {nonempty:.1%} of masks survive 128x128"


# --- broken folders, built in tmp_path from copies of real images --------------------------------


def _mini_folder(shared_data: Path, root: Path) -> Path:
    """A small valid copy of bsdata_pitting: 3 train, 2 good test, 2 pitting test with masks."""
    src = scan_folder(shared_data / "bsdata_pitting")
    for s in src.train[:3]:
        (root / "train/good").mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, root / "train/good" / s.path.name)
    good = [s for s in src.test if s.label == 0][:2]
    bad = [s for s in src.test if s.label == 1][:2]
    for s in good + bad:
        (root / "test" / s.defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, root / "test" / s.defect / s.path.name)
        if s.mask is not None:
            (root / "ground_truth" / s.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.mask, root / "ground_truth" / s.defect / s.mask.name)
    return root


def test_mini_folder_reads(shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    (root / "train/good/._hidden.jpg").write_bytes(b"resource fork")  # hidden: ignored
    (root / "train/good/notes.txt").write_text("not an image")  # not an image suffix: ignored
    (root / "dataset.json").write_text(json.dumps({"report_apart": ["pitting"]}))
    with caplog.at_level(logging.WARNING, logger="trainer.datasets.folder"):
        index = scan_folder(root)
    assert len(index.train) == 3 and len(index.test) == 4 and index.report_apart == {"pitting"}
    # what is not read is said, by name (it was skipped without a word): the hidden file is not
    assert [r.getMessage() for r in caplog.records] == [f"{root / 'train/good'}: 1 entry not read: notes.txt"]
    assert load_images(index.train, InputSpec(16, 16, 3)).shape == (3, 3, 16, 16)
    masks = load_masks(index.test, 230, 565)  # bsdata's native size: small pits stay visible
    assert not masks[:2].any() and masks[2:].any(axis=(1, 2)).all()


def test_links_that_lead_nowhere_and_test_subfolders_are_named(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symbolic link loop among the images was a traceback (OSError from is_file); images in a sub-folder of a
    test folder were skipped without a word (only train/good said what it left out)."""
    root = _mini_folder(shared_data, tmp_path / "mini")
    (root / "train/good/loop.png").symlink_to("loop.png")
    (root / "test/good/gone.png").symlink_to(tmp_path / "nowhere.png")
    bad = sorted((root / "test/pitting").iterdir())[0]
    (root / "test/pitting/more").mkdir()
    bad.rename(root / "test/pitting/more" / bad.name)
    with caplog.at_level(logging.WARNING, logger="trainer.datasets.folder"):
        index = scan_folder(root)
    assert len(index.train) == 3 and len(index.test) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{root / 'train/good'}: 1 entry not read: loop.png (Too many levels of symbolic links)",
        f"{root / 'test/good'}: 1 entry not read: gone.png (No such file or directory)",
        f"{root / 'test/pitting'}: 1 entry not read: more/",
        "1 mask file(s) match no test image (expected ground_truth/<defect>/<image stem>_mask.png for "
        f"test/<defect>/<image>): ground_truth/pitting/{bad.stem}_mask.png",
    ]


def test_missing_and_empty_folders(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_folder(tmp_path / "file")
    with pytest.raises(DatasetError, match="no train/good"):
        scan_folder(tmp_path)
    root = _mini_folder(shared_data, tmp_path / "mini")
    for f in (root / "train/good").iterdir():
        f.unlink()
    (root / "train/good/.DS_Store").write_bytes(b"\0")
    (root / "train/good/readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match=r"train/good holds no images"):
        scan_folder(root)
    with pytest.raises(DatasetError, match=r"train/good holds no images"):
        prepare("folder", root)


def test_missing_test_split(shared_data: Path, tmp_path: Path) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    shutil.rmtree(root / "test/good")
    with pytest.raises(DatasetError, match="no test/good"):
        scan_folder(root)
    shutil.rmtree(root / "test")
    with pytest.raises(DatasetError, match="no test folder"):
        scan_folder(root)
    index = scan_folder(root, need_test=False)
    assert index.test == [] and len(index.train) == 3
    assert describe_folder(root).counts == {"train/good": 3}


def test_truncated_jpeg_is_named(shared_data: Path, tmp_path: Path) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    victim = sorted((root / "test/pitting").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    index = scan_folder(root)  # scanning does not decode
    with pytest.raises(DatasetError, match=f"{victim.name}.*truncated"):
        load_images(index.test, InputSpec(32, 32, 3))
    with pytest.raises(DatasetError, match=victim.name):
        describe_folder(root)
    with pytest.raises(DatasetError, match=victim.name):
        prepare("folder", root)


def test_non_image_with_png_name_is_named(shared_data: Path, tmp_path: Path) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    fake = root / "train/good/000_fake.png"
    fake.write_text("this is not a PNG")
    index = scan_folder(root)
    assert index.train[0].path == fake
    with pytest.raises(DatasetError, match=f"{fake.name}.*not a decodable"):
        load_images(index.train, InputSpec(32, 32, 1))
    with pytest.raises(DatasetError, match=fake.name):
        infer_channels(index)


def test_unreadable_mask_is_named(shared_data: Path, tmp_path: Path) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    mask = sorted((root / "ground_truth/pitting").iterdir())[0]
    mask.write_bytes(b"")
    with pytest.raises(DatasetError, match=f"{mask.name}.*empty"):
        load_masks(scan_folder(root).test, 32, 32)


def test_bad_report_apart(shared_data: Path, tmp_path: Path) -> None:
    root = _mini_folder(shared_data, tmp_path / "mini")
    (root / "dataset.json").write_text(json.dumps({"report_apart": "pitting"}))
    with pytest.raises(DatasetError, match="report_apart"):
        scan_folder(root)


def test_end_markers_judge_truncation(shared_data: Path) -> None:
    """A JPEG or PNG cut short is refused; bytes after its end marker (a camera's trailer) are not a cut."""
    jpeg = sorted((shared_data / "bsdata_pitting" / "train" / "good").iterdir())[0]
    png = shared_data / "mvtec_bottle" / "train" / "good" / "000.png"
    for path in (jpeg, png):
        data = path.read_bytes()
        whole = decode_image(path)
        # A maker trailer, zero padding, or a second image appended (as some phones do): the image is whole.
        for tail in (b"\x00" * 4096, b"SEFT" + bytes(range(256)) * 8, data):
            assert np.array_equal(decode_image(data + tail, name=path.name), whole)
        for cut in (len(data) // 2, len(data) - 1, 200):
            with pytest.raises(ImageReadError, match=f"{path.name}: the file is truncated"):
                decode_image(data[:cut], name=path.name)
    # An APP1 (EXIF) segment holding a thumbnail with its own EOI, before the image's scan, does not make
    # a cut image look complete.
    jpeg_data = jpeg.read_bytes()
    payload = b"Exif\x00\x00" + jpeg_data[:600] + b"\xff\xd9"
    with_thumbnail = b"\xff\xd8\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg_data[2:]
    assert np.array_equal(decode_image(with_thumbnail, name="t.jpg"), decode_image(jpeg))
    with pytest.raises(ImageReadError, match="truncated"):
        decode_image(with_thumbnail[: len(with_thumbnail) // 2], name="t.jpg")


def test_webp_images_and_non_utf8_file_names_are_read(shared_data: Path, tmp_path: Path) -> None:
    """A .webp (OpenCV decodes it) is an image, not a file skipped without a word; a file name that is not UTF-8
    (Latin-1 from an old Windows share) is hashed by its bytes: data_digest used to raise UnicodeEncodeError after
    training had finished."""
    import os

    root = _mini_folder(shared_data, tmp_path / "mini")
    first = sorted((root / "train/good").iterdir())[0]
    ok, webp = cv2.imencode(".webp", cv2.imread(str(first)))
    assert ok
    (root / "train/good/extra.webp").write_bytes(webp.tobytes())
    latin = os.fsdecode(b"Pr\xfcfteil_000.jpg")
    shutil.copy(first, root / "train/good" / latin)
    index = scan_folder(root)
    assert len(index.train) == 5 and {s.path.name for s in index.train} >= {"extra.webp", latin}
    assert load_images(index.train, InputSpec(16, 16, 3)).shape == (5, 3, 16, 16)
    digest = data_digest(root, index.train)
    assert len(digest) == 64 and digest == data_digest(root, list(reversed(index.train)))


def test_a_grey_and_colour_mix_is_refused_whatever_the_names(shared_data: Path, tmp_path: Path) -> None:
    """32 grey tiles named a_* and a few colour bottles named b_*: channels were decided by the first 32 names, and the
    colour images silently converted to grey. The mix is named now, with the way out (--channels)."""
    root = tmp_path / "mix"
    (root / "train/good").mkdir(parents=True)
    for i, p in enumerate(sorted((shared_data / "magnetic_tile/train/good").iterdir())[:32]):
        shutil.copy(p, root / "train/good" / f"a_{i:03d}{p.suffix}")
    for i, p in enumerate(sorted((shared_data / "mvtec_bottle/train/good").iterdir())[:5]):
        shutil.copy(p, root / "train/good" / f"b_{i:03d}{p.suffix}")
    with pytest.raises(DatasetError, match=r"mixes grey and colour images \(32 grey, .* 5 colour, e\.g\. b_000"):
        infer_channels(scan_folder(root, need_test=False))


def test_an_image_over_opencvs_pixel_limit_is_named(shared_data: Path, tmp_path: Path) -> None:
    """A 40000x40000 line-scan PNG (1.5 MB on disk) was an OpenCV traceback from train and datasets prepare."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 40_000
    packer = zlib.compressobj(9)
    rows = b"".join(packer.compress(bytes(side + 1)) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    root = _mini_folder(shared_data, tmp_path / "mini")
    (root / "train/good/linescan.png").write_bytes(png)
    with pytest.raises(DatasetError, match=r"linescan.png: more pixels than OpenCV decodes, CV_IO_MAX_IMAGE_PIXELS"):
        load_images(scan_folder(root).train, InputSpec(16, 16, 3))
