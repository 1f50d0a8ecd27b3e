"""Per-camera anomaly events: a hysteresis state machine on the normalised score, and the JPEG crops.

The pipeline scores one frame of one camera at a time and calls :meth:`EventTracker.update`; the tracker
returns the MQTT messages to send, in order (a crop always BEFORE the event that names it). Topics are
relative to the device prefix P (DESIGN.md, "MQTT"): ``<camera>/events`` and ``<camera>/crop/<event_id>``.

State machine (per camera, ``normalized >= threshold`` means anomalous):

* closed: ``open_frames`` consecutive anomalous frames open an event ("start", seq 0) on the frame that
  completes the run, with a crop of that frame. Anomalous frames within ``min_gap_s`` of the previous end
  do not count towards a run.
* open: every scored frame counts in ``frames``. ``close_frames`` consecutive non-anomalous frames end it
  ("end", reason "normal"); an event older than ``max_seconds`` ends with "max_length" (a new one may open
  after ``open_frames`` again). When the peak rose since the last message and ``update_interval_s`` has
  passed, a new crop of the peak frame and an "update" are sent.
* :meth:`EventTracker.close` ends an open event with a reason (camera_lost, scoring_failed, model_swap, shutdown).

Times: ``wall`` (seconds since the epoch) is what messages report; ``mono`` (a monotonic clock, seconds) is
what durations, gaps and intervals are measured on, so a wall-clock step never splits or stretches an event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

import cv2
import numpy as np

log = logging.getLogger(__name__)

# "restart": ended at the next start after a crash or power cut left it open (edge_daemon.open_events)
EndReason = Literal[
    "normal", "max_length", "camera_lost", "source_ended", "scoring_failed", "model_swap", "shutdown", "restart"
]
_END_REASONS: frozenset[str] = frozenset(get_args(EndReason))
_TOPIC_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class EventTuning:
    """Hysteresis and pacing of events.

    open_frames: consecutive anomalous frames that open an event (>= 1).
    close_frames: consecutive non-anomalous frames that close it (>= 1).
    max_seconds: an event older than this (monotonic seconds since its first frame) ends with "max_length".
    min_gap_s: after an end, anomalous frames start counting towards a new event only after this gap.
    update_interval_s: at most one "update" per interval, sent only when the peak rose since the last message.
    """

    open_frames: int = 2
    close_frames: int = 3
    max_seconds: float = 60.0
    min_gap_s: float = 0.0
    update_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.open_frames < 1 or self.close_frames < 1:
            raise ValueError(f"open_frames and close_frames must be >= 1, got {self.open_frames}, {self.close_frames}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if not (self.min_gap_s >= 0 and self.update_interval_s >= 0):
            raise ValueError(
                f"min_gap_s and update_interval_s must be >= 0, got {self.min_gap_s}, {self.update_interval_s}"
            )


@dataclass(frozen=True)
class CropTuning:
    """How crops are cut: ``padding`` is the fraction of the box's width/height added on each side,
    ``min_side`` (px) the least width and height of the cut (grown around the box, within the frame: a small
    defect still comes with enough of the part around it for a person to place it), ``max_side`` (px) the
    longest side after downscaling, ``jpeg_quality`` 1..100."""

    padding: float = 0.15
    max_side: int = 512
    jpeg_quality: int = 90
    min_side: int = 96

    def __post_init__(self) -> None:
        if not self.padding >= 0:
            raise ValueError(f"crop padding must be >= 0, got {self.padding}")
        if self.max_side < 1:
            raise ValueError(f"crop max_side must be >= 1, got {self.max_side}")
        if self.min_side < 0:
            raise ValueError(f"crop min_side must be >= 0, got {self.min_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class ModelRef:
    """The model that scored a frame, as events report it."""

    name: str
    version: str
    sha: str


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message: ``suffix`` is the topic relative to the device prefix P."""

    suffix: str
    payload: bytes
    kind: Literal["event", "crop"]


Box = tuple[int, int, int, int]  # (x, y, w, h) in frame pixels


# --------------------------------------------------------------------------------------------- geometry


def _clamp_roi(frame_shape: tuple[int, int], roi: tuple[int, int, int, int] | None) -> Box:
    """The roi clamped to the frame (at least 1x1 px); None = the whole frame."""
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    if roi is None:
        return 0, 0, fw, fh
    x, y, w, h = (int(v) for v in roi)
    x0, y0 = min(max(x, 0), fw - 1), min(max(y, 0), fh - 1)
    x1, y1 = min(max(x + w, x0 + 1), fw), min(max(y + h, y0 + 1), fh)
    return x0, y0, x1 - x0, y1 - y0


def _clean_map(amap: np.ndarray) -> np.ndarray:
    """The map as float32 with NaN -> its finite minimum and +-inf -> its finite max/min (all non-finite: zeros)."""
    if amap.ndim != 2 or amap.shape[0] < 1 or amap.shape[1] < 1:
        raise ValueError(f"anomaly map must be a non-empty 2-D (h, w) array, got shape {tuple(amap.shape)}")
    m = np.asarray(amap, dtype=np.float32)
    finite = np.isfinite(m)
    if finite.all():
        return m
    if not finite.any():
        return np.zeros(m.shape, np.float32)
    lo, hi = float(m[finite].min()), float(m[finite].max())
    return np.nan_to_num(m, nan=lo, posinf=hi, neginf=lo)


def anomaly_box(amap: np.ndarray, frame_shape: tuple[int, int], roi: tuple[int, int, int, int] | None) -> Box:
    """The box (x, y, w, h), in FRAME pixels, of the largest connected component of the thresholded map.

    ``amap`` is the model's (h, w) anomaly map of the region ``roi`` = (x, y, w, h) of the frame (None = the
    whole frame) resized to the model size; ``frame_shape`` is (height, width), i.e. ``frame.shape[:2]``.

    Thresholding: the bundle calibrates only the image score, not pixels, so there is no absolute pixel
    threshold to use. The map is smoothed lightly with a 3x3 Gaussian (weights 1-2-1: a lone hot pixel drops
    to 1/4 of its height, so one-pixel noise neither seeds nor splits a component) and thresholded RELATIVELY
    at ``min + 0.5 * (max - min)`` of the smoothed map, i.e. the blob's extent at half its height: scale-free,
    so it works for any model's map units, and a clean blob comes back with about its own extent. A 3x3 box
    blur was tried first and dropped: it takes a convex corner to 4/9 < 1/2 and so shaved one model pixel off
    every side of small blobs (measured on the real bsdata/magnetic-tile masks at 64 px: median box IoU 0.68
    vs 0.71 for the Gaussian on pitting); the Gaussian keeps a corner at 9/16. On a map with no clear blob
    this picks the strongest patch, which is acceptable because a box is only cut once the image score already
    says anomalous. The largest component
    (8-connectivity, by area) is mapped model px -> roi px -> frame px: model pixel column i covers roi columns
    [i * rw / w, (i + 1) * rw / w), so the box edges are floored/ceiled outward, then clamped to the frame.
    A flat map (max == min after cleaning) gives the whole roi. NaN/inf in the map are cleaned, never raised;
    a map that is not 2-D raises ValueError (a pipeline bug).
    """
    m = _clean_map(amap)
    rx, ry, rw, rh = _clamp_roi(frame_shape, roi)
    smooth = cv2.GaussianBlur(m, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    lo, hi = float(smooth.min()), float(smooth.max())
    if not hi > lo:
        return rx, ry, rw, rh
    mask = (smooth >= lo + 0.5 * (hi - lo)).astype(np.uint8)
    n, _labels, stats, _centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:  # cannot happen (the max pixel is always in), but a box is owed whatever the map
        return rx, ry, rw, rh
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mx, my = int(stats[best, cv2.CC_STAT_LEFT]), int(stats[best, cv2.CC_STAT_TOP])
    mw, mh = int(stats[best, cv2.CC_STAT_WIDTH]), int(stats[best, cv2.CC_STAT_HEIGHT])
    sx, sy = rw / m.shape[1], rh / m.shape[0]
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    x0 = min(max(rx + math.floor(mx * sx + 1e-9), 0), fw - 1)
    y0 = min(max(ry + math.floor(my * sy + 1e-9), 0), fh - 1)
    x1 = min(max(rx + math.ceil((mx + mw) * sx - 1e-9), x0 + 1), fw)
    y1 = min(max(ry + math.ceil((my + mh) * sy - 1e-9), y0 + 1), fh)
    return x0, y0, x1 - x0, y1 - y0


def padded_box(box: Box, padding: float, frame_shape: tuple[int, int], min_side: int = 0) -> Box:
    """``box`` grown by ``padding`` x its width (height) on each side, then to at least ``min_side`` px wide and
    high around its centre (shifted, not cut, at the frame's edges), clamped to the frame (at least 1x1 px)."""
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    x, y, w, h = (int(v) for v in box)
    w, h = max(w, 1), max(h, 1)
    px, py = int(round(w * padding)), int(round(h * padding))
    x0, x1 = _grow(x - px, x + w + px, min_side, fw)
    y0, y1 = _grow(y - py, y + h + py, min_side, fh)
    return x0, y0, x1 - x0, y1 - y0


def _grow(lo: int, hi: int, min_len: int, limit: int) -> tuple[int, int]:
    """The span [lo, hi) grown to ``min_len`` around its centre and moved inside [0, limit), at least 1 long."""
    if hi - lo < min_len:
        centre = (lo + hi) / 2
        lo, hi = int(round(centre - min_len / 2)), int(round(centre - min_len / 2)) + min_len
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > limit:
            lo, hi = lo - (hi - limit), limit
    lo = min(max(lo, 0), limit - 1)
    hi = min(max(hi, lo + 1), limit)
    return lo, hi


def cut_crop(frame: np.ndarray, box: Box, padding: float, max_side: int, min_side: int = 0) -> np.ndarray:
    """The padded ``box`` (see :func:`padded_box`) cut from ``frame`` (H, W[, C]) and, if its longer side
    exceeds ``max_side`` px, downscaled (INTER_AREA, aspect kept) to fit. Always a new array: the caller
    may reuse its frame buffer afterwards."""
    if frame.ndim not in (2, 3) or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame must be a non-empty (H, W) or (H, W, C) image, got shape {tuple(frame.shape)}")
    x, y, w, h = padded_box(box, padding, frame.shape[:2], min_side)
    region = frame[y : y + h, x : x + w]
    scale = max_side / max(w, h)
    if scale >= 1.0:
        return region.copy()
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(region, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR (or grey) image; a non-uint8 image is clipped to 0..255 first.
    Raises ValueError if OpenCV cannot encode it."""
    img = image if image.dtype == np.uint8 else np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode an image of shape {tuple(image.shape)}")
    return buf.tobytes()


# --------------------------------------------------------------------------------------------- messages


def iso_utc(wall: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. '2024-05-01T12:00:00.123Z'."""
    ms = int(round(wall * 1000)) if math.isfinite(wall) else 0
    return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _num(v: float) -> float | None:
    """JSON has no NaN/inf: a non-finite number is sent as null."""
    return v if math.isfinite(v) else None


@dataclass
class _Event:
    """The open event's state (mutable; one per open event)."""

    event_id: str
    model: ModelRef
    started_wall: float
    started_mono: float
    seq: int = 0
    frames: int = 0
    below: int = 0
    last_msg_mono: float = 0.0
    peak_raw: float = -math.inf
    peak_norm: float = -math.inf
    peak_wall: float = 0.0
    region: Box = (0, 0, 0, 0)
    crop: dict[str, Any] | None = None  # the last crop sent: {"topic", "sha256", "bytes", "ts"}
    first_frame: int | None = None  # camera frame number of the first anomalous frame (the opening run's first)
    last_frame: int | None = None  # camera frame number of the last anomalous frame so far
    peak_dirty: bool = False  # the peak rose since the last message
    pending: np.ndarray | None = None  # crop image of that peak (None if it could not be cut)
    pending_wall: float = 0.0


class EventTracker:
    """The event state machine of one camera (see the module docstring); not thread-safe (one scorer calls it).

    ``camera_id`` must match ``[A-Za-z0-9_-]+`` (it goes into topics; ValueError otherwise). ``device_id``
    is reported in the JSON and, with ``topic_prefix`` (the config's mqtt.topic_prefix), makes the full topic
    that an event's crop names: ``<topic_prefix>/<device_id>/<camera>/crop/<event_id>``.

    Event JSON (compact UTF-8, DESIGN.md "MQTT"): type, event_id (``<camera>-<ms since epoch, 13 digits>-<8
    hex>``, time-sortable), seq, device, camera, ts (the frame the message is about), started_at (the first
    frame of the opening run), ended_at (end), duration_s (update/end, monotonic), frames (scored frames in
    the event, the opening run included), first_frame / last_frame (camera frame numbers of the first and
    last anomalous frame, null when the caller gives none), score {raw, normalized, threshold} (this frame), peak {raw,
    normalized, ts} (highest normalized score from the opening frame on), region {x, y, w, h} (frame px, at
    the peak), crop {topic (the full MQTT topic), sha256, bytes, ts (the frame it was cut from)} or null,
    model {name, version, sha}, reason (end). A non-finite number (an +inf score) is sent as null: JSON has no inf.
    An end sends no new crop: if the peak rose after the last crop, "peak" is the true peak and "crop" the
    last one sent (its "ts" tells which frame it shows).
    """

    def __init__(
        self, camera_id: str, device_id: str, tuning: EventTuning, crop: CropTuning, *, topic_prefix: str = "inspect"
    ) -> None:
        if not isinstance(camera_id, str) or not _TOPIC_SAFE.match(camera_id):
            raise ValueError(f"camera id {camera_id!r} may hold only A-Z, a-z, 0-9, '_' and '-' (it is part of topics)")
        self.camera_id = camera_id
        self.device_id = device_id
        self._topic_root = f"{topic_prefix}/{device_id}"
        self.tuning = tuning
        self.crop_tuning = crop
        self._events_topic = f"{camera_id}/events"
        self._event: _Event | None = None
        self._model: ModelRef | None = None
        self._run = 0  # consecutive anomalous frames while closed
        self._run_wall = 0.0
        self._run_mono = 0.0
        self._run_seq: int | None = None
        self._last_end_mono = -math.inf
        self._last_mono = 0.0
        self._last_score: tuple[float, float, float] = (math.nan, math.nan, math.nan)
        self._stats = {
            "events_opened": 0,
            "events_closed": 0,
            "updates": 0,
            "crops": 0,
            "crop_errors": 0,
            "nan_scores": 0,
        }

    # ------------------------------------------------------------------ public

    @property
    def is_open(self) -> bool:
        return self._event is not None

    @property
    def current_event_id(self) -> str | None:
        return None if self._event is None else self._event.event_id

    def stats(self) -> dict[str, int]:
        """Counters since creation: events_opened, events_closed, updates, crops (sent), crop_errors
        (a crop that could not be cut or encoded: the event then names the last crop sent, or null), nan_scores
        (frames ignored because a score or the threshold was NaN or not a number)."""
        return dict(self._stats)

    def update(
        self,
        *,
        frame: np.ndarray,
        roi: tuple[int, int, int, int] | None,
        raw: float,
        normalized: float,
        threshold: float,
        amap: np.ndarray,
        model: ModelRef,
        wall: float,
        mono: float,
        frame_seq: int | None = None,
    ) -> list[Outgoing]:
        """Feed one scored frame; returns the messages to publish, in order (crops before their event).

        ``frame``: the full BGR uint8 frame; ``roi``: the scored region (x, y, w, h) of it, None = whole frame;
        ``amap``: the (h, w) anomaly map at model resolution (ValueError if not 2-D: a pipeline bug);
        ``normalized >= threshold`` is anomalous. A NaN (or non-numeric) raw, normalized or threshold means
        "not scored": the frame is ignored and counted in stats()["nan_scores"]; +inf is anomalous.
        If ``model`` differs from the open event's model, the event is first ended with reason "model_swap"
        (an event never mixes models) and this frame then counts under the new model; a model change while
        closed restarts the opening run. ``frame_seq`` is the camera's frame number (capture order): events
        report their first and last anomalous frame by it ("first_frame", "last_frame"; null without it).
        Cheap when nothing happens: only comparisons until an event opens.
        """
        if amap.ndim != 2:
            raise ValueError(f"anomaly map must be 2-D (h, w), got shape {tuple(amap.shape)}")
        try:
            raw, normalized, threshold = float(raw), float(normalized), float(threshold)
        except (TypeError, ValueError):
            self._stats["nan_scores"] += 1
            return []
        if math.isnan(raw) or math.isnan(normalized) or math.isnan(threshold):
            self._stats["nan_scores"] += 1
            return []
        out: list[Outgoing] = []
        if model != self._model:
            if self._event is not None:
                out += self.close("model_swap", wall=wall, mono=mono)
            self._model = model
            self._run = 0
        self._last_mono = mono
        self._last_score = (raw, normalized, threshold)
        anomalous = normalized >= threshold
        ev = self._event
        if ev is None:
            if not anomalous or mono - self._last_end_mono < self.tuning.min_gap_s:
                self._run = 0
                return out
            if self._run == 0:
                self._run_wall, self._run_mono, self._run_seq = wall, mono, frame_seq
            self._run += 1
            if self._run >= self.tuning.open_frames:
                out += self._open(frame, roi, raw, normalized, amap, model, wall, mono, frame_seq)
            return out
        if anomalous:
            ev.last_frame = frame_seq
        return out + self._step_open(ev, frame, roi, raw, normalized, anomalous, amap, wall, mono)

    def restart_run(self) -> None:
        """Forget the anomalous frames counted towards opening an event: frames were lost in between (a batch the
        backend failed to score), so those frames and the next ones are not consecutive. An open event stays open."""
        self._run = 0

    def close(self, reason: EndReason, *, wall: float, mono: float | None = None) -> list[Outgoing]:
        """End the open event with ``reason`` ("end" message, no new crop; it names the last crop sent);
        [] if none is open. Also restarts the opening run. ``mono`` (the monotonic clock now) measures the
        duration and starts min_gap_s; without it, the duration is taken on ``wall`` and the gap starts at
        the last frame seen. ValueError for an unknown reason (a pipeline bug)."""
        if reason not in _END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}; expected one of {sorted(_END_REASONS)}")
        self._run = 0
        ev = self._event
        if ev is None:
            return []
        if mono is None:
            duration = max(0.0, wall - ev.started_wall)
            self._last_end_mono = self._last_mono
        else:
            duration = max(0.0, mono - ev.started_mono)
            self._last_end_mono = mono
        return [self._end(ev, reason, wall, duration)]

    # ------------------------------------------------------------------ internals

    def _open(
        self,
        frame: np.ndarray,
        roi: tuple[int, int, int, int] | None,
        raw: float,
        normalized: float,
        amap: np.ndarray,
        model: ModelRef,
        wall: float,
        mono: float,
        frame_seq: int | None,
    ) -> list[Outgoing]:
        """Open an event on the frame that completed the run; the peak starts at this frame (the earlier
        frames of the run had no crop cut, and a peak without its region and crop would be half a fact)."""
        started_ms = max(0, int(self._run_wall * 1000)) if math.isfinite(self._run_wall) else 0
        event_id = f"{self.camera_id}-{started_ms:013d}-{secrets.token_hex(4)}"
        ev = _Event(event_id=event_id, model=model, started_wall=self._run_wall, started_mono=self._run_mono)
        ev.frames = self._run
        ev.first_frame, ev.last_frame = self._run_seq, frame_seq
        self._run = 0
        self._event = ev
        self._stats["events_opened"] += 1
        ev.peak_raw, ev.peak_norm, ev.peak_wall = raw, normalized, wall
        ev.region = self._region(frame, roi, amap)
        ev.pending, ev.pending_wall = self._cut(frame, ev.region), wall
        out = self._send_crop(ev)
        out.append(self._message(ev, "start", wall))
        ev.last_msg_mono = mono
        return out

    def _step_open(
        self,
        ev: _Event,
        frame: np.ndarray,
        roi: tuple[int, int, int, int] | None,
        raw: float,
        normalized: float,
        anomalous: bool,
        amap: np.ndarray,
        wall: float,
        mono: float,
    ) -> list[Outgoing]:
        ev.frames += 1
        ev.below = 0 if anomalous else ev.below + 1
        reason: EndReason | None = None
        if ev.below >= self.tuning.close_frames:
            reason = "normal"
        elif mono - ev.started_mono > self.tuning.max_seconds:
            reason = "max_length"
        # Normalised scores saturate at 1.0 (Calibration.normalise clips): the raw score tells a worse frame then.
        new_peak = (normalized, raw) > (ev.peak_norm, ev.peak_raw)
        if new_peak:
            ev.peak_raw, ev.peak_norm, ev.peak_wall = raw, normalized, wall
            ev.region = self._region(frame, roi, amap)
        if reason is not None:
            self._last_end_mono = mono
            return [self._end(ev, reason, wall, max(0.0, mono - ev.started_mono))]
        if new_peak:
            ev.pending, ev.pending_wall = self._cut(frame, ev.region), wall
            ev.peak_dirty = True
        if not ev.peak_dirty or mono - ev.last_msg_mono < self.tuning.update_interval_s:
            return []
        ev.peak_dirty = False
        out = self._send_crop(ev)  # [] if the crop failed: the update then names the last crop sent
        out.append(self._message(ev, "update", wall, duration=max(0.0, mono - ev.started_mono)))
        ev.last_msg_mono = mono
        self._stats["updates"] += 1
        return out

    def _end(self, ev: _Event, reason: EndReason, wall: float, duration: float) -> Outgoing:
        self._event = None
        self._stats["events_closed"] += 1
        return self._message(ev, "end", wall, duration=duration, reason=reason)

    def _region(self, frame: np.ndarray, roi: tuple[int, int, int, int] | None, amap: np.ndarray) -> Box:
        shape = frame.shape[:2] if frame.ndim in (2, 3) and frame.shape[0] > 0 and frame.shape[1] > 0 else None
        if shape is None:
            return (0, 0, 0, 0) if roi is None else tuple(int(v) for v in roi)  # type: ignore[return-value]
        return anomaly_box(amap, (int(shape[0]), int(shape[1])), roi)

    def _cut(self, frame: np.ndarray, region: Box) -> np.ndarray | None:
        try:
            return cut_crop(
                frame, region, self.crop_tuning.padding, self.crop_tuning.max_side, self.crop_tuning.min_side
            )
        except (ValueError, cv2.error) as exc:
            self._stats["crop_errors"] += 1
            log.warning("camera %s: no crop for this frame: %s", self.camera_id, exc)
            return None

    def _send_crop(self, ev: _Event) -> list[Outgoing]:
        """Encode the pending crop (if any) and return its message; the event then names it."""
        image, ev.pending = ev.pending, None
        if image is None:
            return []
        try:
            data = encode_jpeg(image, self.crop_tuning.jpeg_quality)
        except (ValueError, cv2.error) as exc:
            self._stats["crop_errors"] += 1
            log.warning("camera %s: crop not encoded: %s", self.camera_id, exc)
            return []
        suffix = f"{self.camera_id}/crop/{ev.event_id}"
        ev.crop = {
            "topic": f"{self._topic_root}/{suffix}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "ts": iso_utc(ev.pending_wall),
        }
        self._stats["crops"] += 1
        return [Outgoing(suffix=suffix, payload=data, kind="crop")]

    def _message(
        self, ev: _Event, kind: str, wall: float, *, duration: float | None = None, reason: str | None = None
    ) -> Outgoing:
        raw, normalized, threshold = self._last_score
        x, y, w, h = ev.region
        msg: dict[str, Any] = {
            "type": kind,
            "event_id": ev.event_id,
            "seq": ev.seq,
            "device": self.device_id,
            "camera": self.camera_id,
            "ts": iso_utc(wall),
            "started_at": iso_utc(ev.started_wall),
        }
        if kind == "end":
            msg["ended_at"] = iso_utc(wall)
        if duration is not None:
            msg["duration_s"] = round(duration, 3)
        msg.update(
            {
                "frames": ev.frames,
                "first_frame": ev.first_frame,
                "last_frame": ev.last_frame,
                "score": {"raw": _num(raw), "normalized": _num(normalized), "threshold": _num(threshold)},
                "peak": {"raw": _num(ev.peak_raw), "normalized": _num(ev.peak_norm), "ts": iso_utc(ev.peak_wall)},
                "region": {"x": x, "y": y, "w": w, "h": h},
                "crop": ev.crop,
                "model": {"name": ev.model.name, "version": ev.model.version, "sha": ev.model.sha},
            }
        )
        if reason is not None:
            msg["reason"] = reason
        ev.seq += 1
        payload = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        return Outgoing(suffix=self._events_topic, payload=payload, kind="event")
