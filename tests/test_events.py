"""The daemon's event state machine and crops (edge_daemon/events.py), on real images and real masks.

MVTec bottle in ../shared/data has no masks, so the "perfect" anomaly maps come from the real defect masks of
bsdata_pitting and magnetic_tile: a mask resized to the model resolution is the map a perfect model would give.
The real image is pasted at an offset (the roi) inside a larger frame, so the box must survive the
model px -> roi px -> frame px mapping. Crops are decoded with cv2.imdecode.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_daemon.events import (
    CropTuning,
    EventTracker,
    EventTuning,
    ModelRef,
    Outgoing,
    anomaly_box,
    cut_crop,
    encode_jpeg,
    iso_utc,
    padded_box,
)

MODEL = ModelRef("ae", "1.0.0", "a" * 64)
MODEL2 = ModelRef("ae", "2.0.0", "b" * 64)
WALL0 = 1_700_000_000.0
FRAME_SHAPE = (720, 1280)  # the canvas the real images are pasted into
EVENT_ID = re.compile(r"^cam0-\d{13}-[0-9a-f]{8}$")
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def contains(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and outer[0] + outer[2] >= inner[0] + inner[2]
        and outer[1] + outer[3] >= inner[1] + inner[3]
    )


@dataclass
class Case:
    """A real image with its real mask, pasted into a frame at ``roi``; ``amap`` is the perfect map."""

    name: str
    frame: np.ndarray
    roi: tuple[int, int, int, int]
    amap: np.ndarray
    true_box: tuple[int, int, int, int]  # the mask's largest component in frame px


def read(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    assert image is not None, f"OpenCV could not read {path}"
    return image


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, "the JPEG does not decode"
    return image


def largest_component(mask: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    n, _, st, _ = cv2.connectedComponentsWithStats(np.asarray(mask > 127, np.uint8), connectivity=8)
    if n < 2:
        return 0, (0, 0, 0, 0)
    i = 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))
    return n - 1, (int(st[i, 0]), int(st[i, 1]), int(st[i, 2]), int(st[i, 3]))


def make_case(image_path: Path, mask_path: Path, res: int, offset: tuple[int, int]) -> Case:
    img = read(image_path, cv2.IMREAD_COLOR)
    mask = read(mask_path, cv2.IMREAD_GRAYSCALE)
    assert img.shape[:2] == mask.shape, image_path
    h, w = mask.shape
    ox, oy = offset
    frame = np.full((*FRAME_SHAPE, 3), 40, np.uint8)
    frame[oy : oy + h, ox : ox + w] = img
    amap = cv2.resize(np.asarray(mask > 127, np.float32), (res, res), interpolation=cv2.INTER_AREA)
    _, (bx, by, bw, bh) = largest_component(mask)
    return Case(image_path.name, frame, (ox, oy, w, h), amap, (bx + ox, by + oy, bw, bh))


def mask_pairs(data: Path, dataset: str) -> list[tuple[Path, Path]]:
    pairs = []
    for m in sorted(glob.glob(str(data / dataset / "ground_truth" / "*" / "*_mask.png"))):
        mp = Path(m)
        stem = mp.name[: -len("_mask.png")]
        imgs = list((data / dataset / "test" / mp.parent.name).glob(stem + ".*"))
        if imgs:
            pairs.append((imgs[0], mp))
    return pairs


def big_single_blob(mask_path: Path, res: int, min_model_px: int = 10) -> bool:
    """One component, at least ``min_model_px`` model pixels on each side at resolution ``res``."""
    mask = read(mask_path, cv2.IMREAD_GRAYSCALE)
    n, (_, _, w, h) = largest_component(mask)
    return n == 1 and min(w * res / mask.shape[1], h * res / mask.shape[0]) >= min_model_px


@pytest.fixture(scope="module")
def tile_case(shared_data: Path) -> Case:
    """A magnetic tile with an 'uneven' defect: portrait image, 64x64 map, offset roi."""
    pairs = [p for p in mask_pairs(shared_data, "magnetic_tile") if p[1].parent.name == "uneven"]
    img, mask = next(p for p in pairs if big_single_blob(p[1], 64))
    return make_case(img, mask, 64, (300, 150))


@pytest.fixture(scope="module")
def pitting_case(shared_data: Path) -> Case:
    """The ball screw with the largest pit: a wide image (770x322) squeezed into a 128x128 map."""
    pairs = [p for p in mask_pairs(shared_data, "bsdata_pitting") if big_single_blob(p[1], 128)]
    img, mask = pairs[0]
    return make_case(img, mask, 128, (257, 333))


# ----------------------------------------------------------------------------------- boxes on real masks


def test_anomaly_box_recovers_real_mask_components(shared_data: Path) -> None:
    """Every real single-blob mask (>= 10 model px a side): the box found in the perfect map overlaps the
    mask's component with IoU > 0.7, and the padded crop box contains it (all but a thin tail or two)."""
    tested, contained = 0, 0
    worst = 1.0
    for dataset, res in (("magnetic_tile", 64), ("bsdata_pitting", 128)):
        for _image, mask_path in mask_pairs(shared_data, dataset):
            if not big_single_blob(mask_path, res):
                continue
            mask = read(mask_path, cv2.IMREAD_GRAYSCALE)
            h, w = mask.shape
            roi = (211, 97, w, h)
            amap = cv2.resize(np.asarray(mask > 127, np.float32), (res, res), interpolation=cv2.INTER_AREA)
            _, (bx, by, bw, bh) = largest_component(mask)
            true_box = (bx + 211, by + 97, bw, bh)
            box = anomaly_box(amap, FRAME_SHAPE, roi)
            score = iou(box, true_box)
            worst = min(worst, score)
            assert score > 0.7, (mask_path.name, box, true_box, score)
            tested += 1
            contained += contains(padded_box(box, 0.15, FRAME_SHAPE), true_box)
    assert tested >= 100, tested
    assert contained >= 0.97 * tested, (contained, tested, worst)


def test_isolated_hot_pixels_do_not_steal_the_box(tile_case: Case) -> None:
    """A real defect at 0.45 of the map's range plus hot single pixels at full height (specular glints in a
    reconstruction error, say): the light smoothing makes the defect, not a glint, the component found."""
    rng = np.random.default_rng(0)
    amap = 0.45 * tile_case.amap
    ys, xs = rng.integers(0, 64, 40), rng.integers(0, 64, 40)
    amap[ys, xs] = 1.0
    box = anomaly_box(amap, FRAME_SHAPE, tile_case.roi)
    assert iou(box, tile_case.true_box) > 0.7, (box, tile_case.true_box)


def test_anomaly_box_edge_cases() -> None:
    frame_shape = (480, 640)
    roi = (100, 50, 320, 240)
    flat = np.full((64, 64), 0.3, np.float32)
    assert anomaly_box(flat, frame_shape, roi) == roi
    assert anomaly_box(flat, frame_shape, None) == (0, 0, 640, 480)
    assert anomaly_box(np.full((64, 64), np.nan, np.float32), frame_shape, roi) == roi

    blob = np.zeros((64, 64), np.float32)
    blob[10:20, 30:50] = 1.0  # 20x10 model px -> 100x37.5 roi px (scale 5 x 3.75)
    assert anomaly_box(blob, frame_shape, roi) == (100 + 150, 50 + 37, 100, 38)
    assert anomaly_box(blob, frame_shape, None) == (300, 75, 200, 75)

    noisy = blob.copy()
    noisy[0, 0] = np.nan  # cleaned, never raised
    noisy[60, 60] = np.inf  # a lone +inf pixel becomes the finite max: a 1-px spike, smoothed away
    noisy[40:45, 5:8] = 0.9  # a smaller blob: the largest component wins
    assert anomaly_box(noisy, frame_shape, roi) == (250, 87, 100, 38)
    assert anomaly_box(noisy.astype(np.float64), frame_shape, roi) == (250, 87, 100, 38)

    # A blob at the map's edge with a roi hanging over the frame's edge: clamped to the frame.
    edge = np.zeros((32, 32), np.float32)
    edge[20:32, 24:32] = 5.0
    x, y, w, h = anomaly_box(edge, frame_shape, (400, 300, 400, 400))
    assert (x, y) == (400 + 24 * 240 // 32, 300 + 20 * 180 // 32) and x + w == 640 and y + h == 480

    for bad in (np.zeros(64, np.float32), np.zeros((1, 64, 64), np.float32), np.zeros((0, 5), np.float32)):
        with pytest.raises(ValueError, match="2-D"):
            anomaly_box(bad, frame_shape, roi)


def test_cut_crop_pads_clamps_and_fits_max_side(tile_case: Case) -> None:
    frame = tile_case.frame
    box = (500, 300, 200, 100)
    assert padded_box(box, 0.15, frame.shape[:2]) == (470, 285, 260, 130)
    crop = cut_crop(frame, box, 0.15, 512)
    assert crop.shape == (130, 260, 3) and np.array_equal(crop, frame[285:415, 470:730])
    assert not np.shares_memory(crop, frame)  # the caller may reuse its frame buffer
    small = cut_crop(frame, box, 0.15, 64)
    assert small.shape == (32, 64, 3)
    near_edge = padded_box((1200, 700, 100, 50), 0.5, frame.shape[:2])
    assert near_edge == (1150, 675, 130, 45)
    grey = cut_crop(frame[:, :, 0], box, 0.0, 50)
    assert grey.shape == (25, 50)
    assert decode(encode_jpeg(grey, 80)).shape == (25, 50)
    with pytest.raises(ValueError, match="non-empty"):
        cut_crop(np.zeros((0, 0, 3), np.uint8), box, 0.15, 64)


def test_small_defects_come_with_context(tile_case: Case) -> None:
    """min_side grows a tiny box around its centre, and shifts it (never cuts it) at the frame's edges."""
    frame = tile_case.frame  # 1280 x 720
    assert padded_box((600, 300, 10, 10), 0.15, frame.shape[:2], 96) == (557, 257, 96, 96)
    assert padded_box((2, 3, 10, 10), 0.15, frame.shape[:2], 96) == (0, 0, 96, 96)
    assert padded_box((1275, 715, 5, 5), 0.0, frame.shape[:2], 96) == (1184, 624, 96, 96)
    assert padded_box((600, 300, 200, 100), 0.0, frame.shape[:2], 96) == (600, 300, 200, 100)  # big: unchanged
    assert padded_box((10, 10, 5, 5), 0.0, (50, 40), 96) == (0, 0, 40, 50)  # a frame smaller than min_side
    assert cut_crop(frame, (600, 300, 10, 10), 0.15, 512, 96).shape == (96, 96, 3)


# ----------------------------------------------------------------------------------- driving the tracker


@dataclass
class Drive:
    """Feeds scores to a tracker one frame at a time; records every message with the frame index."""

    tracker: EventTracker
    case: Case
    dt: float = 0.1
    i: int = 0
    sent: list[tuple[int, Outgoing]] = field(default_factory=list)

    @property
    def mono(self) -> float:
        return self.i * self.dt

    def feed(
        self,
        *scores: float,
        model: ModelRef = MODEL,
        threshold: float = 0.5,
        amap: Any = None,
        raw: float | None = None,
    ) -> None:
        """Normalised ``scores``, one frame each; the raw score is 10x the normalised one, or ``raw`` when given."""
        for s in scores:
            out = self.tracker.update(
                frame=self.case.frame,
                roi=self.case.roi,
                raw=raw if raw is not None else s * 10.0 if math.isfinite(s) else s,
                normalized=s,
                threshold=threshold,
                amap=self.case.amap if amap is None else amap,
                model=model,
                wall=WALL0 + self.mono,
                mono=self.mono,
                frame_seq=self.i,
            )
            self.sent += [(self.i, o) for o in out]
            self.i += 1

    def close(self, reason: Any) -> None:
        self.sent += [(self.i, o) for o in self.tracker.close(reason, wall=WALL0 + self.mono, mono=self.mono)]

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        return [(i, json.loads(o.payload)) for i, o in self.sent if o.kind == "event"]

    def kinds(self) -> list[tuple[int, str, int]]:
        return [(i, e["type"], e["seq"]) for i, e in self.events()]


def drive(case: Case, dt: float = 0.1, **tuning: Any) -> Drive:
    tuning.setdefault("update_interval_s", 1e9)  # hysteresis tests: no updates unless asked for
    crop = CropTuning(max_side=256)
    return Drive(EventTracker("cam0", "line3-cam-a", EventTuning(**tuning), crop), case, dt)


def check_stream(sent: list[tuple[int, Outgoing]]) -> None:
    """Each start/update is immediately preceded by its own new crop (hash and size match), an end names the
    last crop sent, seqs are contiguous from 0 per event, and every event has every field of the event JSON."""
    latest: dict[str, bytes] = {}
    seqs: dict[str, list[int]] = {}
    common = {"type", "event_id", "seq", "device", "camera", "ts", "started_at", "frames", "score", "peak"}
    common |= {"region", "crop", "model", "first_frame", "last_frame"}
    previous: Outgoing | None = None
    for _, o in sent:
        if o.kind == "crop":
            assert re.fullmatch(r"cam0/crop/cam0-\d{13}-[0-9a-f]{8}", o.suffix), o.suffix
            latest[o.suffix] = o.payload
            previous = o
            continue
        assert o.suffix == "cam0/events"
        text = o.payload.decode("utf-8")
        assert ", " not in text and ": " not in text  # compact
        e = json.loads(text)
        expected = set(common)
        if e["type"] in ("update", "end"):
            expected.add("duration_s")
        if e["type"] == "end":
            expected |= {"ended_at", "reason"}
        assert set(e) == expected, (e["type"], set(e) ^ expected)
        assert EVENT_ID.match(e["event_id"]) and e["device"] == "line3-cam-a" and e["camera"] == "cam0"
        for key in ("ts", "started_at", "ended_at"):
            if key in e:
                assert ISO.match(e[key]), e[key]
        assert ISO.match(e["peak"]["ts"])
        assert set(e["score"]) == {"raw", "normalized", "threshold"} and set(e["peak"]) == {"raw", "normalized", "ts"}
        assert set(e["region"]) == {"x", "y", "w", "h"} and set(e["model"]) == {"name", "version", "sha"}
        assert e["frames"] >= 1
        seqs.setdefault(e["event_id"], []).append(e["seq"])
        if e["type"] == "start":
            assert e["crop"] is not None and e["seq"] == 0
        if e["crop"] is not None:
            c = e["crop"]
            assert set(c) == {"topic", "sha256", "bytes", "ts"} and ISO.match(c["ts"])
            assert c["topic"] == f"inspect/line3-cam-a/cam0/crop/{e['event_id']}"  # the full topic: P/<cam>/crop/<id>
            suffix = c["topic"].removeprefix("inspect/line3-cam-a/")
            if e["type"] in ("start", "update"):
                assert previous is not None and previous.kind == "crop" and previous.suffix == suffix
            payload = latest[suffix]  # KeyError = the crop was never sent
            assert c["sha256"] == hashlib.sha256(payload).hexdigest() and c["bytes"] == len(payload)
        previous = o
    for event_id, s in seqs.items():
        assert s == list(range(len(s))), (event_id, s)


def test_start_crop_of_a_real_defect(pitting_case: Case, tile_case: Case) -> None:
    for case in (pitting_case, tile_case):
        d = drive(case)
        d.feed(0.1, 0.8, 0.9, 0.95)
        assert [(o.kind, i) for i, o in d.sent] == [("crop", 2), ("event", 2)]
        check_stream(d.sent)
        crop_msg, event_msg = (o for _, o in d.sent)
        e = json.loads(event_msg.payload)
        assert crop_msg.suffix == f"cam0/crop/{e['event_id']}"
        assert e["crop"]["topic"] == f"inspect/line3-cam-a/{crop_msg.suffix}"
        assert e["crop"]["sha256"] == hashlib.sha256(crop_msg.payload).hexdigest()
        assert e["crop"]["bytes"] == len(crop_msg.payload)

        region = (e["region"]["x"], e["region"]["y"], e["region"]["w"], e["region"]["h"])
        assert iou(region, case.true_box) > 0.7, (case.name, region, case.true_box)
        padded = padded_box(region, 0.15, FRAME_SHAPE, CropTuning().min_side)
        assert contains(padded, case.true_box), (case.name, padded, case.true_box)

        jpeg = decode(crop_msg.payload)
        assert jpeg.ndim == 3 and max(jpeg.shape[:2]) <= 256
        x, y, w, h = padded
        expected = case.frame[y : y + h, x : x + w]
        if max(w, h) > 256:
            expected = cv2.resize(expected, (jpeg.shape[1], jpeg.shape[0]), interpolation=cv2.INTER_AREA)
        assert jpeg.shape == expected.shape
        mse = float(np.mean((jpeg.astype(np.float64) - expected.astype(np.float64)) ** 2))
        assert 10 * math.log10(255**2 / max(mse, 1e-9)) > 30  # the crop shows that very region of the frame

        assert e["frames"] == 2 and e["started_at"] == iso_utc(WALL0 + 0.1) and e["ts"] == iso_utc(WALL0 + 0.2)
        assert e["score"] == {"raw": 9.0, "normalized": 0.9, "threshold": 0.5}
        assert e["peak"] == {"raw": 9.0, "normalized": 0.9, "ts": iso_utc(WALL0 + 0.2)}
        assert e["model"] == {"name": "ae", "version": "1.0.0", "sha": "a" * 64}
        assert d.tracker.is_open and d.tracker.current_event_id == e["event_id"]
        assert d.tracker.stats()["crops"] == 1 and d.tracker.stats()["events_opened"] == 1


# ----------------------------------------------------------------------------------- hysteresis


@pytest.mark.parametrize(("open_frames", "close_frames"), [(1, 1), (2, 3), (3, 2)])
def test_open_and_close_after_exactly_n_frames(tile_case: Case, open_frames: int, close_frames: int) -> None:
    d = drive(tile_case, open_frames=open_frames, close_frames=close_frames)
    d.feed(0.1, 0.2)
    d.feed(*[0.9] * (open_frames - 1))
    assert d.sent == []
    d.feed(0.9)  # completes the run
    opened_at = d.i - 1
    d.feed(0.7)
    d.feed(*[0.2] * (close_frames - 1))
    assert d.kinds() == [(opened_at, "start", 0)]
    d.feed(0.3)  # completes the closing run
    closed_at = d.i - 1
    d.feed(0.1, 0.1)
    assert d.kinds() == [(opened_at, "start", 0), (closed_at, "end", 1)]
    end = d.events()[-1][1]
    assert end["reason"] == "normal" and end["frames"] == open_frames + 1 + close_frames
    assert end["ended_at"] == end["ts"] == iso_utc(WALL0 + closed_at * 0.1)
    assert end["duration_s"] == pytest.approx((closed_at - (opened_at - open_frames + 1)) * 0.1, abs=1e-3)
    assert end["score"]["normalized"] == 0.3 and end["peak"]["normalized"] == 0.9
    # frame numbers: the opening run's first frame .. the last frame at or above the threshold
    assert (end["first_frame"], end["last_frame"]) == (opened_at - open_frames + 1, opened_at + 1)
    assert d.events()[0][1]["last_frame"] == opened_at
    assert not d.tracker.is_open and d.tracker.current_event_id is None
    check_stream(d.sent)


def test_single_spikes_and_flapping(tile_case: Case) -> None:
    d = drive(tile_case, open_frames=2, close_frames=3)
    d.feed(0.1, 0.9, 0.1, 0.9, 0.2, 0.6, 0.4, 0.5, 0.49)  # spikes: never two in a row
    assert d.sent == []
    d.feed(0.9, 0.9)  # opens at frame 10
    d.feed(0.1, 0.1, 0.9, 0.1, 0.1, 0.8, 0.2, 0.2)  # flapping below close_frames keeps it open
    assert d.kinds() == [(10, "start", 0)]
    d.feed(0.2)  # third consecutive low frame: closes at 19
    d.feed(0.9)  # a lone spike after the end opens nothing
    d.feed(0.1)
    assert d.kinds() == [(10, "start", 0), (19, "end", 1)]
    assert d.events()[-1][1]["frames"] == 11
    check_stream(d.sent)
    assert d.tracker.stats() == {
        "events_opened": 1,
        "events_closed": 1,
        "updates": 0,
        "crops": 1,
        "crop_errors": 0,
        "nan_scores": 0,
    }


def test_threshold_is_per_frame_and_inclusive(tile_case: Case) -> None:
    d = drive(tile_case)
    d.feed(0.3, threshold=0.3)
    d.feed(0.3, threshold=0.3)  # >= threshold is anomalous
    d.feed(0.3, 0.3, 0.3, threshold=0.35)
    assert d.kinds() == [(1, "start", 0), (4, "end", 1)]
    assert d.events()[-1][1]["score"]["threshold"] == 0.35


def test_max_seconds_splits_a_long_event(tile_case: Case) -> None:
    d = drive(tile_case, dt=1.0, open_frames=2, close_frames=3, max_seconds=5.0)
    d.feed(*[0.9] * 12)
    # run starts at t=0 and opens at 1; at t=6 it is older than 5 s: ends (max_length) on that frame; the
    # next frames 7 and 8 make a new run, which opens at 8.
    assert d.kinds() == [(1, "start", 0), (6, "end", 1), (8, "start", 0)]
    (_, s1), (_, e1), (_, s2) = d.events()
    assert e1["reason"] == "max_length" and e1["event_id"] == s1["event_id"] != s2["event_id"]
    assert e1["duration_s"] == 6.0 and e1["frames"] == 7
    assert s2["started_at"] == iso_utc(WALL0 + 7.0) and s2["frames"] == 2
    assert s1["event_id"] < s2["event_id"]  # time-sortable
    check_stream(d.sent)


def test_min_gap_after_an_end(tile_case: Case) -> None:
    d = drive(tile_case, dt=1.0, open_frames=2, close_frames=1, min_gap_s=3.0)
    d.feed(0.9, 0.9, 0.1)  # start at 1, end at 2
    d.feed(0.9, 0.9, 0.9, 0.9)  # t=3,4 are inside the gap and do not count; t=5 starts a run, t=6 opens
    assert d.kinds() == [(1, "start", 0), (2, "end", 1), (6, "start", 0)]
    assert d.events()[-1][1]["started_at"] == iso_utc(WALL0 + 5.0)
    d.close("shutdown")  # at t=7
    d.feed(0.9, 0.9, 0.9)  # t=7, 8, 9 are in the gap after the shutdown end
    assert d.kinds()[-1] == (7, "end", 1) and not d.tracker.is_open
    d.feed(0.9, 0.9)  # t=10 starts a run, t=11 opens
    assert d.kinds()[-1] == (11, "start", 0)


def test_updates_only_when_peak_rose_and_interval_passed(pitting_case: Case) -> None:
    d = drive(pitting_case, dt=0.25, open_frames=2, close_frames=3, update_interval_s=1.0)
    d.feed(0.6, 0.6)  # opens at 1 (t=0.25)
    d.feed(0.6, 0.6, 0.6, 0.6, 0.6, 0.6)  # no rise: no update however long
    d.feed(0.7)  # i=8, t=2.0: rose and 1.75 s since start -> update
    d.feed(0.8)  # i=9, t=2.25: rose but only 0.25 s since the update: held
    d.feed(0.75, 0.7)  # i=10, 11: no rise
    d.feed(0.72)  # i=12, t=3.0: the held peak (0.8 at i=9) goes out now, with the crop of frame 9
    d.feed(0.72, 0.72, 0.72, 0.72, 0.72)  # peak did not rise since the last message: nothing
    d.feed(0.9)  # i=18, t=4.5: rose, interval passed
    d.feed(0.1, 0.1, 0.1)  # end at 21
    assert d.kinds() == [(1, "start", 0), (8, "update", 1), (12, "update", 2), (18, "update", 3), (21, "end", 4)]
    check_stream(d.sent)
    ev = dict(d.events())
    assert ev[8]["peak"] == {"raw": 7.0, "normalized": 0.7, "ts": iso_utc(WALL0 + 2.0)}
    assert ev[12]["peak"]["ts"] == iso_utc(WALL0 + 2.25) and ev[12]["score"]["normalized"] == 0.72
    assert ev[12]["crop"]["ts"] == iso_utc(WALL0 + 2.25) and ev[12]["ts"] == iso_utc(WALL0 + 3.0)
    assert ev[21]["crop"] == ev[18]["crop"]  # end names the peak crop already sent
    assert ev[21]["peak"]["normalized"] == 0.9 and ev[21]["frames"] == 22
    crops = [o for _, o in d.sent if o.kind == "crop"]
    assert len(crops) == 4 and [o.suffix for o in crops] == [crops[0].suffix] * 4
    assert d.tracker.stats()["updates"] == 3 and d.tracker.stats()["crops"] == 4


def test_a_saturated_score_still_follows_the_worst_frame(pitting_case: Case) -> None:
    """Normalised scores clip at 1.0 (a real defect is often far above the threshold): the raw score then tells
    which frame is worse, for the peak, its update and its crop."""
    d = drive(pitting_case, dt=0.25, open_frames=2, close_frames=3, update_interval_s=1.0)
    d.feed(1.0, 1.0, raw=3.0)  # opens at 1, already saturated
    d.feed(1.0, 1.0, 1.0, raw=3.0)  # no rise
    d.feed(1.0, raw=9.0)  # i=5, t=1.25: as saturated, but a worse frame
    d.feed(1.0, raw=5.0)
    d.feed(0.1, 0.1, 0.1)
    assert d.kinds() == [(1, "start", 0), (5, "update", 1), (9, "end", 2)]
    ev = dict(d.events())
    assert ev[5]["peak"] == {"raw": 9.0, "normalized": 1.0, "ts": iso_utc(WALL0 + 1.25)}
    assert ev[5]["crop"]["ts"] == iso_utc(WALL0 + 1.25) and ev[9]["peak"]["raw"] == 9.0
    check_stream(d.sent)


def test_frames_lost_in_between_restart_the_opening_run(tile_case: Case) -> None:
    """Anomalous frames on either side of a failed batch or a camera outage are not consecutive: the pipeline
    restarts the run (restart_run after a backend failure, close with no event open when a camera is lost)."""
    d = drive(tile_case, open_frames=2)
    d.feed(0.9)
    d.tracker.restart_run()
    d.feed(0.9)  # i=1 starts a new run
    assert d.sent == []
    d.close("camera_lost")  # nothing open: nothing sent, the run restarts
    assert d.sent == []
    d.feed(0.9, 0.9)  # i=2 starts a run, i=3 opens it
    assert d.kinds() == [(3, "start", 0)]
    assert d.events()[0][1]["first_frame"] == 2 and d.events()[0][1]["started_at"] == iso_utc(WALL0 + 0.2)
    d.tracker.restart_run()  # an open event stays open
    d.feed(0.9)
    assert d.tracker.is_open and d.kinds() == [(3, "start", 0)]


def test_a_peak_rise_before_the_end_is_reported_without_a_new_crop(tile_case: Case) -> None:
    d = drive(tile_case, dt=0.1, close_frames=2, update_interval_s=10.0)
    d.feed(0.6, 0.6, 0.95, 0.1, 0.1)
    assert d.kinds() == [(1, "start", 0), (4, "end", 1)]
    start, end = (e for _, e in d.events())
    assert end["peak"]["normalized"] == 0.95 and end["crop"] == start["crop"]
    assert [o.kind for _, o in d.sent] == ["crop", "event", "event"]


def test_model_swap_never_mixes_models(tile_case: Case) -> None:
    d = drive(tile_case)
    d.feed(0.9, 0.9, 0.9)
    d.feed(0.9, model=MODEL2)  # the first frame of the new model: the old event ends first
    assert d.kinds() == [(1, "start", 0), (3, "end", 1)]
    end = d.events()[-1][1]
    assert end["reason"] == "model_swap" and end["model"]["version"] == "1.0.0" and end["frames"] == 3
    d.feed(0.9, model=MODEL2)  # new run: frames 3 and 4 under MODEL2
    start = d.events()[-1][1]
    assert d.kinds()[-1] == (4, "start", 0) and start["model"]["version"] == "2.0.0"
    assert start["event_id"] != end["event_id"]
    # The pipeline's own close("model_swap") before the first frame of the next model.
    d.close("model_swap")
    assert d.kinds()[-1] == (5, "end", 1) and d.events()[-1][1]["reason"] == "model_swap"
    # A model change while closed restarts the opening run.
    d.feed(0.9, model=MODEL)
    d.feed(0.9, model=MODEL2)
    assert len(d.kinds()) == 4
    d.feed(0.9, model=MODEL2)
    assert d.kinds()[-1] == (7, "start", 0)
    check_stream(d.sent)


def test_close_on_shutdown_and_camera_loss(tile_case: Case) -> None:
    d = drive(tile_case)
    assert d.tracker.close("shutdown", wall=WALL0) == []
    d.feed(0.9, 0.9, 0.8)
    d.i += 5  # half a second without frames
    d.close("camera_lost")
    assert d.kinds() == [(1, "start", 0), (8, "end", 1)]
    end = d.events()[-1][1]
    assert end["reason"] == "camera_lost" and end["ended_at"] == iso_utc(WALL0 + 0.8)
    assert end["duration_s"] == 0.8 and end["score"]["normalized"] == 0.8  # the last scored frame
    assert d.tracker.close("shutdown", wall=WALL0 + 1) == []
    d.feed(0.9, 0.9)
    out = d.tracker.close("shutdown", wall=WALL0 + 2.0)  # without mono: duration on the wall clock
    e = json.loads(out[0].payload)
    assert e["reason"] == "shutdown" and e["duration_s"] == pytest.approx(2.0 - 0.8)
    check_stream(d.sent + [(d.i, out[0])])
    with pytest.raises(ValueError, match="unknown end reason"):
        d.tracker.close("bored", wall=WALL0)  # type: ignore[arg-type]


def test_nan_scores_are_ignored_and_inf_is_anomalous(tile_case: Case) -> None:
    d = drive(tile_case)
    d.feed(0.9, math.nan, 0.9)  # NaN does not break the run: it was never scored
    assert d.kinds() == [(2, "start", 0)]
    assert d.tracker.stats()["nan_scores"] == 1
    d.feed(0.1, math.nan, math.nan, 0.1, 0.1)
    assert d.kinds() == [(2, "start", 0), (7, "end", 1)]
    assert d.events()[-1][1]["frames"] == 5
    out = d.tracker.update(
        frame=tile_case.frame, roi=None, raw=1.0, normalized=0.9, threshold=math.nan, amap=tile_case.amap,
        model=MODEL, wall=WALL0, mono=1.0,
    )  # fmt: skip
    out += d.tracker.update(
        frame=tile_case.frame, roi=None, raw=None, normalized=0.9, threshold=0.5, amap=tile_case.amap,  # type: ignore[arg-type]
        model=MODEL, wall=WALL0, mono=1.0,
    )  # fmt: skip
    assert out == [] and d.tracker.stats()["nan_scores"] == 5

    d.i += 20
    d.feed(math.inf, math.inf)
    start = d.events()[-1][1]
    assert start["type"] == "start" and start["score"] == {"raw": None, "normalized": None, "threshold": 0.5}
    d.feed(-math.inf, -math.inf, -math.inf)
    assert d.events()[-1][1]["type"] == "end"
    check_stream(d.sent)


def test_odd_maps_and_frames_never_raise_but_wrong_rank_does(tile_case: Case) -> None:
    d = drive(tile_case, update_interval_s=1.0)
    amap = tile_case.amap.copy()
    amap[::7, ::5] = np.nan
    amap[3, 3] = np.inf
    d.feed(0.9, 0.9, amap=amap)
    assert d.kinds() == [(1, "start", 0)]
    e = d.events()[-1][1]
    assert iou((e["region"]["x"], e["region"]["y"], e["region"]["w"], e["region"]["h"]), tile_case.true_box) > 0.7
    with pytest.raises(ValueError, match="2-D"):
        d.feed(0.9, amap=amap[None])
    # A broken frame mid-event: the update goes out with the previous crop, the error is counted.
    out = d.tracker.update(
        frame=np.zeros((0, 0, 3), np.uint8), roi=None, raw=9.5, normalized=0.95, threshold=0.5, amap=amap,
        model=MODEL, wall=WALL0 + 5, mono=5.0,
    )  # fmt: skip
    assert [o.kind for o in out] == ["event"] and json.loads(out[0].payload)["crop"] == e["crop"]
    assert d.tracker.stats()["crop_errors"] == 1


def test_idle_update_does_no_work(tile_case: Case) -> None:
    """Below threshold, update() only compares: no crop, no box, and nothing kept that grows with the number
    of frames (a bad frame is not even looked at). One-off interpreter costs are paid in a warm-up first."""
    tr = EventTracker("cam0", "dev", EventTuning(), CropTuning())
    frame, amap = np.zeros((0, 0, 3), np.uint8), tile_case.amap

    def idle(n: int, start: int) -> int:
        sent = 0
        for i in range(start, start + n):
            sent += len(
                tr.update(frame=frame, roi=None, raw=1.0, normalized=0.1, threshold=0.5, amap=amap, model=MODEL,
                          wall=WALL0 + i, mono=float(i))
            )  # fmt: skip
        return sent

    tracemalloc.start()
    try:
        sent = idle(200, 0)
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sent += idle(5000, 200)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent == 0 and tr.stats()["crops"] == 0
    assert after - before < 4096 and peak - before < 8192, (before, after, peak)  # a leak of 16 B a call: 80 kB


def test_construction_is_validated() -> None:
    for bad in ("cam/0", "cam+", "", "cam 0", "câm", "#"):
        with pytest.raises(ValueError, match="camera id"):
            EventTracker(bad, "dev", EventTuning(), CropTuning())
    with pytest.raises(ValueError, match="open_frames"):
        EventTuning(open_frames=0)
    with pytest.raises(ValueError, match="max_seconds"):
        EventTuning(max_seconds=0)
    with pytest.raises(ValueError, match="min_gap_s"):
        EventTuning(min_gap_s=-1)
    with pytest.raises(ValueError, match="jpeg_quality"):
        CropTuning(jpeg_quality=0)
    with pytest.raises(ValueError, match="max_side"):
        CropTuning(max_side=0)
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.9996) == "2023-11-14T22:13:21.000Z"


def test_the_open_event_record_is_on_disk_around_each_send(tmp_path: Path) -> None:
    """A crash right after a start was handed to the outbox must still find that event open at the next start, and a
    crash right before an end was handed over must still end it: the record is written before a start or update is
    sent and cleared only after an end is. (Noting after the send left a start without an end on a loaded device.)"""
    from edge_daemon.open_events import OpenEventLog

    def message(kind: str, seq: int) -> Outgoing:
        body = {"type": kind, "event_id": "e1", "seq": seq, "camera": "cam0", "started_at": "2026-11-25T10:00:00Z"}
        return Outgoing("cam0/events", json.dumps(body).encode(), "event")

    record = OpenEventLog(tmp_path)
    on_disk_at_send: list[dict[str, object]] = []

    def send(m: Outgoing) -> None:  # what a crash at this instant would leave behind
        on_disk_at_send.append(json.loads(record.path.read_bytes()) if record.path.exists() else {})

    record.send_noted(message("start", 0), send)
    record.send_noted(message("update", 1), send)
    record.send_noted(Outgoing("cam0/crop/e1", b"\xff\xd8jpeg", "crop"), send)
    record.send_noted(message("end", 2), send)
    assert [d["e1"]["seq"] if "e1" in d else None for d in on_disk_at_send] == [0, 1, 1, 1]  # type: ignore[index]
    assert json.loads(record.path.read_bytes()) == {}  # ended: nothing left to end at the next start

    record.send_noted(message("start", 0), lambda m: None)  # then a crash: the next start ends it
    (end,) = OpenEventLog(tmp_path).ends_after_crash(now_wall=1795600000.0)
    body = json.loads(end.payload)
    assert body["type"] == "end" and body["reason"] == "restart" and body["seq"] == 1 and end.suffix == "cam0/events"
