"""THE hot path: camera frames -> one batch -> backend -> calibrated scores -> events -> outbox.

Read ``Pipeline.step`` top to bottom: it is everything that happens to a frame.

1. take the latest frame of every camera that has a new one (capture threads keep only the latest: the scorer
   never falls behind a live camera, and each replaced frame is counted as dropped by the camera);
2. cut each camera's ROI and preprocess it exactly as the bundle's manifest says (deploy.preprocess);
3. score the frames of all cameras in one backend call (up to the backend's max batch);
4. normalise the raw scores with the bundle's calibration (threshold -> 0.5);
5. feed each camera's event state machine, which returns the crops and events to publish;
6. hand those to the outbox (``send``: the MQTT link's spool-backed sender; never blocks on the network).

Between two batches, and only there, the pipeline applies a requested backend/model swap (open events are
closed with reason "model_swap" first, so no event mixes two models) and closes the events of cameras that went
offline (reason "camera_lost") and of cameras whose frames keep arriving but have failed to be scored for
``failing_end_s`` (reason "scoring_failed": a backend that keeps failing, an roi outside the frame), since nobody
can say whether such an event is still going on. The pipeline runs on one thread; other threads talk to it only through
``set_threshold``, ``request_swap`` and the read-only counters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from deploy.preprocess import preprocess
from edge_daemon.backends.base import Backend
from edge_daemon.capture.camera import Camera, Frame
from edge_daemon.events import EndReason, EventTracker, ModelRef, Outgoing
from edge_daemon.model import LoadedBundle

log = logging.getLogger("edge_daemon.pipeline")
LATENCY_WINDOW = 2048  # frames kept per camera for the latency percentiles
DEFAULT_THRESHOLD = 0.5  # the calibrated threshold, in normalised units
FAILING_S = 10.0  # seconds of frames arriving and none scored: the camera's open event ends, /healthz says failing


@dataclass
class CameraLane:
    """One camera's share of the pipeline: its capture, its event state machine, its threshold and counters."""

    camera: Camera
    tracker: EventTracker
    roi: tuple[int, int, int, int] | None = None
    threshold: float = DEFAULT_THRESHOLD
    threshold_source: str = "bundle"  # bundle | config | command
    scored: int = 0
    anomalous: int = 0
    roi_errors: int = 0
    frames_failed: int = 0  # frames in batches the backend failed on (the pipeline's backend_errors counts batches)
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # monotonic seconds: when a frame of this camera was last scored (at first: when the lane was made), and when one
    # last failed to be (ROI outside the frame, backend error); ``failure`` says why
    last_scored: float = field(default_factory=time.monotonic)
    last_failed: float | None = None
    first_failed: float | None = None  # the first failure since the last frame scored
    failure: str | None = None
    roi_checked_for: tuple[int, int] | None = None  # the frame size (h, w) the roi was last checked against

    def failing_for(self, now: float) -> float | None:
        """Seconds since the first of the frames that have all failed to be scored since the last one scored, or None
        when the last frame that came was scored or none failed. (From the first failure, not the last success: a
        pause of the source before one failed batch is no failure time.)"""
        if self.last_failed is None or self.last_failed < self.last_scored or self.first_failed is None:
            return None
        return now - self.first_failed

    def note_failure(self, now: float, why: str) -> None:
        """A frame of this camera could not be scored at ``now`` (monotonic seconds), for ``why``."""
        if self.last_failed is None or self.last_failed < self.last_scored:
            self.first_failed = now
        self.last_failed, self.failure = now, why

    @property
    def camera_id(self) -> str:
        return self.camera.camera_id


def roi_fit_problem(roi: tuple[int, int, int, int], shape: tuple[int, int]) -> str | None:
    """None when ``roi`` (x, y, w, h) lies inside a frame of ``shape`` (h, w), else what happens to it, one line."""
    x, y, w, h = roi
    H, W = shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return f"roi {roi} lies outside the {W}x{H} frame: none of its frames is scored"
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        return f"roi {roi} reaches past the {W}x{H} frame: only its {x1 - x0}x{y1 - y0} part inside is scored"
    return None


def cut_roi(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """The ROI (x, y, w, h, frame pixels) of ``image``, clamped to the frame; the whole frame when None.

    ValueError when the ROI lies outside the frame (the camera's resolution does not fit the config).
    """
    if roi is None:
        return image
    x, y, w, h = roi
    H, W = image.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"roi {roi} lies outside the {W}x{H} frame")
    return image[y0:y1, x0:x1]


class Pipeline:
    """Scores the cameras' frames with one backend and turns scores into events (see the module docstring)."""

    def __init__(
        self,
        lanes: Sequence[CameraLane],
        backend: Backend,
        bundle: LoadedBundle,
        send: Callable[[Outgoing], None],
        frame_ready: threading.Event,
        *,
        failing_end_s: float = FAILING_S,
    ) -> None:
        """``failing_end_s``: seconds for which a camera's frames may fail to be scored before its open event ends
        with reason "scoring_failed"."""
        self.failing_end_s = failing_end_s
        self.lanes = {lane.camera_id: lane for lane in lanes}
        self.backend = backend
        self.bundle = bundle
        self.model = ModelRef(bundle.name, bundle.version, bundle.sha)
        self.send = send
        self.frame_ready = frame_ready
        self.batches = 0
        self.backend_errors = 0
        self.last_error: str | None = None
        self.heartbeat = time.monotonic()  # last time the loop went round: the watchdog's evidence of progress
        self.ended = False  # run() returned "ended": its heartbeat stops, and that is not a stall
        self._swap: tuple[Backend, LoadedBundle] | None = None
        self._swap_lock = threading.Lock()

    # ------------------------------------------------------------------ called from other threads

    def set_threshold(self, camera_id: str, threshold: float, source: str) -> None:
        """Change one camera's threshold (normalised units, 0 < t < 1); effective from the next frame."""
        lane = self.lanes[camera_id]
        lane.threshold = float(threshold)
        lane.threshold_source = source

    def request_swap(self, backend: Backend, bundle: LoadedBundle) -> None:
        """Serve ``backend`` (for ``bundle``) from the next batch on. The swap happens on the pipeline thread."""
        with self._swap_lock:
            self._swap = (backend, bundle)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, idle_wait_s: float = 0.2) -> str:
        """Score until ``stop`` is set ("stopped") or every camera has ended ("ended": file sources without loop)."""
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            if self.step() == 0:
                if all(lane.camera.ended for lane in self.lanes.values()):
                    self.ended = True
                    return "ended"
                self.frame_ready.wait(idle_wait_s)
                self.frame_ready.clear()
        return "stopped"

    def step(self) -> int:
        """One batch: every camera's newest frame (if it has a new one). Returns the number of frames scored."""
        self._apply_swap()
        self._close_lost_cameras()
        scored = self._score_latest()
        self._close_failing_cameras()
        return scored

    def drain(self) -> int:
        """Score the frames left in the slots once the cameras are stopped (shutdown); returns how many.

        Unlike ``step`` it neither swaps models nor closes the stopped cameras' events as lost: the caller
        closes them with reason "shutdown" afterwards.
        """
        return self._score_latest()

    def _score_latest(self) -> int:
        batch: list[tuple[CameraLane, Frame]] = []
        for lane in self.lanes.values():
            frame = lane.camera.take()
            if frame is not None:
                batch.append((lane, frame))
        scored = 0
        for start in range(0, len(batch), self.backend.max_batch):
            scored += self._score(batch[start : start + self.backend.max_batch])
        return scored

    def _score(self, chunk: list[tuple[CameraLane, Frame]]) -> int:
        spec = self.bundle.input_spec
        inputs, kept = [], []
        for lane, frame in chunk:
            if lane.roi is not None and frame.image.shape[:2] != lane.roi_checked_for:  # once per frame size
                lane.roi_checked_for = frame.image.shape[:2]
                problem = roi_fit_problem(lane.roi, frame.image.shape[:2])
                if problem is not None:
                    log.warning("camera %s: %s", lane.camera_id, problem)
                lane.camera.report_problem("roi" if problem else None, problem)
            try:
                inputs.append(preprocess(cut_roi(frame.image, lane.roi), spec))
                kept.append((lane, frame))
            except ValueError as exc:  # an ROI that does not fit this camera's frames: counted, reported
                lane.roi_errors += 1
                self.last_error = f"camera {lane.camera_id}: {exc}"
                lane.note_failure(time.monotonic(), str(exc))
        if not kept:
            return 0
        try:
            raw, maps = self.backend.run(np.stack(inputs))
        except Exception as exc:  # a backend failure must not kill the daemon; it is counted and on /healthz
            self.backend_errors += 1
            self.last_error = f"{self.backend.kind}: {type(exc).__name__}: {exc}"
            log.error("backend failed on a batch of %d: %s", len(kept), self.last_error)
            failed_at = time.monotonic()
            for lane, _ in kept:
                lane.frames_failed += 1
                lane.note_failure(failed_at, self.last_error)
                lane.tracker.restart_run()
            return 0
        normalised = self.bundle.calibration.normalise(np.asarray(raw, dtype=np.float64))
        now = time.monotonic()
        for i, (lane, frame) in enumerate(kept):
            for message in lane.tracker.update(
                frame=frame.image,
                roi=lane.roi,
                raw=float(raw[i]),
                normalized=float(normalised[i]),
                threshold=lane.threshold,
                amap=maps[i, 0],
                model=self.model,
                wall=frame.wall,
                mono=frame.t_capture,
                frame_seq=frame.seq,
            ):
                self.send(message)
            lane.scored += 1
            lane.anomalous += int(normalised[i] >= lane.threshold)
            lane.latencies_s.append(time.monotonic() - frame.t_capture)
            lane.last_scored = now
        self.batches += 1
        return len(kept)

    # ------------------------------------------------------------------ between batches

    def _apply_swap(self) -> None:
        with self._swap_lock:
            swap, self._swap = self._swap, None
        if swap is None:
            return
        backend, bundle = swap
        if bundle.sha != self.bundle.sha:
            self.close_all("model_swap")
            for lane in self.lanes.values():  # latency is the serving model's: probation judges the new one alone
                lane.latencies_s.clear()
        self.backend, self.bundle = backend, bundle
        self.model = ModelRef(bundle.name, bundle.version, bundle.sha)
        log.info("now serving %s %s with %s (%s)", bundle.name, bundle.version, backend.kind, backend.detail)

    def _close_lost_cameras(self) -> None:
        """End the open event of a camera that is offline or ended; close() also restarts the opening run when none
        is open, so anomalous frames from before an outage never count towards an event after it."""
        for lane in self.lanes.values():
            state = lane.camera.status.state
            if state in ("offline", "ended"):
                reason: EndReason = "camera_lost" if state == "offline" else "source_ended"
                for message in lane.tracker.close(reason, wall=time.time(), mono=time.monotonic()):
                    self.send(message)

    def _close_failing_cameras(self) -> None:
        """End the open event of a camera whose frames have all failed to be scored for ``failing_end_s``."""
        now = time.monotonic()
        for lane in self.lanes.values():
            failing = lane.failing_for(now)
            if failing is not None and failing >= self.failing_end_s and lane.tracker.is_open:
                log.warning(
                    "camera %s: no frame scored for %.0f s (%s): its open event ends",
                    lane.camera_id,
                    failing,
                    lane.failure,
                )
                for message in lane.tracker.close("scoring_failed", wall=time.time(), mono=now):
                    self.send(message)

    def close_all(self, reason: EndReason) -> None:
        """End every open event with ``reason`` (shutdown, model_swap). Call on the pipeline thread or after it."""
        for lane in self.lanes.values():
            for message in lane.tracker.close(reason, wall=time.time(), mono=time.monotonic()):
                self.send(message)


def percentile_ms(values: Sequence[float] | deque[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of latencies given in seconds, in milliseconds; None when empty."""
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q) * 1000.0)


class PipelinePool:
    """Several pipelines on as many threads, each owning a share of the cameras and its own backend session.

    ONNX Runtime and OpenCV release the GIL, so two single-threaded workers use two cores (DESIGN.md: one
    single-threaded worker per core). A camera belongs to exactly one worker, so its frames are scored and its
    events emitted in capture order. With one worker this is just the one pipeline on the calling thread.
    """

    def __init__(self, pipelines: Sequence[Pipeline]) -> None:
        if not pipelines:
            raise ValueError("a pool needs at least one pipeline")
        self.pipelines = list(pipelines)
        self.lanes = {cam_id: lane for p in self.pipelines for cam_id, lane in p.lanes.items()}
        self._owner = {cam_id: p for p in self.pipelines for cam_id in p.lanes}

    @property
    def backend(self) -> Backend:
        return self.pipelines[0].backend

    @property
    def heartbeat(self) -> float:
        """The oldest heartbeat of the workers still running (a worker whose cameras all ended has stopped
        beating, and is not stalled); the newest when every worker has ended."""
        running = [p.heartbeat for p in self.pipelines if not p.ended]
        return min(running) if running else max(p.heartbeat for p in self.pipelines)

    @property
    def backend_errors(self) -> int:
        return sum(p.backend_errors for p in self.pipelines)

    @property
    def last_error(self) -> str | None:
        return next((p.last_error for p in self.pipelines if p.last_error), None)

    def set_threshold(self, camera_id: str, threshold: float, source: str) -> None:
        self._owner[camera_id].set_threshold(camera_id, threshold, source)

    def request_swap(self, backends: Sequence[Backend], bundle: LoadedBundle) -> None:
        """One backend per worker (each its own session), all for ``bundle``; applied between batches."""
        if len(backends) != len(self.pipelines):
            raise ValueError(f"{len(self.pipelines)} workers need as many backends, got {len(backends)}")
        for pipeline, backend in zip(self.pipelines, backends, strict=True):
            pipeline.request_swap(backend, bundle)

    def close_all(self, reason: EndReason) -> None:
        for p in self.pipelines:
            p.close_all(reason)

    def drain(self) -> int:
        """Each worker's ``drain``, on the calling thread (after ``run`` returned). Returns frames scored."""
        return sum(p.drain() for p in self.pipelines)

    def run(self, stop: threading.Event) -> str:
        """Run every worker until ``stop`` ("stopped") or until all their cameras ended ("ended")."""
        outcomes: list[str] = []
        threads = [
            threading.Thread(target=lambda p=p: outcomes.append(p.run(stop)), name=f"scorer-{i}", daemon=True)
            for i, p in enumerate(self.pipelines[1:], start=1)
        ]
        for t in threads:
            t.start()
        outcomes.append(self.pipelines[0].run(stop))
        for t in threads:
            while t.is_alive():  # a timed join keeps the main thread responsive to signals
                t.join(0.2)
        return "ended" if all(o == "ended" for o in outcomes) and not stop.is_set() else "stopped"
