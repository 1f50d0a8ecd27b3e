"""One camera: a reader thread that opens a source, reads frames into a latest-frame slot, and
keeps a status (starting / online / degraded / offline / ended) with a reason.

The scorer never falls behind a live camera: the slot holds one frame, a newer frame replaces an
unread one and the replaced frame is counted as dropped. File sources read "as fast as scored"
(``realtime=False``) use a lossless slot instead: the reader waits until the scorer took the previous
frame, so every frame of the file is scored in order.

Pipeline usage::

    ready = threading.Event()
    cams = [Camera("cam0", "/videos/line.avi", frame_ready=ready, on_status=publish_status)]
    for c in cams:
        c.start()
    while running:
        ready.wait(0.5)
        ready.clear()                  # clear BEFORE taking: a frame put after this sets it again
        frames = [f for c in cams if (f := c.take()) is not None]
        ...score frames...
    stop_cameras(cams)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from edge_daemon.capture.health import HealthConfig, HealthMonitor
from edge_daemon.capture.sources import CaptureError, SourceSpec, open_capture, parse_source, source_fps

log = logging.getLogger(__name__)

CameraState = Literal["starting", "online", "degraded", "offline", "ended"]

# Pace for realtime file playback when the file does not say its frame rate (frames per second).
DEFAULT_FILE_FPS = 25.0
# A session must deliver frames this long (s) before its failure restarts the reconnect backoff from its minimum.
STABLE_SESSION_S = 10.0
# The window over which stats()["fps_in"] is measured (seconds).
FPS_WINDOW_S = 5.0


@dataclass
class Frame:
    """A frame read from a camera.

    image: HxWx3 BGR uint8 (grey, BGRA and 16-bit sources are converted). seq: per camera, from 0,
    +1 per frame handed to the slot (a gap means dropped frames). t_capture: time.monotonic() when it
    was read (seconds); wall: time.time() at the same moment (seconds since the epoch).
    """

    camera_id: str
    image: np.ndarray
    seq: int
    t_capture: float
    wall: float


@dataclass(frozen=True)
class CameraStatus:
    """A camera's state with a machine-readable ``reason`` code and a human ``detail``; ``since`` is the
    wall time (time.time()) of the change.

    Reasons: offline -> ``open_failed``, ``no_frames`` (opened, but not one frame came), ``read_failed``
    (frames stopped), ``error`` (an unexpected exception, in detail), ``stopped``; degraded ->
    ``black``, ``saturated``, ``frozen``, ``low_fps`` (capture.health), ``roi`` (the scorer's: the configured roi
    does not fit the frames, ``Camera.report_problem``); ended -> ``end_of_file``.
    """

    state: CameraState
    reason: str | None
    detail: str | None
    since: float


class LatestFrameSlot:
    """A bounded slot of size 1 between a camera thread (put) and the scorer (take).

    Lossy (default): ``put`` replaces an unread frame and counts it in ``dropped``. Lossless: ``put``
    waits until the previous frame was taken (or ``close`` was called) and nothing is dropped. A frame
    offered after ``close`` is refused and counted in ``dropped`` too, so every frame put is, in the end,
    taken or dropped. Thread-safe.
    """

    def __init__(self, lossless: bool = False) -> None:
        self.lossless = lossless
        self.dropped = 0
        self._frame: Frame | None = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, frame: Frame) -> bool:
        """Offer ``frame``; returns False only when the slot was closed (the frame was not stored, and is
        counted as dropped)."""
        with self._cond:
            if self.lossless:
                while self._frame is not None and not self._closed:
                    self._cond.wait()
            if self._closed:
                self.dropped += 1
                return False
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            return True

    def take(self) -> Frame | None:
        """The unread frame, or None; never blocks."""
        with self._cond:
            frame, self._frame = self._frame, None
            if frame is not None:
                self._cond.notify_all()
            return frame

    def wait_taken(self) -> bool:
        """Block until the slot is empty (its frame was taken); False when the slot was closed first."""
        with self._cond:
            while self._frame is not None and not self._closed:
                self._cond.wait()
            return not self._closed

    def close(self) -> None:
        """Release a ``put`` waiting in lossless mode; later puts return False."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Camera:
    """A camera read by its own daemon thread into a latest-frame slot.

    ``source``: anything ``parse_source`` takes (raises ValueError at construction when unusable).
    ``loop``/``realtime`` apply to file sources only: ``loop`` rewinds at the end instead of ending;
    ``realtime`` paces reads to the file's frame rate (lossy slot, drops counted) instead of reading
    losslessly as fast as the scorer takes frames. ``fps_cap`` (frames/s): frames read sooner than
    1/fps_cap after the last delivered one are skipped (counted in ``frames_skipped``, not dropped); for a file
    read losslessly "sooner" is in the video's time (its frame rate), not the wall clock.
    ``roi`` (x, y, w, h) is stored for the pipeline. ``expected_fps`` enables the ``low_fps`` health
    check (ignored for lossless files, whose rate the scorer sets). ``frame_ready`` is set after every
    new frame. ``on_status(camera_id, status)`` is called from the camera thread on every change of
    state or reason; it must be cheap, and its exceptions are logged and ignored. ``backoff_s``
    (min, max seconds): the wait before reopening a failed source grows exponentially with jitter
    between these bounds and is reset by a good frame. ``open_timeout_s``/``read_timeout_s`` (seconds)
    bound one open and one frame wait (``open_capture`` says which sources honour them).
    """

    def __init__(
        self,
        camera_id: str,
        source: str | int,
        *,
        loop: bool = False,
        realtime: bool = False,
        fps_cap: float | None = None,
        roi: tuple[int, int, int, int] | None = None,
        expected_fps: float | None = None,
        frame_ready: threading.Event | None = None,
        on_status: Callable[[str, CameraStatus], None] | None = None,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        health: HealthConfig | None = None,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
    ) -> None:
        if fps_cap is not None and not fps_cap > 0:
            raise ValueError(f"camera {camera_id}: fps_cap must be positive, got {fps_cap}")
        if expected_fps is not None and not expected_fps > 0:
            raise ValueError(f"camera {camera_id}: expected_fps must be positive, got {expected_fps}")
        if roi is not None and (len(roi) != 4 or min(roi[:2]) < 0 or min(roi[2:]) <= 0):
            raise ValueError(f"camera {camera_id}: roi must be (x, y, w, h) with x, y >= 0 and w, h > 0, got {roi}")
        if not 0 < backoff_s[0] <= backoff_s[1]:
            raise ValueError(f"camera {camera_id}: backoff_s must be (min, max) with 0 < min <= max, got {backoff_s}")
        self.camera_id = camera_id
        self.spec: SourceSpec = parse_source(source)
        self.loop = loop
        self.realtime = realtime
        self.fps_cap = fps_cap
        self.roi = roi
        self.expected_fps = expected_fps
        self.backoff_s = backoff_s
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.lossless = self.spec.is_file and not realtime
        self._slot = LatestFrameSlot(lossless=self.lossless)
        self._frame_ready = frame_ready
        self._on_status = on_status
        self._health = HealthMonitor(health, expected_fps=None if self.lossless else expected_fps)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status = CameraStatus("starting", None, None, time.time())
        self._problem: tuple[str, str] | None = None  # (reason, detail) reported by the scorer
        self._lock = threading.Lock()  # guards the counters and _times read by stats()
        self._times: deque[float] = deque()
        self._seq = 0
        self.frames_in = 0
        self.frames_skipped = 0
        self.reconnects = 0

    # ---- public ---------------------------------------------------------------------------------

    @property
    def status(self) -> CameraStatus:
        """The current status (replaced atomically by the camera thread)."""
        return self._status

    def report_problem(self, reason: str | None, detail: str | None = None) -> None:
        """Make the camera ``degraded`` with ``reason`` (a code) and ``detail`` (one line) for a problem found after
        capture, such as an roi that does not fit the frames; None clears it. It shows from the next frame read, after
        the image's own health reasons (black, frozen, ...), and lasts until cleared. Any thread."""
        self._problem = (reason, detail or reason) if reason else None

    @property
    def ended(self) -> bool:
        """True once a file source with loop=False has been read to its end and its last frame taken."""
        return self._status.state == "ended"

    @property
    def running(self) -> bool:
        """True while the reader thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the reader thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"camera {self.camera_id} was already started")
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.camera_id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop without waiting for it (``stop_cameras`` asks them all, then waits once)."""
        self._stop.set()
        if self.lossless:
            self._slot.close()  # releases a put waiting for the scorer, which has stopped taking

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the thread to stop and wait up to ``timeout_s`` seconds for it (``join``)."""
        self.request_stop()
        if not self.join(timeout_s):
            log.warning("camera %s: reader blocked in a read after %.1f s; left to exit", self.camera_id, timeout_s)

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for a stopping reader, then close the slot; False if it is
        still blocked in a read.

        A frame the reader already counted in ``frames_in`` still reaches the slot (lossy) or is counted
        as dropped (lossless, whose waiting put is released), so after a stop every frame read is either
        in the slot, taken or dropped: the pipeline's last ``drain`` makes frames_in == scored + dropped.
        A read blocked inside OpenCV cannot be interrupted; such a (daemon) thread is left to finish on its
        own once the read returns or times out, and releases its capture then.
        """
        ended = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            ended = not self._thread.is_alive()
        self._slot.close()
        return ended

    def take(self) -> Frame | None:
        """The latest unread frame, or None (never blocks)."""
        return self._slot.take()

    def stats(self) -> dict[str, Any]:
        """Counters since start: frames_in (read from the source), frames_dropped (replaced unread in
        the slot), frames_skipped (fps cap), reconnects (successful reopen after a failure), fps_in
        (frames read per second over the last few seconds), state and reason."""
        now = time.monotonic()
        with self._lock:
            while self._times and self._times[0] <= now - FPS_WINDOW_S:
                self._times.popleft()
            n = len(self._times)
            span = now - self._times[0] if n else 0.0
            stats: dict[str, Any] = {
                "frames_in": self.frames_in,
                "frames_dropped": self._slot.dropped,
                "frames_skipped": self.frames_skipped,
                "reconnects": self.reconnects,
            }
        status = self._status
        # n frames spread over `span` seconds; short spans (start-up) are measured over what exists.
        stats["fps_in"] = round(n / max(span, 1e-3), 2) if n >= 2 else 0.0
        stats["state"] = status.state
        stats["reason"] = status.reason
        return stats

    # ---- the reader thread ----------------------------------------------------------------------

    def _set_status(self, state: CameraState, reason: str | None = None, detail: str | None = None) -> None:
        old = self._status
        if old.state == state and old.reason == reason:
            if old.detail != detail:
                self._status = CameraStatus(state, reason, detail, old.since)
            return
        self._status = status = CameraStatus(state, reason, detail, time.time())
        log_fn = log.warning if state in ("offline", "degraded") else log.info
        log_fn("camera %s: %s (%s): %s", self.camera_id, state, reason, detail)
        if self._on_status is not None:
            try:
                self._on_status(self.camera_id, status)
            except Exception:
                log.exception("camera %s: on_status callback failed (ignored)", self.camera_id)

    def _run(self) -> None:
        failures = 0
        had_failure = False
        try:
            while not self._stop.is_set():
                try:
                    outcome = self._session(had_failure)
                except Exception as exc:  # a bug or an OpenCV surprise must not kill the camera
                    log.exception("camera %s: unexpected error in the reader", self.camera_id)
                    self._set_status("offline", "error", f"{type(exc).__name__}: {exc}")
                    outcome = "failed"
                if outcome == "ended":
                    if not self._slot.wait_taken():  # "ended" promises that every frame was taken
                        break
                    self._set_status("ended", "end_of_file", f"{self.spec.describe()}: end of file reached")
                    return
                if outcome == "stopped":
                    break
                if outcome == "loop":
                    had_failure = False  # it delivered frames: its reopening is no reconnect
                    continue  # a looping file reached its end: reopen at once (no failure, no backoff)
                if outcome == "good_then_failed":
                    failures = 0
                had_failure = True
                delay = self._backoff(failures)
                failures += 1
                self._stop.wait(delay)
        finally:
            if not self.ended:
                self._set_status("offline", "stopped", "camera stopped")

    def _degraded_detail(self, reason: str) -> str:
        cfg = self._health.config
        if reason == "low_fps":
            return (
                f"{self._health.measured_fps() or 0.0:.1f} frames/s over the last {cfg.window_s:g} s, "
                f"expected {self.expected_fps:g}"
            )
        return {
            "black": f"the image is black (mean grey below {cfg.black_level:g}): lens covered, lights off or no signal",
            "saturated": f"the image is saturated (mean grey above {cfg.saturated_level:g}): overexposed or blinded",
            "frozen": f"{cfg.frozen_frames} identical frames in a row: the source repeats its last image",
        }.get(reason, reason)

    def _backoff(self, failures: int) -> float:
        low, high = self.backoff_s
        ceiling = min(high, low * (2.0 ** min(failures, 40)))  # capped exponent: no float overflow after hours
        return max(low, random.uniform(ceiling / 2.0, ceiling))

    def _session(self, after_failure: bool) -> str:
        """Open the source once and read until it fails, ends or a stop is asked.

        Returns "stopped", "ended" (file done, no loop), "loop" (file done, read it again), "failed" (no
        good frame this session, or frames for less than ``STABLE_SESSION_S``: a snapshot URL, two clients kicking
        each other off a single-session camera) or "good_then_failed" (frames came for at least ``STABLE_SESSION_S``,
        then the source failed; the backoff restarts from its minimum). A session after a failure that delivers a
        frame counts a reconnect.
        """
        try:
            cap = open_capture(self.spec, open_timeout_s=self.open_timeout_s, read_timeout_s=self.read_timeout_s)
        except CaptureError as exc:
            self._set_status("offline", "open_failed", str(exc))
            return "failed"
        try:
            return self._read_loop(cap, after_failure)
        finally:
            cap.release()

    def _read_loop(self, cap: cv2.VideoCapture, after_failure: bool) -> str:
        self._health.reset()
        pace = 1.0 / (source_fps(cap) or self.expected_fps or DEFAULT_FILE_FPS) if self.spec.is_file else 0.0
        paced = self.spec.is_file and self.realtime
        t0 = t_open = time.monotonic()
        n_read = 0
        next_due = 0.0
        while not self._stop.is_set():
            if paced:
                wait = t0 + n_read * pace - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return "stopped"
                if wait < -1.0:  # fell more than 1 s behind (slow decode, stalled disk): re-anchor, no burst
                    t0 = time.monotonic() - n_read * pace
            ok, image = cap.read()
            if self._stop.is_set():
                return "stopped"
            if not ok or image is None or image.size == 0:
                if self.spec.is_file and n_read > 0:
                    return "loop" if self.loop else "ended"
                if n_read == 0:
                    self._set_status("offline", "no_frames", f"{self.spec.describe()}: opened, but no frame came")
                    return "failed"
                self._set_status("offline", "read_failed", f"{self.spec.describe()}: frames stopped coming")
                return "good_then_failed" if time.monotonic() - t_open >= STABLE_SESSION_S else "failed"
            t = time.monotonic()
            wall = time.time()
            n_read += 1
            image = _to_bgr(image)
            with self._lock:
                if n_read == 1 and after_failure:
                    self.reconnects += 1
                self.frames_in += 1
                self._times.append(t)
                if len(self._times) > 4096:
                    self._times.popleft()
            reason = self._health.observe(image, t)
            problem = self._problem
            if reason is None and problem is not None:
                self._set_status("degraded", *problem)
            elif reason is None:
                self._set_status("online")
            elif reason != self._status.reason:
                self._set_status("degraded", reason, self._degraded_detail(reason))

            if self.fps_cap is not None:
                # A file read losslessly comes in bursts as fast as the scorer takes frames: its cap runs on the
                # video's own time (frame index / frame rate), or it would keep about one frame per burst.
                clock = (n_read - 1) * pace if self.lossless else t
                if clock < next_due:
                    with self._lock:
                        self.frames_skipped += 1
                    continue
                # Keep the delivery grid while on schedule (no drift); restart it after a gap.
                period = 1.0 / self.fps_cap
                next_due = next_due + period if clock < next_due + period else clock + period
            frame = Frame(self.camera_id, image, self._seq, t, wall)
            if not self._slot.put(frame):
                return "stopped"
            self._seq += 1
            if self._frame_ready is not None:
                self._frame_ready.set()
        return "stopped"


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """HxWx3 BGR uint8 from what OpenCV returned (grey, BGRA, 16-bit)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def stop_cameras(cameras: Iterable[Camera], timeout_s: float = 5.0) -> None:
    """Stop every camera, waiting at most ``timeout_s`` seconds in all, not per camera: each is asked to
    stop first, then all are joined against one deadline, so N readers blocked in a read (a dead RTSP
    stream) cost ``timeout_s`` at shutdown rather than N times it (systemd's TimeoutStopSec bounds the
    whole shutdown, the outbox drain included)."""
    cams = list(cameras)
    for camera in cams:
        camera.request_stop()
    deadline = time.monotonic() + timeout_s
    blocked = [c.camera_id for c in cams if not c.join(max(0.0, deadline - time.monotonic()))]
    if blocked:
        log.warning("camera(s) %s: reader blocked in a read after %.1f s; left to exit", ", ".join(blocked), timeout_s)
