"""Camera sources: parse a configured ``source`` and open it with the right OpenCV backend.

``parse_source`` is pure (no OpenCV): config validation uses it to reject bad strings early.
``open_capture`` opens a parsed source with bounded waits and says plainly why it could not.

Backends: CAP_V4L2 for device indices and /dev/ nodes, CAP_FFMPEG for RTSP, HTTP(S) MJPEG and
files, CAP_GSTREAMER for ``gst:`` pipelines. FFmpeg decodes with one thread (DESIGN.md, "Hot-path
facts": one single-threaded worker per core; FFmpeg's default is one thread per CPU, which
collides with the scorer on a 2-core device).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import cv2

SourceKind = Literal["index", "v4l2", "rtsp", "http", "gstreamer", "file"]

# The sink appended to a GStreamer pipeline that has none: never queue frames (latest wins).
GST_APPSINK = "appsink drop=true max-buffers=1"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SUPPORTED = "a device index (0), /dev/videoN, rtsp://, rtsps://, http(s):// (MJPEG), gst:<pipeline> or a file path"


@dataclass(frozen=True)
class SourceSpec:
    """A parsed camera source.

    ``target`` is the device index (int) for ``index``; the device path for ``v4l2``; the URL for
    ``rtsp``/``http``; the full pipeline (ending in an appsink) for ``gstreamer``; the path for ``file``.
    """

    kind: SourceKind
    target: str | int

    @property
    def is_file(self) -> bool:
        """True for video files: they end, can loop, and can be read losslessly."""
        return self.kind == "file"

    def describe(self) -> str:
        """A short human-readable name for logs and status details (retained on MQTT): credentials hidden,
        in URLs and in ``name=value`` settings (see ``redact_secrets``)."""
        if self.kind in ("rtsp", "http"):
            return f"{self.kind} source {redact_secrets(str(self.target))}"
        if self.kind == "index":
            return f"camera index {self.target}"
        if self.kind == "gstreamer":
            return f"gstreamer pipeline '{redact_secrets(str(self.target))}'"
        return f"{'device' if self.kind == 'v4l2' else 'file'} '{self.target}'"


class CaptureError(Exception):
    """A source that could not be opened; the message names the source and the reason."""


# user:password@ in any URL, and the value of a secret-looking name=value (rtspsrc's user-id/user-pw, a camera
# CGI's ?user=...&pwd=..., token=, key=); the value ends at whitespace, quote, &, ;, ! or ','.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]*@")  # to the last @: p@ss
_SECRET_SETTING = re.compile(
    r"(?i)(?P<name>\b(?:user-pw|user-id|user(?:name)?|login|passw(?:or)?d|pwd|pass|secret|token|auth|"
    r"api[-_]?key|key)\s*=\s*)(?:\"[^\"]*\"|'[^']*'|[^\s&;!,'\"]+)"
)


def redact_secrets(text: str) -> str:
    """``text`` (a URL or a GStreamer pipeline) with URL credentials and secret-looking ``name=value`` values
    replaced by ``***``: what is published over MQTT and logged must not carry a camera's password."""
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _SECRET_SETTING.sub(r"\g<name>***", text)


def parse_source(source: str | int) -> SourceSpec:
    """Classify a configured camera source; raises ValueError with a clear message when it is unusable.

    int or a string of digits -> ``index``; a path under /dev/ (/dev/videoN, /dev/v4l/by-id/...) ->
    ``v4l2``; rtsp:// and rtsps:// -> ``rtsp``; http:// and https:// -> ``http`` (MJPEG over HTTP);
    ``gst:<pipeline>`` -> ``gstreamer`` (" ! appsink drop=true max-buffers=1" appended unless the
    pipeline already ends in an appsink); file:// or anything else -> ``file`` (existence is checked
    when opened, so that a file that appears later is picked up).
    """
    if isinstance(source, bool) or not isinstance(source, (int, str)):
        raise ValueError(f"camera source must be a device index or a string, got {type(source).__name__}: {source!r}")
    if isinstance(source, int):
        return _index(source, repr(source))
    text = source.strip()
    if not text:
        raise ValueError(f"camera source is empty; expected {_SUPPORTED}")
    if re.fullmatch(r"[+-]?\d+", text):
        return _index(int(text), repr(source))
    if text.startswith("/dev/"):
        return SourceSpec("v4l2", text)
    if text.lower().startswith("gst:"):
        return SourceSpec("gstreamer", _gst_pipeline(text[4:], source))
    match = _SCHEME.match(text)
    if match is None:
        return SourceSpec("file", text)
    scheme = match.group(1).lower()
    if scheme == "file":
        path = text[len("file://") :]
        if not path:
            raise ValueError(f"camera source {source!r}: file:// needs a path")
        return SourceSpec("file", path)
    if scheme in ("rtsp", "rtsps", "http", "https"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise ValueError(f"camera source {redact_secrets(text)!r}: the URL has no host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            shown = redact_secrets(text)
            raise ValueError(f"camera source {shown!r}: the URL's port is not a number in 0-65535") from None
        return SourceSpec("rtsp" if scheme.startswith("rtsp") else "http", text)
    shown = redact_secrets(text)
    raise ValueError(f"camera source {shown!r}: unsupported scheme '{scheme}://'; expected {_SUPPORTED}")


def _index(index: int, shown: str) -> SourceSpec:
    if index < 0:
        raise ValueError(f"camera source {shown}: a device index must be 0 or more")
    return SourceSpec("index", index)


def _gst_pipeline(pipeline: str, shown: str) -> str:
    pipeline = pipeline.strip().rstrip("!").strip()
    if not pipeline:
        raise ValueError(f"camera source {shown!r}: 'gst:' must be followed by a GStreamer pipeline")
    last = pipeline.rsplit("!", 1)[-1].strip()
    if last.split(None, 1)[0] != "appsink":
        pipeline = f"{pipeline} ! {GST_APPSINK}"
    return pipeline


def _cv2() -> Any:
    # Imported lazily: config validation parses sources on machines (or in tools) without OpenCV.
    import cv2

    return cv2


def has_gstreamer() -> bool:
    """Whether the loaded cv2 can open GStreamer pipelines (pip wheels cannot; JetPack's OpenCV can)."""
    cv2 = _cv2()
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER))
    except (AttributeError, cv2.error):
        return "GStreamer:                   YES" in cv2.getBuildInformation()


def has_ffmpeg() -> bool:
    """Whether the loaded cv2 can open files and network streams through FFmpeg."""
    cv2 = _cv2()
    try:
        return bool(cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG))
    except (AttributeError, cv2.error):
        return re.search(r"^\s*FFMPEG:\s*YES", cv2.getBuildInformation(), re.MULTILINE) is not None


def missing_capability(spec: SourceSpec) -> str | None:
    """Why the loaded OpenCV can never open ``spec`` (it was built without the backend the source needs), or None.
    Retrying cannot help such a source: the daemon refuses to start on it (exit 3) and doctor fails it."""
    cv2 = _cv2()
    if spec.kind == "gstreamer" and not has_gstreamer():
        return (
            f"{spec.describe()}: this OpenCV ({cv2.__version__}, {cv2.__file__}) was built without GStreamer; "
            "use the platform's OpenCV (JetPack's on a Jetson) instead of a pip opencv-python wheel"
        )
    if spec.kind in ("file", "rtsp", "http") and not has_ffmpeg():
        return f"{spec.describe()}: this OpenCV ({cv2.__version__}, {cv2.__file__}) was built without FFmpeg"
    return None


def gstreamer_takes_timeouts(opencv_version: str) -> bool:
    """Whether OpenCV ``opencv_version`` ("4.8.0", "4.5.4-dev") accepts CAP_PROP_OPEN/READ_TIMEOUT_MSEC for
    GStreamer (added in 4.6)."""
    numbers = [int(n) for n in re.findall(r"\d+", opencv_version)[:2]]
    return len(numbers) == 2 and (numbers[0], numbers[1]) >= (4, 6)


def open_capture(spec: SourceSpec, *, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0) -> cv2.VideoCapture:
    """Open ``spec`` and return an opened ``cv2.VideoCapture``; raises CaptureError naming the source and why.

    Waits are bounded where the backend allows it: FFmpeg (network and files) and GStreamer take
    ``open_timeout_s``/``read_timeout_s`` (seconds) as CAP_PROP_OPEN/READ_TIMEOUT_MSEC. V4L2 takes
    no timeouts through OpenCV's API; its per-frame wait is OpenCV's OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT
    (default 10 s), which is set here to ``read_timeout_s`` unless the environment already sets it
    (process-wide, read once by OpenCV). RTSP uses TCP unless OPENCV_FFMPEG_CAPTURE_OPTIONS says
    otherwise (UDP loses packets under load and smears frames).
    """
    if open_timeout_s <= 0 or read_timeout_s <= 0:
        raise ValueError("open_timeout_s and read_timeout_s must be positive (seconds)")
    cv2 = _cv2()
    name = spec.describe()
    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(read_timeout_s * 1000),
    ]
    threads = [cv2.CAP_PROP_N_THREADS, 1] if hasattr(cv2, "CAP_PROP_N_THREADS") else []

    if spec.kind in ("index", "v4l2"):
        if spec.kind == "v4l2" and not Path(str(spec.target)).exists():
            raise CaptureError(f"{name}: no such device (unplugged, or not created by its driver yet)")
        os.environ.setdefault("OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", str(max(1, math.ceil(read_timeout_s))))
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        cap = _video_capture(cv2, name, spec.target, api, [])
        reason = "the device exists but could not be opened (busy, no permission, or not a capture device)"
    elif spec.kind == "gstreamer":
        missing = missing_capability(spec)
        if missing is not None:
            raise CaptureError(missing)
        # An OpenCV older than 4.6 refuses the timeout parameters (its open fails); a newer one that fails to open
        # must not be asked again without them, which would wait unbounded on a camera that is down.
        params = timeouts if gstreamer_takes_timeouts(cv2.__version__) else []
        cap = _video_capture(cv2, name, spec.target, cv2.CAP_GSTREAMER, params)
        reason = "GStreamer could not start the pipeline (check it with gst-launch-1.0)"
    elif spec.kind == "file":
        path = Path(str(spec.target))
        if not path.exists():
            raise CaptureError(f"{name}: file not found")
        if not path.is_file():
            raise CaptureError(f"{name}: not a regular file")
        if not os.access(path, os.R_OK):
            raise CaptureError(f"{name}: file is not readable (permissions)")
        cap = _video_capture(cv2, name, str(path), cv2.CAP_FFMPEG, timeouts + threads)
        reason = "FFmpeg could not open it (not a video, truncated, or an unsupported codec)"
    else:  # rtsp, http
        if spec.kind == "rtsp":
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        cap = _video_capture(cv2, name, str(spec.target), cv2.CAP_FFMPEG, timeouts + threads)
        reason = f"FFmpeg could not open the stream within {open_timeout_s:g} s (unreachable, refused, or not video)"

    if not cap.isOpened():
        cap.release()
        raise CaptureError(f"{name}: {reason}")
    return cap


def _video_capture(cv2: Any, name: str, target: str | int, api: int, params: list[int]) -> cv2.VideoCapture:
    try:
        return cv2.VideoCapture(target, api, params) if params else cv2.VideoCapture(target, api)
    except cv2.error as exc:  # some backends raise instead of returning a closed capture
        raise CaptureError(f"{name}: OpenCV refused to open it: {str(exc).strip()}") from None


def source_fps(cap: cv2.VideoCapture) -> float | None:
    """The frame rate the source reports (frames per second), or None when it does not know.

    FFmpeg reports 0, NaN or timebase-like values (1000, 90000) for streams without a rate; anything
    outside (0, 1000) is treated as unknown. An HTTP MJPEG stream reports FFmpeg's guess (25).
    """
    cv2 = _cv2()
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
    except (cv2.error, TypeError, ValueError):
        return None
    if not math.isfinite(fps) or fps <= 0 or fps >= 1000:
        return None
    return fps
