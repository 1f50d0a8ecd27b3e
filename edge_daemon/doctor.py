"""``edge-daemon doctor``: what this device has, and whether the configured broker and bundle work.

Each check gives one line: ``ok``, ``warn`` (works, but worth knowing) or ``FAIL`` (the daemon will not run as
configured). ``runtime_facts`` is the same inventory as data, for the retained P/info message.
"""

from __future__ import annotations

import functools
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_daemon import __version__

if TYPE_CHECKING:
    from edge_daemon.config import DaemonConfig
    from edge_daemon.model import LoadedBundle

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
OPENCV_HINT = (
    "on a Jetson use JetPack's OpenCV (a venv made with --system-site-packages sees it), elsewhere install the "
    "'opencv' extra: pip install 'edge-inspect[daemon,opencv]'"
)


@functools.lru_cache(maxsize=1)
def _package_owners() -> Mapping[str, list[str]]:
    """importlib.metadata.packages_distributions, read once per process (0.1-0.2 s: P/info asks on every connect)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def overlapping_installs(module: str) -> list[str]:
    """The pip distributions ("name version") that each install the top-level package ``module``, when more than
    one does (else []): pip puts them into the same folder, over each other's files, and which one's code runs is an
    accident of install order. Known cases: onnxruntime with onnxruntime-gpu (the GPU providers vanish), and
    opencv-python with opencv-python-headless."""
    from importlib.metadata import PackageNotFoundError, version

    names = sorted(set(_package_owners().get(module, [])), key=str.lower)
    if len(names) < 2:
        return []
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(name)
    return found


def _overlap_check(module: str, what: str) -> list[Check]:
    found = overlapping_installs(module)
    if not found:
        return []
    return [
        Check(
            "warn",
            what,
            f"'{module}' is installed by {len(found)} distributions over each other ({', '.join(found)}): "
            f"pip uninstall all of them, then install the one this device should use",
        )
    ]


def opencv_import_problem() -> str | None:
    """None when ``import cv2`` works; else one line saying why not and what to do.

    An OpenCV built against NumPy 1.x (JetPack 6's is) cannot load under NumPy 2, which pip puts into a venv that
    asks for a newer NumPy than the system's: that failure is named, with its fix, and NumPy's own multi-line
    warning about it is kept off the terminal.
    """
    import contextlib
    import io

    noise = io.StringIO()
    try:
        with contextlib.redirect_stderr(noise):
            import cv2  # noqa: F401
    except ImportError as exc:
        from deploy.numpy_abi import numpy1_build_problem

        hint = numpy1_build_problem(exc, noise.getvalue()) or OPENCV_HINT
        return f"OpenCV (cv2) cannot be imported ({exc}): {hint}"
    return None


@dataclass(frozen=True)
class Check:
    level: str  # ok | warn | FAIL
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4}  {self.what:<12} {self.detail}"


def _opencv() -> tuple[dict[str, Any], list[Check]]:
    problem = opencv_import_problem()
    if problem is not None:
        return {"opencv": None}, [Check("FAIL", "opencv", problem)]
    import cv2

    info = cv2.getBuildInformation()

    def has(name: str) -> bool:
        m = re.search(rf"^\s*{name}:\s*(\S+)", info, re.MULTILINE)
        return bool(m and m.group(1).upper().startswith("YES"))

    from edge_daemon.capture.sources import has_ffmpeg, has_gstreamer

    # the same answers the daemon acts on (missing_capability): a camera line never contradicts these
    gst, ffmpeg, v4l = has_gstreamer(), has_ffmpeg(), has("v4l/v4l2")
    facts = {
        "opencv": cv2.__version__,
        "opencv_path": str(Path(cv2.__file__).parent),
        "gstreamer": gst,
        "ffmpeg": ffmpeg,
        "v4l2": v4l,
    }
    checks = [
        Check("ok", "opencv", f"{cv2.__version__} from {Path(cv2.__file__).parent}"),
        *_overlap_check("cv2", "opencv"),
    ]
    checks.append(
        Check(
            "ok" if ffmpeg else "warn",
            "ffmpeg",
            "yes (files, RTSP, HTTP MJPEG)" if ffmpeg else "no: files, rtsp:// and http:// sources will not open",
        )
    )
    checks.append(
        Check(
            "ok" if gst else "warn",
            "gstreamer",
            "yes (gst: sources, hardware decoders)"
            if gst
            else "no: gst: sources will not open"
            + ("; this looks like a pip OpenCV wheel shadowing JetPack's" if TEGRA_RELEASE.exists() else ""),
        )
    )
    checks.append(
        Check("ok" if v4l else "warn", "v4l2", "yes (/dev/videoN)" if v4l else "no: /dev/videoN will not open")
    )
    return facts, checks


def _onnxruntime() -> tuple[dict[str, Any], list[Check]]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"onnxruntime": None}, [Check("FAIL", "onnxruntime", f"not importable ({exc})")]
    providers = list(ort.get_available_providers())
    return {"onnxruntime": ort.__version__, "providers": providers}, [
        Check("ok", "onnxruntime", f"{ort.__version__}, providers {', '.join(providers)}"),
        *_overlap_check("onnxruntime", "onnxruntime"),
    ]


def _tensorrt() -> tuple[dict[str, Any], list[Check]]:
    from deploy.engines import probe_device

    dev = probe_device()
    facts = {
        "tensorrt": dev.tensorrt_version,
        "gpu": dev.gpu_name,
        "compute_capability": dev.compute_capability,
        "cuda": dev.cuda_version,
        "l4t": dev.l4t_release,
    }
    missing = dev.missing()
    if missing:
        return facts, [
            Check("warn", "tensorrt", "not usable (missing " + " and ".join(missing) + "): ONNX Runtime serves")
        ]
    return facts, [
        Check(
            "ok",
            "tensorrt",
            f"{dev.tensorrt_version} on {dev.gpu_name} (sm {dev.compute_capability}, "
            f"CUDA {dev.cuda_version}{', L4T ' + dev.l4t_release if dev.l4t_release else ''})",
        )
    ]


def runtime_facts() -> dict[str, Any]:
    """Python, OpenCV, ONNX Runtime, TensorRT and GPU facts of this device (for P/info)."""
    facts: dict[str, Any] = {"python": sys.version.split()[0]}
    for probe in (_opencv, _onnxruntime, _tensorrt):
        facts.update(probe()[0])
    return facts


def check_broker(host: str, port: int, timeout_s: float = 3.0) -> Check:
    """TCP reachability of the broker (the MQTT handshake itself is the daemon's: it reports refusals in P/stats)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return Check("ok", "broker", f"{host}:{port} accepts connections")
    except OSError as exc:
        return Check("FAIL", "broker", f"{host}:{port} not reachable: {exc}")


def run_checks(config_path: Path | None) -> list[Check]:
    """Every check; the config-dependent ones (broker, bundle, camera files) only with ``config_path``."""
    checks = [
        Check("ok" if sys.version_info >= (3, 10) else "FAIL", "python", sys.version.split()[0]),
        Check("ok", "edge-inspect", __version__),
    ]
    facts: dict[str, Any] = {}
    for probe in (_opencv, _onnxruntime, _tensorrt):
        found, probe_checks = probe()
        facts.update(found)
        checks += probe_checks
    if config_path is None:
        checks.append(Check("warn", "config", "none given (--config FILE): broker and bundle not checked"))
        return checks
    from deploy.manifest import BundleError
    from edge_daemon.config import ConfigError, load_config, writable_folder_problem
    from edge_daemon.model import load_bundle

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [*checks, *(Check("FAIL", "config", p) for p in exc.problems)]
    checks.append(Check("ok", "config", f"{config_path} (digest {config.digest()})"))
    checks.append(check_broker(config.mqtt.host, config.mqtt.port))
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edge-doctor-") as tmp:
            bundle = load_bundle(config.bundle, config.trusted_keys, Path(tmp), allow_unsigned=config.allow_unsigned)
            checks.append(
                Check(
                    "ok",
                    "bundle",
                    f"{bundle.name} {bundle.version}, sha {bundle.sha[:12]}, "
                    f"signed by {bundle.key_id or 'nobody (allow_unsigned)'}",
                )
            )
            checks.append(check_bundle_preprocessing(bundle))
    except BundleError as exc:
        checks.append(Check("FAIL", "bundle", f"{config.bundle}: {exc}"))
    checks.append(check_update_state(config))
    for what, folder in (("state_dir", config.state_dir), ("spool", config.spool.path.parent)):
        problem = writable_folder_problem(folder, create=False)
        checks.append(Check("FAIL", what, problem) if problem else Check("ok", what, f"{folder} is writable"))
    from edge_daemon.capture.sources import missing_capability, parse_source

    for cam in config.cameras:
        spec = parse_source(cam.source)
        missing = missing_capability(spec) if facts.get("opencv") else None
        if missing is not None:
            checks.append(Check("FAIL", f"camera {cam.id}", missing))
        elif spec.kind == "file" and not Path(str(spec.target)).is_file():
            checks.append(Check("FAIL", f"camera {cam.id}", f"file {spec.target} does not exist"))
        elif spec.kind == "v4l2" and not Path(str(spec.target)).exists():
            checks.append(Check("warn", f"camera {cam.id}", f"{spec.target} is not present now"))
        else:
            checks.append(Check("ok", f"camera {cam.id}", spec.describe()))  # describe() hides passwords
    return checks


def check_bundle_preprocessing(bundle: LoadedBundle) -> Check:
    """Does this OpenCV prepare the bundle's golden source images as the trainer's did, and how far do differences
    move the normalised score (ONNX Runtime, CPU; ``preprocessing_verdict``)? Anything but identical is a warning:
    the daemon serves, but its scores are not quite the ones the bundle was calibrated and evaluated with."""
    from deploy.parity import onnxruntime_runner
    from deploy.preprocess_check import preprocessing_verdict

    try:
        run = onnxruntime_runner(bundle.onnx_path)
    except Exception as exc:  # an ONNX Runtime that cannot load the model: said, not raised
        return Check("warn", "preprocess", f"not checked: {exc}")
    level, line = preprocessing_verdict(bundle.root, bundle.manifest, run)
    return Check("ok" if level == "ok" else "warn", "preprocess", line)


def check_update_state(config: DaemonConfig) -> Check:
    """What the daemon will start on when a pushed update is active (``<state_dir>/updates/state.json``, read only:
    nothing is written). ok: no update, or an update that verifies; warn: an update the daemon will skip (it fails its
    checks or is gone: the previous model kept for rollback serves instead), a config bundle that changed since the
    last start (it replaces the update), or a state file that cannot be read (set aside at start)."""
    from deploy.bundle import manifest_sha256, verify_bundle_details
    from deploy.manifest import BundleError
    from edge_daemon.updater import config_bundle_replaces_update, read_update_state, update_state_path

    path = update_state_path(config.state_dir)
    try:
        state = read_update_state(path)
    except ValueError as exc:
        return Check("warn", "update", f"{path} cannot be read ({exc}): set aside at start, the config's bundle serves")
    if state is None:
        return Check("ok", "update", "none pushed: the config's bundle serves")
    active, kept = state.get("active"), len(state.get("history") or [])
    if not active:
        return Check("ok", "update", f"none active: the config's bundle serves ({kept} previous kept for rollback)")
    name = f"{active.get('version')} (sha {str(active.get('sha'))[:12]})"
    try:
        config_changed = config_bundle_replaces_update(state, manifest_sha256(config.bundle))
    except BundleError:
        config_changed = False  # the bundle line above says why it cannot be read
    if config_changed:
        return Check("warn", "update", f"the config's bundle changed since the last start: it replaces update {name}")
    try:
        verify_bundle_details(Path(active["path"]), config.trusted_keys, require_signature=True)
    except BundleError as exc:
        return Check(
            "warn",
            "update",
            f"update {name} cannot serve ({exc}): the daemon starts on the previous model kept for rollback, "
            "else the config's bundle",
        )
    return Check("ok", "update", f"{name} serves, not the config's bundle ({kept} previous kept for rollback)")
