"""The daemon's config: YAML with line numbers in every problem, EDGE_* overrides, check-config and doctor."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_daemon.config import ConfigError, load_config, parse_config
from tests.conftest import SignedBundle
from tests.daemon_helpers import write_config

GOOD = """\
device_id: line3-cam-a
bundle: bundles/current.tar
trusted_keys: [keys/line3.pub]
mqtt:
  host: mqtt.plant.local
  port: 1883
cameras:
  - id: cam0
    source: /dev/video0
    roi: [10, 20, 300, 200]
  - id: cam1
    source: rtsp://10.0.0.5/stream
    threshold: 0.6
"""


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "edge_daemon.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_good_config_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.bundle == tmp_path / "bundles" / "current.tar"
    assert cfg.trusted_keys == [tmp_path / "keys" / "line3.pub"]
    assert cfg.cameras[0].roi == (10, 20, 300, 200) and cfg.cameras[1].threshold == 0.6
    assert cfg.cameras[1].source == "rtsp://10.0.0.5/stream"  # URLs are not paths
    assert cfg.events.open_frames == 2 and cfg.http.bind == "127.0.0.1:9108"
    assert (cfg.cameras[0].open_timeout_s, cfg.cameras[0].read_timeout_s) == (10.0, 5.0)  # the defaults
    assert len(cfg.digest()) == 16


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("file:///srv/clips/line3.mp4", "/srv/clips/line3.mp4"),
        ("file://clips/line3.mp4", "{base}/clips/line3.mp4"),
        ("clips/line3.mp4", "{base}/clips/line3.mp4"),
        ("/srv/clips/line3.mp4", "/srv/clips/line3.mp4"),
    ],
)
def test_file_sources_resolve_to_the_path_they_name(tmp_path: Path, source: str, expected: str) -> None:
    """A file:// URL is a path once its scheme is off: relative ones are relative to the config, as plain paths
    are (file:///abs/x.mp4 used to become <config folder>/file:/abs/x.mp4, which check-config passed)."""
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("source: /dev/video0", f"source: {source}"))
    assert load_config(path).cameras[0].source == expected.format(base=tmp_path)


def test_every_problem_on_its_own_line_with_the_yaml_line() -> None:
    bad = GOOD.replace("port: 1883", "port: 99999").replace("threshold: 0.6", "threshold: 1.5")
    bad = bad.replace("id: cam1", "id: cam 1").replace("device_id:", "devce_id:")
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    problems = err.value.problems
    text = "\n".join(problems)
    assert any(p.startswith("line 6: mqtt.port:") for p in problems), text
    assert any(p.startswith("line 13: cameras.1.threshold:") for p in problems), text
    assert any(p.startswith("line 11: cameras.1.id:") for p in problems), text
    assert any("devce_id: unknown key" in p for p in problems), text
    assert any("device_id: required key is missing" in p for p in problems), text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("source: /dev/video0", "source: ftp://x/y"), "cameras.0.source"),
        (("source: /dev/video0", 'source: ""'), "cameras.0.source"),
        (("id: cam1", "id: cam0"), "used twice"),
        (("roi: [10, 20, 300, 200]", "roi: [10, 20, 0, 200]"), "roi"),
        (("port: 1883", "port: 1883\n  tls: {ca: ca.pem, cert: c.pem}"), "tls.cert and tls.key go together"),
        (("mqtt:", "http: {bind: nowhere}\nmqtt:"), "bind must be host:port"),
        (("threshold: 0.6", "open_timeout_s: 0"), "cameras.1.open_timeout_s"),
        (("threshold: 0.6", "read_timeout_s: -1"), "cameras.1.read_timeout_s"),
    ],
)
def test_bad_values_are_named(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace(*change))
    assert expected in "\n".join(err.value.problems)


def test_not_yaml_and_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"line 2: not valid YAML"):
        parse_config("device_id: a\n  bundle: [unclosed\n")
    with pytest.raises(ConfigError, match="mapping of keys"):
        parse_config("- just\n- a list\n")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_MQTT__HOST", "broker.other")
    monkeypatch.setenv("EDGE_MQTT__PASSWORD", "s3cret")
    monkeypatch.setenv("EDGE_EVENTS__OPEN_FRAMES", "4")
    cfg = parse_config(GOOD)
    assert cfg.mqtt.host == "broker.other" and cfg.mqtt.port == 1883  # key by key, the rest from the file
    assert cfg.events.open_frames == 4
    assert cfg.mqtt_password() == "s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.model_dump_json()


def test_environment_variables_that_set_nothing_or_set_it_wrong_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable that names no key was listed as an applied override and ignored (EDGE_MQTT_HOST for
    EDGE_MQTT__HOST: the daemon then talks to the file's broker); a bad value from a variable was blamed on the
    YAML line of that key."""
    monkeypatch.setenv("EDGE_MQTT_HOST", "broker.plant")
    with pytest.raises(ConfigError, match="environment variable EDGE_MQTT_HOST names no config key"):
        parse_config(GOOD)
    monkeypatch.delenv("EDGE_MQTT_HOST")
    for var, value, problem in (
        (
            "EDGE_MQTT__PORT",
            "abc",
            "environment variable EDGE_MQTT__PORT: mqtt.port: Input should be a valid integer, unable to parse string "
            "as an integer",
        ),
        (  # an item of a list: it was blamed on the YAML line
            "EDGE_CAMERAS__0__THRESHOLD",
            "0.3",
            "environment variable EDGE_CAMERAS__0__THRESHOLD: cameras: a list cannot be changed item by item; give "
            "the whole list as JSON in EDGE_CAMERAS",
        ),
    ):
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError) as err:
            parse_config(GOOD)
        assert err.value.problems == [problem]
        monkeypatch.delenv(var)
    monkeypatch.setenv("EDGE_INSPECT_CACHE", "/tmp/cache")  # the project's other variables are not config keys
    monkeypatch.setenv("EDGE_MQTT__PORT", "1884")
    assert parse_config(GOOD).mqtt.port == 1884


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    cfg = parse_config(GOOD.replace("  port: 1883", f"  port: 1883\n  password_file: {tmp_path / 'pw'}"))
    assert cfg.mqtt_password() == "hunter2"
    with pytest.raises(ConfigError, match="password_file"):
        parse_config(GOOD.replace("  port: 1883", f"  port: 1883\n  password_file: {tmp_path / 'missing'}"))


def test_broker_files_are_found_beside_the_config_whatever_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd starts the daemon in /: a relative password_file or TLS file is the config folder's, for the check
    at load as for the daemon's use (the check looked in the working folder, refusing a good config)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "pw.txt").write_text("hunter2\n")
    (etc / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = etc / "config.yaml"
    config.write_text(GOOD.replace("  port: 1883", "  port: 1883\n  password_file: pw.txt\n  tls: {ca: ca.pem}"))
    monkeypatch.chdir("/")
    cfg = load_config(config)
    assert cfg.mqtt_password() == "hunter2" and cfg.mqtt.tls is not None and cfg.mqtt.tls.ca == etc / "ca.pem"
    (etc / "ca.pem").unlink()
    with pytest.raises(ConfigError, match=rf"mqtt\.tls\.ca: cannot read {etc / 'ca.pem'}: No such file"):
        load_config(config)


def test_a_boolean_camera_source_is_refused() -> None:
    with pytest.raises(ConfigError, match="camera source must be a device index or a string, got bool"):
        parse_config(GOOD.replace("source: /dev/video0", "source: true"))


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    # what the config names on this machine: a trusted key that is not there is a problem (run refuses every
    # bundle then; check-config said ok); a missing bundle or video file is a note (a pushed update may serve, a
    # file may appear later)
    res = cli("check-config", good)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == [
        f"{good}: trusted_keys: cannot read {tmp_path / 'keys/line3.pub'}: No such file or directory"
    ]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/line3.pub").write_text("a key")
    res = cli("check-config", good)
    assert res.returncode == 0 and "ok (device line3-cam-a, 2 camera(s)" in res.stdout, res.stderr
    assert f"note: bundle {tmp_path / 'bundles/current.tar'} does not exist here" in res.stderr
    with_file = tmp_path / "file.yaml"
    with_file.write_text(GOOD.replace("source: /dev/video0", "source: line.mp4"))
    res = cli("check-config", with_file)
    assert res.returncode == 0 and f"camera cam0: file '{tmp_path / 'line.mp4'}' does not exist (yet)" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("port: 1883", "port: nope").replace("open", "x"))
    res = cli("check-config", bad)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{bad}: line 6: mqtt.port:" in res.stderr
    res = cli("check-config", tmp_path / "absent.yaml")
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr
    for var, value in [("EDGE_TRUSTED_KEYS", "/etc/edge-inspect/keys/line3.pub"), ("EDGE_MQTT", '{"host": ')]:
        res = cli("check-config", good, env={var: value})  # a list or a section as plain text: not JSON
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{good}: environment variable {var} is not valid JSON" in res.stderr


def test_doctor_reports_the_device(tmp_path: Path) -> None:
    res = cli("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    for what in ("python", "opencv", "ffmpeg", "gstreamer", "onnxruntime", "tensorrt"):
        assert any(line.split()[1:2] == [what] for line in res.stdout.splitlines()), (what, res.stdout)
    # with a config: the broker (nothing listens on this port) and the bundle (missing) are FAIL lines, exit 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace("mqtt.plant.local", "127.0.0.1").replace("port: 1883", "port: 9"))
    res = cli("doctor", "--config", cfg)
    assert res.returncode == 1
    assert any(ln.startswith("FAIL  broker") for ln in res.stdout.splitlines()), res.stdout
    assert any(ln.startswith("FAIL  bundle") for ln in res.stdout.splitlines()), res.stdout


def test_what_no_retry_fixes_stops_run_at_once_and_fails_doctor(tmp_path: Path) -> None:
    """A state_dir that cannot be written is exit 2 in one line (it was a traceback and exit 1, which systemd
    restarts every 5 s for ever); a gst: source on an OpenCV without GStreamer is exit 3, a capability missing (it
    was retried for ever). doctor fails both, and never prints a camera's password."""
    from edge_daemon.capture.sources import has_gstreamer

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        GOOD.replace("mqtt.plant.local", "127.0.0.1").replace("port: 1883", "port: 9")
        + f"state_dir: {blocker / 'state'}\n"
        + f"spool: {{path: {tmp_path / 'spool.db'}}}\n"
    )
    cfg.write_text(cfg.read_text().replace("rtsp://10.0.0.5/stream", "rtsp://admin:Hunter2@10.0.0.5/stream"))
    res = cli("run", "--config", cfg)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"state_dir {blocker / 'state'} cannot be made" not in res.stderr  # run creates: the OS says why not
    assert f"state_dir {blocker / 'state'} cannot be written: Not a directory" in res.stderr, res.stderr
    res = cli("doctor", "--config", cfg)
    lines = res.stdout.splitlines()
    assert res.returncode == 1
    assert f"FAIL  state_dir    {blocker / 'state'} cannot be made: {blocker} is not a folder" in lines, res.stdout
    assert any(ln.startswith("ok    spool ") for ln in lines), res.stdout
    assert "Hunter2" not in res.stdout and any("rtsp://***@10.0.0.5/stream" in ln for ln in lines), res.stdout
    if has_gstreamer():
        return
    cfg.write_text(
        cfg.read_text()
        .replace(f"state_dir: {blocker / 'state'}", f"state_dir: {tmp_path / 'state'}")
        .replace("source: /dev/video0", "source: 'gst:videotestsrc ! videoconvert'")
    )
    res = cli("run", "--config", cfg)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    assert "camera cam0: gstreamer pipeline" in res.stderr and "built without GStreamer" in res.stderr, res.stderr
    res = cli("doctor", "--config", cfg)
    fail = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL  camera cam0")]
    assert res.returncode == 1 and fail and "built without GStreamer" in fail[0], res.stdout


def test_the_daemon_extra_leaves_opencv_to_the_device_and_run_says_when_it_is_missing(tmp_path: Path) -> None:
    """DESIGN.md: a pip OpenCV wheel would hide JetPack's (GStreamer, hardware decoders), so the `daemon` extra does
    not pull one; `run` on a device without any cv2 is one line naming both ways to get it, exit 3 (a capability
    missing), before the config is even read."""
    from importlib.metadata import requires

    def extra(name: str) -> list[str]:  # the installed metadata: what pip acts on
        return [r.split(";")[0] for r in requires("edge-inspect") or [] if r.endswith(f'extra == "{name}"')]

    assert extra("daemon") and not [r for r in extra("daemon") if "opencv" in r.lower()]
    assert [r for r in extra("opencv") if r.startswith("opencv-python-headless")]
    blocker = tmp_path / "no-opencv"
    blocker.mkdir()
    (blocker / "cv2.py").write_text("raise ImportError(\"No module named 'cv2'\", name='cv2')\n")
    res = cli("run", "--config", tmp_path / "absent.yaml", env={"PYTHONPATH": str(blocker)})
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "OpenCV (cv2) cannot be imported" in res.stderr and "JetPack's OpenCV" in res.stderr
    assert "edge-inspect[daemon,opencv]" in res.stderr
    res = cli("doctor", env={"PYTHONPATH": str(blocker)})
    assert res.returncode == 1 and any(ln.startswith("FAIL  opencv") for ln in res.stdout.splitlines()), res.stdout


# A real OpenCV built against NumPy 1.x, as JetPack 6's is: the last opencv-python-headless wheel before NumPy 2.
NUMPY1_OPENCV = "opencv-python-headless==4.8.0.76"
NUMPY1_OPENCV_WHEEL = "opencv_python_headless-4.8.0.76-cp37-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
NUMPY1_OPENCV_SHA256 = "220d2e292fa45ef0582aab730460bbc15cfe61f2089208167a372ccf76f01e21"


@pytest.fixture(scope="module")
def numpy1_opencv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding that wheel's cv2, to put first on PYTHONPATH (the wheel is cached in the trainer's cache)."""
    import platform
    import zipfile

    import numpy

    from trainer.datasets.cache import default_cache_dir, fetch_wheel

    if platform.machine() != "x86_64" or not numpy.__version__.startswith("2."):
        pytest.skip(f"needs x86_64 and NumPy 2 (here {platform.machine()}, NumPy {numpy.__version__})")
    wheel = fetch_wheel(NUMPY1_OPENCV, NUMPY1_OPENCV_WHEEL, NUMPY1_OPENCV_SHA256, default_cache_dir())
    folder = tmp_path_factory.mktemp("numpy1-opencv")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(folder)
    return folder


def test_an_opencv_built_for_numpy_1_is_named_with_its_fix(numpy1_opencv: Path, tmp_path: Path) -> None:
    """JetPack 6's OpenCV under the NumPy 2 that pip put into the venv: `run` and `doctor` say so in one line with
    the fix ('numpy<2'), without NumPy's own multi-line warning and traceback."""
    env = {"PYTHONPATH": str(numpy1_opencv)}
    res = cli("run", "--config", tmp_path / "absent.yaml", env=env)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "built against NumPy 1.x" in res.stderr and "numpy<2" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "A module that was compiled" not in res.stderr, res.stderr
    res = cli("doctor", env=env)
    fail = [ln for ln in res.stdout.splitlines() if ln.startswith("FAIL  opencv")]
    assert res.returncode == 1 and fail and "numpy<2" in fail[0], res.stdout + res.stderr


def test_doctor_warns_when_two_distributions_install_onnxruntime(tmp_path: Path) -> None:
    """onnxruntime-gpu (a Jetson's or GPU box's) with the daemon extra's onnxruntime installed over it: one folder,
    two owners, the GPU providers gone. The second owner here is the record pip leaves of an install (its
    .dist-info), on the path as a second site folder."""
    site = tmp_path / "site"
    info = site / "onnxruntime_gpu-1.20.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    (info / "top_level.txt").write_text("onnxruntime\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\n")
    res = cli("doctor")
    assert not [ln for ln in res.stdout.splitlines() if "distributions over each other" in ln], res.stdout
    res = cli("doctor", env={"PYTHONPATH": str(site)})
    warn = [ln for ln in res.stdout.splitlines() if ln.startswith("warn  onnxruntime")]
    assert warn and "installed by 2 distributions" in warn[0] and "onnxruntime-gpu 1.20.0" in warn[0], res.stdout
    assert res.returncode == 0  # a warning, not a failure: the daemon runs, maybe without its GPU providers


def test_doctor_says_which_model_the_daemon_will_start_on(signed_bottle_bundle: SignedBundle, tmp_path: Path) -> None:
    """The "update" line: none pushed, a pushed update that serves, one that will be skipped, a config changed by hand
    since (it wins), and a state file that cannot be read. Doctor only reads: the state file is never changed."""
    b = signed_bottle_bundle
    cfg = write_config(tmp_path, b.path, b.public_key, 9, [{"id": "cam0", "source": str(tmp_path / "x.avi")}])

    def update_line() -> str:
        res = cli("doctor", "--config", cfg)
        assert "Traceback" not in res.stderr, res.stderr
        lines = [ln for ln in res.stdout.splitlines() if ln.split()[1:2] == ["update"]]
        assert len(lines) == 1, res.stdout
        return lines[0]

    assert update_line().startswith("ok    update       none pushed")
    sha = hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest()
    copy = tmp_path / "state" / "updates" / "unpacked" / "bundles" / sha
    shutil.copytree(b.path, copy)
    active = {"path": str(copy), "sha": sha, "version": "v9", "name": "ae"}
    state_file = tmp_path / "state" / "updates" / "state.json"
    state_file.write_text(json.dumps({"active": active, "history": [], "config_sha": sha}))
    assert update_line().startswith(f"ok    update       v9 (sha {sha[:12]}) serves"), update_line()
    state_file.write_text(json.dumps({"active": active, "history": [], "config_sha": "0" * 64}))
    line = update_line()
    assert line.startswith("warn") and "the config's bundle changed since the last start" in line, line
    state_file.write_text(json.dumps({"active": active, "history": [], "config_sha": sha}))
    (copy / "model.onnx").write_bytes(b"")
    line = update_line()
    assert line.startswith("warn") and "cannot serve" in line and "model.onnx" in line, line
    state_file.write_text(json.dumps({"active": "v9", "history": []}))
    assert "cannot be read" in update_line()
    state_file.write_text("{not json")
    line = update_line()
    assert line.startswith("warn") and "cannot be read" in line, line
    assert state_file.read_text() == "{not json"  # read only


def test_doctor_checks_this_opencv_prepares_the_golden_images_as_the_trainer(
    signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    """The "preprocess" line: the bundle's golden source images, prepared by this OpenCV, against the golden inputs.
    Here they match; a bundle whose first source decodes to other pixels (re-encoded as a JPEG, as another
    decoder would differ) is a warning with the figures."""
    import cv2

    from deploy.bundle import verify_bundle, write_bundle

    b = signed_bottle_bundle

    def preprocess_line(bundle: Path) -> str:
        cfg = write_config(tmp_path, bundle, b.public_key, 9, [{"id": "cam0", "source": str(tmp_path / "x.avi")}])
        res = cli("doctor", "--config", cfg)
        assert "Traceback" not in res.stderr, res.stderr
        lines = [ln for ln in res.stdout.splitlines() if ln.split()[1:2] == ["preprocess"]]
        assert len(lines) == 1, res.stdout
        return lines[0]

    line = preprocess_line(b.path)
    assert line.startswith("ok    preprocess   this OpenCV prepares the 12 golden source images exactly"), line

    manifest = verify_bundle(b.path, [b.public_key])
    files: dict[str, Path | bytes] = {name: b.path / name for name in manifest.files}
    first = sorted(name for name in files if name.startswith("golden/sources/"))[0]
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(b.path / first)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    files[first] = jpeg.tobytes()
    other = tmp_path / "reencoded"
    write_bundle(other, manifest.model_copy(update={"files": {}}), files, b.private_key)
    line = preprocess_line(other)
    assert line.startswith("warn  preprocess   this OpenCV prepares 1 of the 12 golden source images differently"), line
    assert "normalised scores move by up to" in line


def test_a_key_given_twice_is_refused_with_both_lines() -> None:
    """YAML keeps the last of two equal keys without a word: a second cameras: list silently dropped cam0 and cam1
    (a camera left uninspected), a second mqtt: section the host."""
    text = GOOD + "cameras:\n  - id: cam2\n    source: /dev/video2\nmqtt: {port: 1884}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert err.value.problems == [
        "line 14: cameras is given again (first on line 7); YAML would keep only this one: merge the two",
        "line 17: mqtt is given again (first on line 4); YAML would keep only this one: merge the two",
    ]
    with pytest.raises(ConfigError, match=r"line 11: cameras.0.roi is given again \(first on line 10\)"):
        parse_config(GOOD.replace("    roi: [10, 20, 300, 200]", "    roi: [10, 20, 300, 200]\n    roi: [0, 0, 8, 8]"))
