"""A "production line" video assembled from real photographs, for the demo, the tests and the streaming benchmark.

Every test image of an MVTec-layout folder (test/good and test/<defect>) becomes one part passing the camera:
shuffled with a seed, each is held for ``hold`` frames, pasted at a fixed place on a plain grey belt (so the
daemon's ROI is exercised), and written as an MJPEG .avi. Beside it, ``<video>.parts.json`` says which frames
show which part and whether it is defective, so that events can be scored against the truth.

    python scripts/line_video.py ../shared/data/mvtec_bottle .demo/line.avi --hold 5 --fps 10

The images are real (MVTec AD bottle, BSData, ...); only the belt around them and the order are made up.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class Part:
    index: int
    first_frame: int  # inclusive, 0-based frame number in the video
    last_frame: int  # inclusive
    label: str  # "good" or the defect folder's name
    defective: bool
    image: str  # path relative to the data folder


@dataclass(frozen=True)
class LineVideo:
    video: Path
    frames: int
    fps: float
    roi: tuple[int, int, int, int]  # x, y, w, h of the part in every frame
    parts: list[Part]

    def part_at(self, frame: int) -> Part | None:
        for part in self.parts:
            if part.first_frame <= frame <= part.last_frame:
                return part
        return None


def make_line_video(
    data: Path,
    out: Path,
    *,
    hold: int = 5,
    fps: float = 10.0,
    part_size: int = 256,
    margin: int = 32,
    seed: int = 0,
    limit: int | None = None,
    labels: set[str] | None = None,
) -> LineVideo:
    """Write ``out`` (.avi, MJPEG) and ``out.parts.json`` from the test images of ``data`` (only the test/<label>
    folders named in ``labels``, e.g. {"good"}, when given); return what was written."""
    data, out = Path(data), Path(out)
    images = sorted(
        p
        for p in (data / "test").glob("*/*")
        if p.suffix.lower() in IMAGE_SUFFIXES and (labels is None or p.parent.name in labels)
    )
    if not images:
        raise ValueError(f"{data}/test has no images (expected the MVTec layout: test/good, test/<defect>)")
    random.Random(seed).shuffle(images)
    if limit is not None:
        images = images[:limit]
    width, height = part_size + 2 * margin, part_size + margin
    roi = (margin, margin // 2, part_size, part_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPEG video at {out}")
    belt = np.full((height, width, 3), 96, np.uint8)
    parts, frame = [], 0
    try:
        for i, path in enumerate(images):
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"{path} cannot be decoded")
            canvas = belt.copy()
            canvas[roi[1] : roi[1] + part_size, roi[0] : roi[0] + part_size] = cv2.resize(
                img, (part_size, part_size), interpolation=cv2.INTER_AREA
            )
            for _ in range(hold):
                writer.write(canvas)
            label = path.parent.name
            parts.append(Part(i, frame, frame + hold - 1, label, label != "good", str(path.relative_to(data))))
            frame += hold
    finally:
        writer.release()
    video = LineVideo(out, frame, fps, roi, parts)
    meta = {
        "video": out.name,
        "frames": frame,
        "fps": fps,
        "roi": list(roi),
        "source": str(data),
        "parts": [asdict(p) for p in parts],
    }
    Path(f"{out}.parts.json").write_text(json.dumps(meta, indent=1) + "\n")
    return video


def load_line_video(video: Path) -> LineVideo:
    """Read back what ``make_line_video`` wrote beside ``video``."""
    meta = json.loads(Path(f"{video}.parts.json").read_text())
    return LineVideo(Path(video), meta["frames"], meta["fps"], tuple(meta["roi"]), [Part(**p) for p in meta["parts"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="an MVTec-layout folder (its test/ images are the parts)")
    p.add_argument("out", type=Path, help="the .avi to write")
    p.add_argument("--hold", type=int, default=5, help="frames per part")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many parts")
    args = p.parse_args()
    video = make_line_video(args.data, args.out, hold=args.hold, fps=args.fps, seed=args.seed, limit=args.limit)
    bad = sum(p.defective for p in video.parts)
    print(f"{video.video}: {video.frames} frames, {len(video.parts)} parts ({bad} defective), roi {video.roi}")


if __name__ == "__main__":
    main()
