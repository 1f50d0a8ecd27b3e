"""Capture layer: source parsing, real video files (lossless, loop, realtime, fps cap), a real HTTP MJPEG camera and
a real RTSP camera that disappear and come back, and sources that cannot be opened.

Videos are written by the tests with cv2.VideoWriter (MJPG in .avi) from real MVTec bottle photographs; the
HTTP camera is an http.server on loopback serving multipart/x-mixed-replace JPEGs of the same photographs; the RTSP
camera is GStreamer's gst-rtsp-server (tests/rtsp_server.py) serving them as RTP/JPEG.
No timing assertions: conditions are polled with generous deadlines.
"""

from __future__ import annotations

import contextlib
import http.server
import select
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_daemon.capture import (
    Camera,
    CameraStatus,
    CaptureError,
    Frame,
    LatestFrameSlot,
    SourceSpec,
    has_gstreamer,
    open_capture,
    parse_source,
    source_fps,
)
from edge_daemon.capture.camera import _to_bgr, stop_cameras
from edge_daemon.capture.sources import gstreamer_takes_timeouts

SIZE = 320
DEADLINE_S = 20.0


# ---- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bottle_images(shared_data: Path) -> list[np.ndarray]:
    """24 distinct real photographs (good and defective bottles), 320x320 BGR."""
    paths = sorted((shared_data / "mvtec_bottle" / "test").glob("*/*.png"))[::3][:24]
    assert len(paths) == 24, "expected the MVTec bottle test images under shared data"
    return [cv2.resize(read_image(p), (SIZE, SIZE), interpolation=cv2.INTER_AREA) for p in paths]


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    return image


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (SIZE, SIZE))
    assert writer.isOpened(), "this OpenCV cannot write MJPG .avi"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    """The file's frames as a plain OpenCV read gives them (the reference the camera must match)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return out


def wait_for(cond: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")


class StatusLog:
    """Records every on_status call (camera thread) for the test thread."""

    def __init__(self) -> None:
        self.items: list[CameraStatus] = []
        self.lock = threading.Lock()

    def __call__(self, camera_id: str, status: CameraStatus) -> None:
        with self.lock:
            self.items.append(status)

    def pairs(self) -> list[tuple[str, str | None]]:
        with self.lock:
            return [(s.state, s.reason) for s in self.items]


def drain(cam: Camera, until: Callable[[list[Frame]], bool], delay_s: float = 0.0) -> list[Frame]:
    """Take frames until ``until(frames)`` holds (deadline DEADLINE_S)."""
    frames: list[Frame] = []
    end = time.monotonic() + DEADLINE_S
    while not until(frames):
        assert time.monotonic() < end, f"timed out; got {len(frames)} frames, status {cam.status}"
        f = cam.take()
        if f is None:
            time.sleep(0.002)
            continue
        frames.append(f)
        if delay_s:
            time.sleep(delay_s)
    return frames


@pytest.fixture
def cameras() -> Iterator[list[Camera]]:
    made: list[Camera] = []
    yield made
    for cam in made:
        cam.stop(timeout_s=5.0)


# ---- parse_source ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kind", "target"),
    [
        (0, "index", 0),
        (3, "index", 3),
        ("0", "index", 0),
        (" 2 ", "index", 2),
        ("/dev/video0", "v4l2", "/dev/video0"),
        ("/dev/v4l/by-id/usb-cam-video-index0", "v4l2", "/dev/v4l/by-id/usb-cam-video-index0"),
        ("rtsp://10.0.0.5:554/stream1", "rtsp", "rtsp://10.0.0.5:554/stream1"),
        ("RTSPS://cam.local/live", "rtsp", "RTSPS://cam.local/live"),
        ("http://127.0.0.1:8080/video.mjpg", "http", "http://127.0.0.1:8080/video.mjpg"),
        ("https://cam.local/mjpeg", "http", "https://cam.local/mjpeg"),
        ("/videos/line.mp4", "file", "/videos/line.mp4"),
        ("line.avi", "file", "line.avi"),
        ("file:///videos/line.mp4", "file", "/videos/line.mp4"),
        (
            "gst:videotestsrc ! videoconvert",
            "gstreamer",
            "videotestsrc ! videoconvert ! appsink drop=true max-buffers=1",
        ),
        (
            "gst:v4l2src ! videoconvert ! appsink name=s sync=false",
            "gstreamer",
            "v4l2src ! videoconvert ! appsink name=s sync=false",
        ),
    ],
)
def test_parse_source_kinds(source: str | int, kind: str, target: str | int) -> None:
    assert parse_source(source) == SourceSpec(kind, target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (-1, "0 or more"),
        ("-2", "0 or more"),
        ("ftp://cam.local/video", "unsupported scheme 'ftp://'"),
        ("udp://239.0.0.1:1234", "unsupported scheme 'udp://'"),
        ("http:///nohost", "no host"),
        ("rtsp://cam:99999/x", "port"),
        ("gst:", "must be followed by a GStreamer pipeline"),
        ("gst:  ! ", "must be followed by a GStreamer pipeline"),
        ("file://", "needs a path"),
        (True, "device index or a string"),
        (1.5, "device index or a string"),
    ],
)
def test_parse_source_rejects_bad_sources_clearly(source: Any, message: str) -> None:
    with pytest.raises(ValueError, match="camera source") as err:
        parse_source(source)
    assert message in str(err.value)


def test_url_credentials_never_reach_messages() -> None:
    """describe() is the status detail published retained over MQTT: no camera password in it. A GStreamer
    pipeline (the usual hardware-decode source on a Jetson) and a camera CGI's query string used to go out whole."""
    spec = parse_source("rtsp://admin:s3cret@10.0.0.5/stream")
    assert "s3cret" not in spec.describe() and "10.0.0.5" in spec.describe()
    for source, kept in (
        ("rtsp://admin:p@s3cret@10.0.0.5:554/s1", "10.0.0.5:554/s1"),  # an @ in the password
        ("http://10.0.0.9/videostream.cgi?user=admin&pwd=s3cret&res=1", "res=1"),
        (
            "gst:rtspsrc location=rtsp://admin:s3cret@10.0.0.5/stream1 user-id=admin user-pw=s3cret latency=200 "
            "! rtph264depay ! h264parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx ! appsink",
            "latency=200",
        ),
        ('gst:souphttpsrc location="http://u:s3cret@cam/mjpg" ! jpegdec ! videoconvert ! appsink', "cam/mjpg"),
    ):
        text = parse_source(source).describe()
        assert "s3cret" not in text and "admin" not in text and kept in text, text
    assert parse_source("gst:v4l2src device=/dev/video0 sensor-id=0 ! appsink").describe() == (
        "gstreamer pipeline 'v4l2src device=/dev/video0 sensor-id=0 ! appsink'"
    )
    with pytest.raises(ValueError) as err:
        parse_source("ftp://admin:s3cret@10.0.0.5/x")
    assert "s3cret" not in str(err.value)


# ---- open_capture ----------------------------------------------------------------------------------------------


def test_open_capture_errors_name_the_source_and_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope.avi"
    with pytest.raises(CaptureError, match=f"file '{missing}': file not found"):
        open_capture(parse_source(str(missing)))
    with pytest.raises(CaptureError, match="not a regular file"):
        open_capture(parse_source(str(tmp_path)))
    truncated = tmp_path / "truncated.avi"  # a copy cut off inside its header (a text file would not do:
    truncated.write_bytes(b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(80))  # FFmpeg plays text as ANSI-art video)
    with pytest.raises(CaptureError, match="FFmpeg could not open it"):
        open_capture(parse_source(str(truncated)))
    with pytest.raises(CaptureError, match="no such device"):
        open_capture(parse_source("/dev/video-not-here-77"))
    # A refused connection fails at once, with the URL in the message.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CaptureError, match=f"http source http://127.0.0.1:{port}/x: FFmpeg could not open"):
        open_capture(parse_source(f"http://127.0.0.1:{port}/x"), open_timeout_s=2.0)


def test_open_capture_gstreamer_says_when_opencv_lacks_it() -> None:
    spec = parse_source("gst:videotestsrc num-buffers=5 ! videoconvert ! video/x-raw,format=BGR")
    if has_gstreamer():
        cap = open_capture(spec)
        assert cap.read()[0]
        cap.release()
    else:
        with pytest.raises(CaptureError, match="built without GStreamer"):
            open_capture(spec)


def test_open_capture_reads_a_real_video_and_its_fps(tmp_path: Path, bottle_images: list[np.ndarray]) -> None:
    path = write_video(tmp_path / "v.avi", bottle_images[:4], fps=12.0)
    cap = open_capture(parse_source(str(path)))
    try:
        assert source_fps(cap) == pytest.approx(12.0)
        ok, frame = cap.read()
        assert ok and frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    finally:
        cap.release()


def test_grey_and_bgra_frames_become_bgr(bottle_images: list[np.ndarray]) -> None:
    grey = cv2.cvtColor(bottle_images[0], cv2.COLOR_BGR2GRAY)
    out = _to_bgr(grey)
    assert out.shape == (SIZE, SIZE, 3) and np.array_equal(out[:, :, 1], grey)
    assert _to_bgr(cv2.cvtColor(bottle_images[0], cv2.COLOR_BGR2BGRA)).shape == (SIZE, SIZE, 3)
    deep = grey.astype(np.uint16) * 257
    assert np.array_equal(_to_bgr(deep)[:, :, 0], grey)


# ---- the latest-frame slot -------------------------------------------------------------------------------------


def test_slot_counts_replaced_frames_and_lossless_waits(bottle_images: list[np.ndarray]) -> None:
    img = bottle_images[0]
    slot = LatestFrameSlot()
    for i in range(3):
        assert slot.put(Frame("c", img, i, 0.0, 0.0))
    taken = slot.take()
    assert taken is not None and taken.seq == 2 and slot.dropped == 2 and slot.take() is None

    lossless = LatestFrameSlot(lossless=True)
    assert lossless.put(Frame("c", img, 0, 0.0, 0.0))
    done = threading.Event()

    def second_put() -> None:
        lossless.put(Frame("c", img, 1, 0.0, 0.0))
        done.set()

    threading.Thread(target=second_put, daemon=True).start()
    assert not done.wait(0.2), "a lossless put must wait for the previous frame to be taken"
    first = lossless.take()
    assert first is not None and first.seq == 0
    assert done.wait(DEADLINE_S)
    second = lossless.take()
    assert second is not None and second.seq == 1 and lossless.dropped == 0
    # close() releases a waiting put, which then reports that the frame was not stored: it is counted dropped
    lossless.put(Frame("c", img, 2, 0.0, 0.0))
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(lossless.put(Frame("c", img, 3, 0.0, 0.0))), daemon=True)
    t.start()
    lossless.close()
    t.join(DEADLINE_S)
    assert result == [False] and lossless.dropped == 1
    left = lossless.take()
    assert left is not None and left.seq == 2, "close keeps the unread frame for a last take"


# ---- file cameras ----------------------------------------------------------------------------------------------


def test_lossless_file_delivers_every_frame_in_order_then_ends(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    path = write_video(tmp_path / "line.avi", bottle_images[:15])
    reference = decoded_frames(path)
    assert len(reference) == 15
    ready = threading.Event()
    log = StatusLog()
    cam = Camera("file0", str(path), frame_ready=ready, on_status=log)
    cameras.append(cam)
    assert cam.status.state == "starting" and cam.lossless
    cam.start()
    assert ready.wait(DEADLINE_S), "frame_ready was never set"
    frames = drain(cam, lambda fs: len(fs) == 15, delay_s=0.01)  # a slow consumer: nothing may be dropped
    wait_for(lambda: cam.ended, "the camera to end")
    assert [f.seq for f in frames] == list(range(15))
    for f, ref in zip(frames, reference, strict=True):
        assert f.camera_id == "file0" and f.image.shape == (SIZE, SIZE, 3) and f.image.dtype == np.uint8
        assert np.array_equal(f.image, ref)
    assert all(a.t_capture <= b.t_capture for a, b in zip(frames[:-1], frames[1:], strict=True))
    assert abs(frames[0].wall - time.time()) < 60
    assert cam.take() is None
    assert log.pairs() == [("online", None), ("ended", "end_of_file")]
    stats = cam.stats()
    assert stats["frames_in"] == 15 and stats["frames_dropped"] == 0 and stats["reconnects"] == 0
    assert stats["state"] == "ended" and stats["reason"] == "end_of_file"
    cam.stop()
    assert cam.ended and not cam.running


def test_looping_file_keeps_going_past_its_end(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    n = 6
    path = write_video(tmp_path / "loop.avi", bottle_images[:n])
    reference = decoded_frames(path)
    cam = Camera("loop0", str(path), loop=True)
    cameras.append(cam)
    cam.start()
    frames = drain(cam, lambda fs: len(fs) >= 3 * n + 2)
    assert [f.seq for f in frames] == list(range(len(frames)))
    for f in frames:
        assert np.array_equal(f.image, reference[f.seq % n])
    assert not cam.ended and cam.status.state == "online"
    assert cam.stats()["frames_dropped"] == 0
    cam.stop()
    assert cam.status.state == "offline" and cam.status.reason == "stopped"


def test_realtime_file_is_paced_and_counts_drops_for_a_slow_consumer(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    fps, n = 20.0, 20  # one second of video
    path = write_video(tmp_path / "rt.avi", bottle_images[:n], fps=fps)
    cam = Camera("rt0", str(path), realtime=True)
    cameras.append(cam)
    assert not cam.lossless
    t0 = time.monotonic()
    cam.start()
    taken: list[Frame] = []
    end = time.monotonic() + DEADLINE_S
    while not cam.ended:
        assert time.monotonic() < end, f"no end; status {cam.status}"
        f = cam.take()
        if f is not None:
            taken.append(f)
        time.sleep(0.15)  # scoring slower than the camera
    elapsed = time.monotonic() - t0
    stats = cam.stats()
    assert elapsed >= 0.5 * n / fps, f"{n} frames at {fps} fps took only {elapsed:.2f} s"
    assert stats["frames_in"] == n
    assert stats["frames_dropped"] > 0
    # Every frame was either scored or counted as dropped: never lost silently.
    assert len(taken) + stats["frames_dropped"] == n
    seqs = [f.seq for f in taken]
    assert seqs == sorted(seqs) and seqs[-1] == n - 1


@pytest.mark.parametrize("realtime", [True, False], ids=["lossy", "lossless"])
def test_stop_mid_stream_leaves_every_frame_read_taken_or_dropped(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera], realtime: bool
) -> None:
    """The daemon's shutdown contract: stop the camera, take what it left, and the counts add up."""
    path = write_video(tmp_path / "loop.avi", bottle_images[:10], fps=50.0)
    for k in range(3):  # stops at different points of the reader's cycle
        cam = Camera(f"stop{k}", str(path), loop=True, realtime=realtime)
        cameras.append(cam)
        cam.start()
        taken = 0
        end = time.monotonic() + DEADLINE_S
        while taken < 5 + 3 * k:
            assert time.monotonic() < end, f"too few frames; status {cam.status}"
            taken += cam.take() is not None
            time.sleep(0.013)
        cam.stop()
        assert not cam.running
        taken += cam.take() is not None  # the last frame the reader left in the slot
        stats = cam.stats()
        assert stats["frames_in"] == taken + stats["frames_dropped"], (taken, stats)


def test_fps_cap_skips_frames_read_too_soon(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    n = 24
    path = write_video(tmp_path / "cap.avi", bottle_images[:n], fps=25.0)
    cam = Camera("cap0", str(path), realtime=True, fps_cap=5.0)
    cameras.append(cam)
    cam.start()
    frames: list[Frame] = []
    end = time.monotonic() + DEADLINE_S
    while not cam.ended:
        assert time.monotonic() < end
        f = cam.take()
        if f is not None:
            frames.append(f)
        time.sleep(0.005)
    stats = cam.stats()
    assert stats["frames_in"] == n and stats["frames_skipped"] > 0
    assert [f.seq for f in frames] == list(range(len(frames)))  # seq counts delivered frames only
    assert len(frames) + stats["frames_skipped"] + stats["frames_dropped"] == n
    assert len(frames) < n


def test_fps_cap_on_a_file_read_losslessly_runs_on_the_videos_time(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    """A lossless file is read in bursts: on the wall clock the cap kept about one frame per burst (1 of 60 frames
    of a 25 fps video capped at 5 fps). On the video's time it keeps every fifth frame."""
    path = write_video(tmp_path / "cap.avi", [bottle_images[i % len(bottle_images)] for i in range(60)], fps=25.0)
    cam = Camera("caplossless", str(path), fps_cap=5.0)
    cameras.append(cam)
    cam.start()
    frames = drain(cam, lambda fs: cam.ended)
    assert [f.seq for f in frames] == list(range(12)) and cam.stats()["frames_skipped"] == 48


def test_missing_file_goes_offline_with_the_path_and_keeps_retrying(tmp_path: Path, cameras: list[Camera]) -> None:
    missing = tmp_path / "later.avi"
    calls: list[CameraStatus] = []

    def bad_callback(camera_id: str, status: CameraStatus) -> None:
        calls.append(status)
        raise RuntimeError("a broken status callback must not kill the camera")

    cam = Camera("gone", str(missing), on_status=bad_callback, backoff_s=(0.05, 0.2))
    cameras.append(cam)
    cam.start()
    wait_for(lambda: cam.status.state == "offline", "offline")
    assert cam.status.reason == "open_failed"
    assert str(missing) in (cam.status.detail or "") and "file not found" in (cam.status.detail or "")
    time.sleep(0.5)  # several retries: same state and reason, no repeated callbacks, thread alive
    assert cam.running and [(s.state, s.reason) for s in calls] == [("offline", "open_failed")]
    assert cam.take() is None and cam.stats()["frames_in"] == 0
    cam.stop()
    assert not cam.running and cam.status.reason == "stopped"


def test_video_without_a_single_frame_is_no_frames(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    whole = write_video(tmp_path / "whole.avi", bottle_images[:3]).read_bytes()
    path = tmp_path / "cut.avi"  # the header and the start of the first JPEG: opens, yields nothing
    path.write_bytes(whole[: whole.find(b"\xff\xd8\xff") + 10])
    cam = Camera("cut", str(path), backoff_s=(0.05, 0.2))
    cameras.append(cam)
    cam.start()
    wait_for(lambda: cam.status.state == "offline", "offline")
    assert cam.status.reason == "no_frames" and str(path) in (cam.status.detail or "")
    assert not cam.ended and cam.running


def test_file_that_appears_later_is_picked_up(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    path = tmp_path / "late.avi"
    cam = Camera("late", str(path), backoff_s=(0.05, 0.2))
    cameras.append(cam)
    cam.start()
    wait_for(lambda: cam.status.reason == "open_failed", "open_failed")
    write_video(tmp_path / "tmp.avi", bottle_images[:3]).rename(path)
    frames = drain(cam, lambda fs: len(fs) == 3)
    assert [f.seq for f in frames] == [0, 1, 2]
    wait_for(lambda: cam.ended, "end")
    assert cam.stats()["reconnects"] == 1


def test_a_looping_file_that_appears_later_counts_one_reconnect(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera]
) -> None:
    """After one real failure every reopening at the end of a looping file used to count as a reconnect."""
    path = tmp_path / "late-loop.avi"
    cam = Camera("lateloop", str(path), loop=True, backoff_s=(0.05, 0.2))
    cameras.append(cam)
    cam.start()
    wait_for(lambda: cam.status.reason == "open_failed", "open_failed")
    write_video(tmp_path / "tmp.avi", bottle_images[:3]).rename(path)
    frames = drain(cam, lambda fs: len(fs) >= 12)  # four times round the file
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert cam.stats()["reconnects"] == 1


def test_stop_does_not_hang_on_a_source_that_never_answers(cameras: list[Camera]) -> None:
    with socket.socket() as listener:  # accepts the TCP connection, never sends a byte
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        cam = Camera("mute", f"http://127.0.0.1:{port}/video", open_timeout_s=3.0, backoff_s=(0.1, 0.2))
        cam.start()
        wait_for(lambda: cam.running, "the thread")
        time.sleep(0.2)  # now inside FFmpeg's open
        cam.stop(timeout_s=0.2)  # returns although the open is still blocked
        wait_for(lambda: not cam.running, "the blocked open to time out and the thread to exit")
    assert cam.status.state == "offline" and cam.status.reason == "stopped"


def test_stop_cameras_waits_once_for_all_blocked_readers(
    tmp_path: Path, bottle_images: list[np.ndarray], cameras: list[Camera], caplog: pytest.LogCaptureFixture
) -> None:
    """Three readers blocked in an open share one deadline: one warning names them all with the one
    timeout (stopped in turn, each would wait the full timeout: N times it at shutdown)."""
    video = write_video(tmp_path / "line.avi", bottle_images[:4])
    with socket.socket() as listener:  # accepts the TCP connections, never sends a byte
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        mute = [
            Camera(f"mute{i}", f"http://127.0.0.1:{port}/video{i}", open_timeout_s=3.0, backoff_s=(0.1, 0.2))
            for i in range(3)
        ]
        file_cam = Camera("file", str(video), realtime=False)
        cameras.extend([file_cam, *mute])
        # The file first: OpenCV's FFmpeg backend opens one capture at a time, so a file opened while
        # the mute opens block would itself wait for them.
        file_cam.start()
        wait_for(lambda: file_cam.stats()["frames_in"] >= 2, "the file's reader waiting on its full slot")
        for cam in mute:
            cam.start()
        wait_for(lambda: all(c.running for c in mute), "the threads")
        time.sleep(0.2)  # now inside FFmpeg's open
        with caplog.at_level("WARNING", logger="edge_daemon.capture.camera"):
            stop_cameras(cameras, timeout_s=0.3)
        warnings = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
        assert warnings == ["camera(s) mute0, mute1, mute2: reader blocked in a read after 0.3 s; left to exit"]
        assert not file_cam.running
        wait_for(lambda: not any(c.running for c in mute), "the blocked opens to time out and the threads to exit")
    assert all(c.status.reason == "stopped" for c in mute)


# ---- a real HTTP MJPEG camera that disappears and comes back ---------------------------------------------------


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


class MjpegServer:
    """multipart/x-mixed-replace JPEG stream on loopback; stop() closes the listener and every client socket."""

    def __init__(self, jpegs: list[bytes], fps: float = 25.0, frames_per_connection: int | None = None) -> None:
        self.jpegs = jpegs
        self.period = 1.0 / fps
        self.frames_per_connection = frames_per_connection
        self.connected_at: list[float] = []  # time.monotonic() of each GET
        self.port = 0
        self._server: http.server.HTTPServer | None = None
        self._alive = threading.Event()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with owner._lock:
                    owner._clients.add(self.connection)
                    owner.connected_at.append(time.monotonic())
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frameboundary")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    i = 0
                    while owner._alive.is_set() and i != owner.frames_per_connection:
                        jpeg = owner.jpegs[i % len(owner.jpegs)]
                        i += 1
                        self.wfile.write(
                            b"--frameboundary\r\nContent-Type: image/jpeg\r\n"
                            + f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                            + jpeg
                            + b"\r\n"
                        )
                        self.wfile.flush()
                        time.sleep(owner.period)
                except OSError:
                    pass  # the client went away, or stop() closed the socket
                finally:
                    with owner._lock:
                        owner._clients.discard(self.connection)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        server = Server(("127.0.0.1", self.port), Handler)
        self._server = server
        self.port = server.server_address[1]
        self._alive.set()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self._alive.clear()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for s in list(self._clients):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"


def test_ffmpeg_reads_http_mjpeg(bottle_images: list[np.ndarray]) -> None:
    """The check behind using OpenCV's FFmpeg for http(s) sources instead of a reader of our own."""
    server = MjpegServer([jpeg(im) for im in bottle_images[:4]])
    server.start()
    try:
        cap = open_capture(parse_source(server.url), open_timeout_s=5, read_timeout_s=5)
        frames = [cap.read() for _ in range(8)]
        cap.release()
    finally:
        server.stop()
    assert all(ok for ok, _ in frames)
    expected = cv2.imdecode(np.frombuffer(server.jpegs[0], np.uint8), cv2.IMREAD_COLOR)
    assert expected is not None
    # FFmpeg's JPEG decoder rounds a little differently from libjpeg's: the same picture, not the same bits.
    assert min(float(cv2.absdiff(f, expected).mean()) for _, f in frames) < 2.0


def check_camera_survives_an_outage(
    url: str, stop: Callable[[], None], start: Callable[[], None], cameras: list[Camera], open_timeout_s: float
) -> None:
    """A camera on ``url`` scores frames; ``stop()`` takes its server away (a camera losing power): it goes offline,
    naming the host, and keeps retrying; ``start()`` brings a server back on the same port: it comes back online with
    seq continuing and one reconnect counted."""
    log = StatusLog()
    cam = Camera("ipcam", url, on_status=log, backoff_s=(0.1, 0.5), open_timeout_s=open_timeout_s, read_timeout_s=2.0)
    cameras.append(cam)
    cam.start()
    before = drain(cam, lambda fs: len(fs) >= 5)
    assert cam.status.state == "online"
    assert before[0].image.shape == (SIZE, SIZE, 3)

    stop()
    wait_for(lambda: cam.status.state == "offline", "offline after the server stopped")
    assert cam.status.reason in ("read_failed", "open_failed", "no_frames")
    assert "127.0.0.1" in (cam.status.detail or "")
    while cam.take() is not None:  # frames read before the loss
        pass
    time.sleep(0.5)  # a few failed reconnects while the camera is gone
    assert cam.status.state == "offline"

    start()  # same port
    after = drain(cam, lambda fs: len(fs) >= 5)
    assert cam.status.state == "online"
    pairs, stats = log.pairs(), cam.stats()
    assert after[0].seq > before[-1].seq  # seq continues across the reconnect
    assert pairs[0] == ("online", None) and pairs[-1] == ("online", None)
    assert any(state == "offline" for state, _ in pairs[1:-1])
    assert stats["reconnects"] == 1 and stats["frames_in"] >= 10 and stats["fps_in"] > 0


def test_http_camera_goes_offline_and_comes_back(bottle_images: list[np.ndarray], cameras: list[Camera]) -> None:
    server = MjpegServer([jpeg(im) for im in bottle_images])
    server.start()
    try:
        check_camera_survives_an_outage(server.url, server.stop, server.start, cameras, open_timeout_s=2.0)
    finally:
        if server._server is not None:
            server.stop()


def test_a_frame_then_a_drop_backs_off(bottle_images: list[np.ndarray], cameras: list[Camera]) -> None:
    """A snapshot URL, or a single-session camera two clients keep taking from each other: one frame, then the
    connection drops. Such a session does not restart the reconnect backoff (it used to, so the camera flapped
    offline/online every half second for ever, a status message each time)."""
    server = MjpegServer([jpeg(bottle_images[0])], frames_per_connection=1)
    server.start()
    try:
        cam = Camera("snap", server.url, backoff_s=(0.2, 1.6), open_timeout_s=2.0, read_timeout_s=1.0)
        cameras.append(cam)
        cam.start()
        wait_for(lambda: len(server.connected_at) >= 5, "five connections")
        gaps = np.diff(server.connected_at[:5])
        # backoff after the k-th failure is uniform(c/2, c) with c = 0.2 * 2**k: the 4th gap waits at least 0.8 s
        assert gaps[3] >= 0.8, gaps
    finally:
        server.stop()


# ---- a real RTSP camera (gst-rtsp-server) that disappears and comes back ---------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


class RtspServer:
    """tests/rtsp_server.py as a child process: the JPEGs as a live 10 fps RTP/JPEG stream at rtsp://127.0.0.1:PORT/line,
    as an IP camera serves it. stop() kills it (a camera losing power); start() again serves on the same port."""

    def __init__(self, frames: list[Path], port: int) -> None:
        self.frames, self.port = frames, port
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(RTSP_SERVER), str(self.port), "/line", "10", *map(str, self.frames)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().strip() if ready else "(no answer within 30 s)"
        if not ready:
            self.proc.kill()
        if line != "ready":
            rest = self.proc.communicate(timeout=10)[0]
            missing = any(m in rest for m in ("GstRtspServer", "No module named 'gi'", "elements missing"))
            hint = " (Debian packages missing: `make rtsp-server` installs or names them)" if missing else ""
            raise AssertionError(f"the RTSP server did not start{hint}: {line} {rest}")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/line"


@pytest.fixture
def rtsp_server(bottle_images: list[np.ndarray], tmp_path: Path) -> Iterator[RtspServer]:
    from tests.mqtt_broker import free_port

    frames = []
    for i, image in enumerate(bottle_images[:8]):
        frames.append(tmp_path / f"frame{i:02d}.jpg")
        frames[-1].write_bytes(jpeg(image))
    server = RtspServer(frames, free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()


def test_ffmpeg_reads_rtsp(rtsp_server: RtspServer) -> None:
    """open_capture's RTSP path (FFmpeg, TCP interleaved, timeouts) on a real RTSP server, not only its errors."""
    cap = open_capture(parse_source(rtsp_server.url), open_timeout_s=10, read_timeout_s=5)
    frames = [cap.read() for _ in range(8)]
    cap.release()
    assert all(ok for ok, _ in frames)
    served = [cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR) for p in rtsp_server.frames]
    # every frame read is one of the served pictures (FFmpeg's JPEG decoder rounds a little differently)
    for _, frame in frames:
        assert frame.shape == (SIZE, SIZE, 3)
        assert min(float(cv2.absdiff(frame, s).mean()) for s in served) < 2.0


def test_rtsp_camera_goes_offline_and_comes_back(rtsp_server: RtspServer, cameras: list[Camera]) -> None:
    check_camera_survives_an_outage(rtsp_server.url, rtsp_server.stop, rtsp_server.start, cameras, open_timeout_s=5.0)


def test_gstreamer_timeouts_are_given_from_opencv_4_6() -> None:
    """A GStreamer open that failed used to be tried again without timeouts on every OpenCV, so on JetPack's 4.8 a
    camera that was down cost a second, unbounded open per reconnect. Only an OpenCV older than 4.6 (which refuses
    the parameters) opens without them, first time."""
    assert gstreamer_takes_timeouts("4.8.0") and gstreamer_takes_timeouts("4.6.0") and gstreamer_takes_timeouts("5.0")
    assert gstreamer_takes_timeouts(cv2.__version__)
    assert not gstreamer_takes_timeouts("4.5.4-dev") and not gstreamer_takes_timeouts("3.4.2")
    assert not gstreamer_takes_timeouts("unknown")
