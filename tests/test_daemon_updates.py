"""Remote model updates end to end: the real daemon, a real mosquitto, real signed bundles (issue 7).

A good bundle goes downloading -> verifying -> building -> validating -> probation -> active while the camera keeps
being scored; bad ones are refused with their reason and the old model never stops; a model that fires on every
frame is rolled back during probation; a daemon killed mid-update comes back on the last active model.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import socketserver
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.bundle import pack_tar, sign_bundle, verify_bundle_details
from deploy.manifest import canonical_bytes, parse_manifest
from deploy.signing import generate_keypair
from tests.bundle_factory import export_newer, prebuilt_newer
from tests.conftest import SignedBundle
from tests.daemon_helpers import DEVICE, PREFIX, Daemon, LineVideo, make_line_video, wait_until, write_config
from tests.mqtt_broker import Broker, Subscriber, publish

STATE = f"{PREFIX}/model/state"


@pytest.fixture(scope="module")
def line(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> LineVideo:
    out = tmp_path_factory.mktemp("line") / "line.avi"
    # normal parts only: a line that is mostly defective would (rightly) fail a new model's probation
    return make_line_video(shared_data / "mvtec_bottle", out, hold=4, fps=25.0, labels={"good"})


def export_again(signed: SignedBundle, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A newer signed bundle of the same run (exported again: a later "created", so a different sha); the one built
    ahead of time where $EDGE_INSPECT_TEST_BUNDLE says (a run without torch: tests/bundle_factory.py)."""
    out = tmp_path_factory.mktemp(name) / "bundle"
    return prebuilt_newer(name, out) or export_newer(signed, out)


@pytest.fixture(scope="module")
def v2(signed_bottle_bundle: SignedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_again(signed_bottle_bundle, tmp_path_factory, "v2")


@pytest.fixture(scope="module")
def v3(v2: Path, signed_bottle_bundle: SignedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Newer than ``v2``."""
    return export_again(signed_bottle_bundle, tmp_path_factory, "v3")


@pytest.fixture(scope="module")
def v4(v3: Path, signed_bottle_bundle: SignedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Newer than ``v3``."""
    return export_again(signed_bottle_bundle, tmp_path_factory, "v4")


def edited(bundle: Path, out: Path, edit: Callable[[dict[str, Any]], None], key: Path | None) -> Path:
    """A copy of ``bundle`` with its manifest edited by ``edit`` and signed with ``key`` (unsigned when None)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_bytes(canonical_bytes(parse_manifest(json.dumps(manifest).encode())))
    (out / "signature").unlink()
    if key is not None:
        sign_bundle(out, key)
    return out


def tar_of(bundle: Path, out: Path) -> tuple[Path, str]:
    pack_tar(bundle, out)
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


def looping(line: LineVideo) -> dict[str, object]:
    return {"id": "cam0", "source": str(line.video), "roi": list(line.roi), "loop": True, "realtime": True}


class Device:
    """A running daemon with a subscriber on its topics; helpers to push and to read the model state."""

    def __init__(self, tmp: Path, bundle: SignedBundle, line: LineVideo, broker: Broker, **updates: Any) -> None:
        self.broker = broker
        self.sub = Subscriber(broker.port, f"{PREFIX}/#").start()
        probation = {"probation_s": 2.0, "probation_min_frames": 20, "stall_timeout_s": 1.0, **updates}
        self.config = write_config(tmp, bundle.path, bundle.public_key, broker.port, [looping(line)], updates=probation)
        self.start()

    def start(self) -> None:
        """Start the daemon and wait until it listens for commands: its link subscribes before it republishes its
        retained status, so a new "online" from this process means a model/set sent now is received."""
        onlines = self._onlines()
        self.daemon = Daemon(self.config)
        wait_until(lambda: self._onlines() > onlines, 30, "the daemon to connect and subscribe")
        wait_until(lambda: self.states(), 30, "the retained model state")

    def _onlines(self) -> int:
        return sum(m.payload == b"online" for m in self.sub.on(f"{PREFIX}/status"))

    def states(self, request_id: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(m.payload) for m in self.sub.on(STATE)]
        return [s for s in out if request_id is None or s["request_id"] == request_id]

    def push(self, url: str, sha256: str, version: str) -> str:
        rid = uuid.uuid4().hex
        body = json.dumps({"request_id": rid, "url": url, "sha256": sha256, "version": version}).encode()
        publish(self.broker.port, f"{PREFIX}/model/set", body)
        return rid

    def final(self, rid: str, timeout: float = 60) -> dict[str, Any]:
        wait_until(
            lambda: any(s["phase"] in ("active", "refused", "rolled_back") for s in self.states(rid)),
            timeout,
            f"request {rid} to finish",
        )
        return [s for s in self.states(rid) if s["phase"] in ("active", "refused", "rolled_back")][-1]

    def scored(self) -> int:
        stats = [json.loads(m.payload) for m in self.sub.on(f"{PREFIX}/stats")]
        return stats[-1]["cameras"]["cam0"]["frames_scored"] if stats else 0

    def keeps_scoring(self) -> None:
        before = self.scored()
        wait_until(lambda: self.scored() > before, 20, "frames to keep being scored")

    def close(self) -> None:
        if self.daemon.alive():
            assert self.daemon.terminate(30) == 0, self.daemon.text()[-3000:]
        self.sub.stop()


@pytest.fixture
def device(signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path) -> Iterator[Device]:
    with Broker(tmp_path / "broker") as broker:
        d = Device(tmp_path, signed_bottle_bundle, line, broker)
        try:
            yield d
        finally:
            d.close()


def test_push_a_good_bundle(device: Device, v2: Path, tmp_path: Path, signed_bottle_bundle: SignedBundle) -> None:
    tar, sha = tar_of(v2, tmp_path / "v2.tar")
    new_sha = verify_bundle_details(v2, [signed_bottle_bundle.public_key]).manifest_sha256
    old_sha = verify_bundle_details(signed_bottle_bundle.path, [signed_bottle_bundle.public_key]).manifest_sha256
    version = parse_manifest((v2 / "manifest.json").read_bytes()).model["version"]
    # The engine cache holds a plan of a model this device no longer has, and one of the serving model (file names
    # are what the pruning reads; the ONNX Runtime backend never opens them).
    v1_onnx = parse_manifest((signed_bottle_bundle.path / "manifest.json").read_bytes()).files["model.onnx"].sha256
    cache = tmp_path / "state" / "engines"
    cache.mkdir(parents=True, exist_ok=True)
    stale, serving = f"{'e' * 16}-trt10.3.0-sm87-fp16-b8.plan", f"{v1_onnx[:16]}-trt10.3.0-sm87-fp16-b8.plan"
    for name in (stale, serving):
        (cache / name).write_bytes(b"plan")
    rid = device.push(tar.as_uri(), sha, version)
    final = device.final(rid)
    assert final["phase"] == "active", final
    assert sorted(p.name for p in cache.glob("*.plan")) == [serving]  # the stale model's engine is gone
    phases = [s["phase"] for s in device.states(rid)]
    expected = ["downloading", "verifying", "building", "validating", "probation", "active"]
    assert [p for p in dict.fromkeys(phases)] == expected, phases
    assert final["model"]["sha"] == new_sha
    # events and info now name the new model; the camera never stopped
    info = json.loads(device.sub.on(f"{PREFIX}/info")[-1].payload)
    assert info["model"]["sha"] == new_sha and old_sha != new_sha
    device.keeps_scoring()
    # the same request again: answered with its outcome, nothing redone
    again = json.dumps({"request_id": rid, "url": tar.as_uri(), "sha256": sha, "version": version}).encode()
    n = len(device.states(rid))
    publish(device.broker.port, f"{PREFIX}/model/set", again)
    wait_until(lambda: len(device.states(rid)) > n, 20, "the duplicate's answer")
    assert [s["phase"] for s in device.states(rid)[n:]] == ["active"]
    # restart: the daemon comes back on the updated model, not the config's bundle
    assert device.daemon.terminate(30) == 0
    counts = device.daemon.final_counts()["cam0"]
    assert counts["frames_dropped"] == 0 and counts["frames_in"] == counts["frames_scored"], counts  # no frame lost
    device.start()
    wait_until(lambda: device.daemon.text().count("ready:") == 2, 30, "the restarted daemon")
    restarted = device.daemon.text().rsplit("final: ", 1)[1]
    assert f"sha {new_sha[:12]}" in restarted
    # and model/rollback goes back to the first model on purpose; the update it leaves is deleted (it is in no
    # history: nothing can roll forward to it), and so is its engine
    updated = Path(json.loads((tmp_path / "state" / "updates" / "state.json").read_text())["active"]["path"])
    assert updated.is_dir()
    publish(device.broker.port, f"{PREFIX}/model/rollback", b'{"request_id": "rb1"}')
    rolled = device.final("rb1")
    assert rolled["phase"] == "rolled_back" and rolled["model"]["sha"] == old_sha, rolled
    assert not updated.exists()
    device.keeps_scoring()


def test_a_downgrade_is_refused_until_a_reload_allows_it(device: Device, v2: Path, v3: Path, tmp_path: Path) -> None:
    """v3 is active; v2, made before it, is refused as a downgrade. SIGHUP with allow_downgrade: true lets the next
    request through (the updater follows the reloaded config; it used to keep the one it started with)."""
    version = {v: parse_manifest((v / "manifest.json").read_bytes()).model["version"] for v in (v2, v3)}
    tars = {v: tar_of(v, tmp_path / f"{v.parent.name}.tar") for v in (v2, v3)}

    def push(v: Path) -> dict[str, Any]:
        return device.final(device.push(tars[v][0].as_uri(), tars[v][1], version[v]))

    assert push(v3)["phase"] == "active"
    refused = push(v2)
    assert refused["phase"] == "refused" and refused["reason"].startswith("downgrade refused:"), refused
    config = json.loads(device.config.read_text())
    device.config.write_text(json.dumps({**config, "allow_downgrade": True, "workers": 2}))
    device.daemon.proc.send_signal(1)
    wait_until(lambda: "config reloaded" in device.daemon.text(), 20, "the reload")
    assert "a restart is needed for: workers" in device.daemon.text()  # said, not silently ignored
    assert push(v2)["phase"] == "active"


def test_a_model_swap_starts_the_latency_window_afresh(
    signed_bottle_bundle: SignedBundle, v2: Path, line: LineVideo, tmp_path: Path
) -> None:
    """Probation's latency budget judges the new model's frames only: the window of the model it replaced (which
    may be why it was replaced) is dropped at the swap. A real camera on the line video and real ONNX Runtime
    sessions of both models."""
    from edge_daemon.backends.onnxruntime import open_onnxruntime
    from edge_daemon.capture.camera import Camera
    from edge_daemon.events import CropTuning, EventTracker, EventTuning
    from edge_daemon.model import load_bundle
    from edge_daemon.pipeline import CameraLane, Pipeline

    keys = [signed_bottle_bundle.public_key]
    old, new = (load_bundle(b, keys, tmp_path / "state") for b in (signed_bottle_bundle.path, v2))
    ready = threading.Event()
    camera = Camera("cam0", str(line.video), roi=line.roi, frame_ready=ready)
    lane = CameraLane(camera, EventTracker("cam0", DEVICE, EventTuning(), CropTuning()), roi=line.roi)
    pipeline = Pipeline([lane], open_onnxruntime(old, max_batch=1, cache_dir=None), old, lambda _: None, ready)
    camera.start()
    try:

        def score(frames: int) -> None:
            target = lane.scored + frames
            wait_until(lambda: pipeline.step() >= 0 and lane.scored >= target, 60, f"{frames} frames scored")

        score(5)
        assert len(lane.latencies_s) == lane.scored >= 5
        pipeline.request_swap(open_onnxruntime(new, max_batch=1, cache_dir=None), new)
        before = lane.scored
        score(3)
        assert pipeline.bundle.sha == new.sha and len(lane.latencies_s) == lane.scored - before
    finally:
        camera.stop()


def test_bad_bundles_are_refused_and_the_old_model_keeps_serving(
    device: Device, signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    b = signed_bottle_bundle
    other_key = generate_keypair(tmp_path / "keys" / "other")[0]
    version = parse_manifest((b.path / "manifest.json").read_bytes()).model["version"]

    def later(m: dict[str, Any]) -> None:
        m["created"] = "2099-01-01T00:00:00Z"

    cases: dict[str, tuple[Path, str]] = {}
    cases["unsigned"] = tar_of(edited(b.path, tmp_path / "unsigned", later, None), tmp_path / "unsigned.tar")
    cases["untrusted"] = tar_of(edited(b.path, tmp_path / "untrusted", later, other_key), tmp_path / "untrusted.tar")
    cases["too_new"] = tar_of(
        edited(b.path, tmp_path / "too_new", lambda m: (later(m), m.update(min_daemon_version="99.0")), b.private_key),
        tmp_path / "too_new.tar",
    )

    def wrong_shape(m: dict[str, Any]) -> None:
        later(m)
        m["input"]["height"] = m["input"]["width"] = 48

    cases["wrong_shape"] = tar_of(edited(b.path, tmp_path / "shape", wrong_shape, b.private_key), tmp_path / "s.tar")
    tampered = edited(b.path, tmp_path / "tampered", later, b.private_key)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    cases["tampered"] = tar_of(tampered, tmp_path / "tampered.tar")
    good_tar, good_sha = tar_of(edited(b.path, tmp_path / "good", later, b.private_key), tmp_path / "good.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good_tar.read_bytes()[: good_tar.stat().st_size // 2])
    nested = tmp_path / "nested.tar"  # json.loads raises RecursionError on it, before any signature check
    with tarfile.open(nested, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = 100_000
        tf.addfile(info, io.BytesIO(b"[" * info.size))
    cases["nested"] = (nested, hashlib.sha256(nested.read_bytes()).hexdigest())
    expected = {
        "unsigned": "unsigned",
        "untrusted": "untrusted key",
        "too_new": "daemon version >= 99.0",
        "wrong_shape": "validation failed",
        "tampered": "model.onnx",
        "truncated": "sha256",
        "missing": "not found",
        "bad_version": "the command says version",
        "nested": "manifest.json does not parse as JSON: JSON nested too deeply",
    }
    publish(device.broker.port, f"{PREFIX}/model/set", b"[" * 5000)  # this one used to end the updater's thread
    pushes = {name: device.push(tar.as_uri(), sha, version) for name, (tar, sha) in cases.items()}
    pushes["truncated"] = device.push(truncated.as_uri(), good_sha, version)
    pushes["missing"] = device.push((tmp_path / "absent.tar").as_uri(), good_sha, version)
    pushes["bad_version"] = device.push(good_tar.as_uri(), good_sha, "not-" + version)
    for name, rid in pushes.items():
        final = device.final(rid)
        assert final["phase"] == "refused" and expected[name] in final["reason"], (name, final)
        assert final["model"]["sha"] == verify_bundle_details(b.path, [b.public_key]).manifest_sha256
    assert any(
        s["phase"] == "refused" and s["reason"] == "command is not JSON: JSON nested too deeply"
        for s in device.states()
    )
    device.keeps_scoring()
    assert device.daemon.alive()
    # wrong_shape and bad_version were verified and unpacked before they were refused: nothing of them stays
    unpacked = tmp_path / "state" / "updates" / "unpacked" / "bundles"
    assert [p.name for p in unpacked.iterdir() if not p.name.startswith(".")] == []


class StallingServer:
    """Serves the first ``first`` bytes of a file, then stalls (a url that stops answering), or 404s."""

    def __init__(self, data: bytes, first: int) -> None:
        owner = self
        self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/bundle.tar":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:first])
                self.wfile.flush()
                owner.release.wait(30)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_stalled_and_404_urls(device: Device, signed_bottle_bundle: SignedBundle, tmp_path: Path) -> None:
    b = signed_bottle_bundle
    tar, sha = tar_of(b.path, tmp_path / "b.tar")
    server = StallingServer(tar.read_bytes(), 1000)
    try:
        stalled = device.final(device.push(f"{server.url}/bundle.tar", sha, "v"))
        assert stalled["phase"] == "refused" and "stalled" in stalled["reason"], stalled
        gone = device.final(device.push(f"{server.url}/nothing.tar", sha, "v"))
        assert gone["phase"] == "refused" and "404" in gone["reason"], gone
    finally:
        server.stop()
    device.keeps_scoring()


def test_a_model_that_fires_on_every_frame_is_rolled_back(
    device: Device, signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    """Passes the golden gate (same graph) but its threshold makes every frame anomalous: rolled back."""
    b = signed_bottle_bundle

    def trigger_happy(m: dict[str, Any]) -> None:
        m["created"] = "2099-01-01T00:00:00Z"
        m["calibration"]["threshold"] = m["calibration"]["raw_min"] - 1.0

    tar, sha = tar_of(edited(b.path, tmp_path / "noisy", trigger_happy, b.private_key), tmp_path / "noisy.tar")
    version = parse_manifest((b.path / "manifest.json").read_bytes()).model["version"]
    final = device.final(device.push(tar.as_uri(), sha, version))
    assert final["phase"] == "rolled_back" and "anomaly rate" in final["reason"], final
    assert final["model"]["sha"] == verify_bundle_details(b.path, [b.public_key]).manifest_sha256
    device.keeps_scoring()
    # a restart answers the outcome again on the retained state (it used to overwrite it with a bare "active")
    assert device.daemon.terminate(30) == 0, device.daemon.text()[-3000:]
    answered = len(device.states())
    device.start()
    wait_until(lambda: len(device.states()) > answered, 30, "the state answered at start")
    again = device.states()[-1]
    assert (again["request_id"], again["phase"], again["reason"]) == (
        final["request_id"],
        "rolled_back",
        final["reason"],
    )


@pytest.mark.parametrize("phase", ["downloading", "probation"])
def test_sigkill_mid_update_restarts_on_the_last_active_model(
    signed_bottle_bundle: SignedBundle, line: LineVideo, v2: Path, tmp_path: Path, phase: str
) -> None:
    b = signed_bottle_bundle
    old_sha = verify_bundle_details(b.path, [b.public_key]).manifest_sha256
    tar, sha = tar_of(v2, tmp_path / "v2.tar")
    version = parse_manifest((v2 / "manifest.json").read_bytes()).model["version"]
    server = StallingServer(tar.read_bytes(), 1000)
    with Broker(tmp_path / "broker") as broker:
        device = Device(tmp_path, b, line, broker, probation_s=60.0, stall_timeout_s=30.0)
        try:
            url = f"{server.url}/bundle.tar" if phase == "downloading" else tar.as_uri()
            rid = device.push(url, sha, version)
            wait_until(lambda: any(s["phase"] == phase for s in device.states(rid)), 30, f"phase {phase}")
            device.daemon.kill()
            device.start()
            final = device.final(rid)
            assert final["phase"] == ("refused" if phase == "downloading" else "rolled_back"), final
            assert "restart" in final["reason"] and final["model"]["sha"] == old_sha
            device.keeps_scoring()
        finally:
            server.stop()
            device.close()


def test_edge_deploy_push_to_the_real_daemon(
    device: Device, v2: Path, tmp_path: Path, signed_bottle_bundle: SignedBundle
) -> None:
    """`edge-deploy push --wait` serves the bundle over HTTP and follows the real daemon to active."""
    from deploy.push import BrokerSettings, push

    tar, _ = tar_of(v2, tmp_path / "v2.tar")
    report = push(
        tar,
        [DEVICE],
        BrokerSettings("127.0.0.1", device.broker.port),
        wait=True,
        timeout=90,
        serve="127.0.0.1:0",
        trusted=[signed_bottle_bundle.public_key],
    )
    result = report.devices[0]
    assert report.exit_code == 0 and result.outcome == "active", report.to_json()
    assert [p for p in dict.fromkeys(result.phases)][-2:] == ["probation", "active"]
    assert sum(report.bytes_served.values()) >= tar.stat().st_size  # the device downloaded it from the pusher
    device.keeps_scoring()


def test_a_damaged_active_update_falls_back_to_the_previous_model(
    device: Device, v2: Path, v3: Path, v4: Path, tmp_path: Path, signed_bottle_bundle: SignedBundle
) -> None:
    """A file of the active update that no longer matches its hash (flash wear, a hand edit) must not keep the daemon
    from starting: it starts on the previous model kept for rollback (the newest that still verifies) and says why
    on the retained model state."""
    b = signed_bottle_bundle
    old_sha = verify_bundle_details(b.path, [b.public_key]).manifest_sha256
    versions: dict[Path, str] = {}
    for bundle in (v2, v3):
        tar, sha = tar_of(bundle, tmp_path / f"{bundle.parent.name}.tar")
        versions[bundle] = parse_manifest((bundle / "manifest.json").read_bytes()).model["version"]
        assert device.final(device.push(tar.as_uri(), sha, versions[bundle]))["phase"] == "active"
    assert device.daemon.terminate(30) == 0
    state = json.loads((tmp_path / "state" / "updates" / "state.json").read_text())
    active, previous = Path(state["active"]["path"]), Path(state["history"][0]["path"])
    v3_sha, v2_sha = state["active"]["sha"], state["history"][0]["sha"]
    (active / "model.onnx").write_bytes(b"")
    device.start()
    wait_until(lambda: device.states()[-1]["phase"] == "rolled_back", 30, "the fallback's model state")
    state = device.states()[-1]
    assert state["model"]["sha"] == v2_sha and state["request_id"] is None, state
    assert f"{versions[v3]} (sha {v3_sha[:12]}) cannot serve" in state["reason"], state
    assert "model.onnx" in state["reason"], state
    assert state["reason"].endswith(f"back on the previous model {versions[v2]} (sha {v2_sha[:12]})"), state
    device.keeps_scoring()
    # the previous model damaged too: the one before it (here the config's bundle, unpacked), and both reasons
    assert device.daemon.terminate(30) == 0
    (previous / "model.onnx").write_bytes(b"")
    device.start()
    both = f"the previous model {versions[v2]} (sha {v2_sha[:12]}) cannot serve"
    wait_until(lambda: both in device.states()[-1]["reason"], 30, "the second fallback")
    state = device.states()[-1]
    assert state["phase"] == "rolled_back" and state["model"]["sha"] == old_sha, state
    assert f"(sha {v3_sha[:12]}) cannot serve" in state["reason"], state
    assert state["reason"].endswith(f"(sha {old_sha[:12]})"), state
    device.keeps_scoring()
    # the next start does the same (the update stays recorded as active until a new one replaces it)
    assert device.daemon.terminate(30) == 0
    device.start()
    wait_until(lambda: device.daemon.text().count(both) == 2, 30, "the third fallback")
    device.keeps_scoring()
    # a new update replaces it, and the damaged active folder is deleted with it
    v4_tar, v4_sha = tar_of(v4, tmp_path / "v4.tar")
    v4_version = parse_manifest((v4 / "manifest.json").read_bytes()).model["version"]
    assert device.final(device.push(v4_tar.as_uri(), v4_sha, v4_version))["phase"] == "active"
    assert not active.exists()
    device.keeps_scoring()


def test_unpacked_config_bundles_are_deleted_once_nothing_needs_them(
    signed_bottle_bundle: SignedBundle, line: LineVideo, v2: Path, v3: Path, tmp_path: Path
) -> None:
    """The config names a tar: it is unpacked under <state_dir>/bundles/<sha>. A new tar in the config leaves the old
    copy with nothing to serve, and it is deleted at the next start; a copy kept for rollback stays."""
    b = signed_bottle_bundle
    v1_tar, _ = tar_of(b.path, tmp_path / "v1.tar")
    v2_tar, _ = tar_of(v2, tmp_path / "v2.tar")
    copies = tmp_path / "state" / "bundles"
    with Broker(tmp_path / "broker") as broker:
        device = Device(tmp_path, SignedBundle(v1_tar, b.public_key, b.private_key), line, broker)
        try:
            v1_sha = verify_bundle_details(b.path, [b.public_key]).manifest_sha256
            assert [p.name for p in copies.iterdir()] == [v1_sha]
            assert device.daemon.terminate(30) == 0
            # the operator installs v2 as the config's bundle
            config = json.loads(device.config.read_text())
            device.config.write_text(json.dumps({**config, "bundle": str(v2_tar)}))
            device.start()
            v2_sha = verify_bundle_details(v2, [b.public_key]).manifest_sha256
            wait_until(lambda: [p.name for p in copies.iterdir()] == [v2_sha], 30, f"{v1_sha[:12]}'s copy deleted")
            # an update: the config's copy is the previous model now, kept for model/rollback
            v3_tar, v3_sha = tar_of(v3, tmp_path / "v3.tar")
            version = parse_manifest((v3 / "manifest.json").read_bytes()).model["version"]
            assert device.final(device.push(v3_tar.as_uri(), v3_sha, version))["phase"] == "active"
            assert device.daemon.terminate(30) == 0
            device.start()
            device.keeps_scoring()
            assert [p.name for p in copies.iterdir()] == [v2_sha]
        finally:
            device.close()


def test_a_bundle_installed_by_hand_in_the_config_replaces_the_active_update(
    device: Device, v2: Path, v3: Path, tmp_path: Path, signed_bottle_bundle: SignedBundle
) -> None:
    """The config is the operator's word: a technician who puts another bundle in it and restarts gets that bundle,
    not the update pushed earlier; the update is kept for model/rollback. An unchanged config changes nothing."""
    key = signed_bottle_bundle.public_key
    v2_sha, v3_sha = (verify_bundle_details(v, [key]).manifest_sha256 for v in (v2, v3))
    tar, sha = tar_of(v2, tmp_path / "v2.tar")
    version = parse_manifest((v2 / "manifest.json").read_bytes()).model["version"]
    assert device.final(device.push(tar.as_uri(), sha, version))["phase"] == "active"
    assert device.daemon.terminate(30) == 0
    config = json.loads(device.config.read_text())
    device.config.write_text(json.dumps({**config, "bundle": str(v3)}))
    device.start()
    wait_until(lambda: "the config's bundle changed" in (device.states()[-1]["reason"] or ""), 30, "the new state")
    state = device.states()[-1]
    assert state["phase"] == "active" and state["model"]["sha"] == v3_sha, state
    assert f"the update {version} (sha {v2_sha[:12]})" in state["reason"], state
    device.keeps_scoring()
    # the pushed update is one rollback away
    publish(device.broker.port, f"{PREFIX}/model/rollback", b'{"request_id": "rb-hand"}')
    rolled = device.final("rb-hand")
    assert rolled["phase"] == "rolled_back" and rolled["model"]["sha"] == v2_sha, rolled
    # and with the config unchanged since, a restart stays on it
    assert device.daemon.terminate(30) == 0
    device.start()
    wait_until(lambda: device.daemon.text().count("ready:") == 3, 30, "the restarted daemon")
    assert f"sha {v2_sha[:12]}" in device.daemon.text().rsplit("final: ", 1)[1]
    assert device.daemon.text().count("the config's bundle changed") == 1


def test_the_start_fallback_chain_tries_each_model_once_and_ends(
    signed_bottle_bundle: SignedBundle, tmp_path: Path
) -> None:
    """startup_refused walks active -> history (newest first, skipping folders gone) -> the config's bundle, and
    returns None rather than loop when the config's bundle (a folder in the history) was already tried."""
    from edge_daemon.config import load_config
    from edge_daemon.updater import Updater

    config_path = write_config(
        tmp_path, signed_bottle_bundle.path, signed_bottle_bundle.public_key, 1883, [{"id": "cam0", "source": "x.avi"}]
    )
    config = load_config(config_path)
    folders = {name: tmp_path / name for name in ("v4", "v3", "v2")}
    for name in ("v4", "v2"):  # v3 is gone from disk
        folders[name].mkdir()
    entry = lambda name, path: {"path": str(path), "sha": name * 16, "version": name}  # noqa: E731
    state = {
        "active": entry("v4", folders["v4"]),
        "history": [entry("v3", folders["v3"]), entry("v2", folders["v2"]), entry("v1", config.bundle)],
        "config_sha": None,
    }
    (tmp_path / "state" / "updates").mkdir(parents=True)
    (tmp_path / "state" / "updates" / "state.json").write_text(json.dumps(state))
    updater = Updater(config, host=None)  # type: ignore[arg-type]  # start-up never calls the host
    first = updater.startup_bundle()
    assert first == folders["v4"]
    second = updater.startup_refused(first, "model.onnx was changed")
    assert second == folders["v2"]  # v3 is skipped: gone
    third = updater.startup_refused(second, "signature no longer trusted")
    assert third == config.bundle  # the config's bundle, reached as the history's last model
    assert updater.startup_refused(third, "it fails too") is None  # tried once: the chain ends
    reason = updater.state["last"]["reason"]
    assert reason.startswith("the active update v4") and "the previous model v2" in reason, reason
    assert reason.endswith(f"back on the previous model v1 (sha {'v1' * 6})"), reason


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "Expecting property name"),
        ('["a list"]', "not a JSON object"),
        ('{"active": "v9", "history": []}', "its active update has no path"),
        ('{"active": null, "history": [{"version": "v2"}]}', "its history entry has no path"),
        ('{"active": null, "history": "v2"}', "its history is not a list"),
        ('{"active": null, "history": [], "last": "rolled_back"}', "its last outcome has no phase"),
    ],
)
def test_an_unusable_state_file_is_set_aside_and_the_config_bundle_serves(
    signed_bottle_bundle: SignedBundle, tmp_path: Path, content: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A state file edited by hand (or by a tool) into something start-up cannot use is kept aside as evidence and
    the daemon starts on the config's bundle, instead of dying on a missing key; doctor says the same."""
    from edge_daemon.config import load_config
    from edge_daemon.doctor import check_update_state
    from edge_daemon.updater import Updater

    config_path = write_config(
        tmp_path, signed_bottle_bundle.path, signed_bottle_bundle.public_key, 1883, [{"id": "cam0", "source": "x.avi"}]
    )
    config = load_config(config_path)
    state_file = tmp_path / "state" / "updates" / "state.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_text(content)
    check = check_update_state(config)
    assert check.level == "warn" and why in check.detail and "set aside at start" in check.detail, check
    updater = Updater(config, host=None)  # type: ignore[arg-type]  # start-up never calls the host
    assert updater.startup_bundle() == Path(config.bundle)
    assert [p.read_text() for p in state_file.parent.glob("state.bad-*")] == [content]
    assert why in caplog.text


def test_the_probation_tick_never_waits_for_the_updater(signed_bottle_bundle: SignedBundle, tmp_path: Path) -> None:
    """The housekeeping thread ticks probation and feeds the systemd watchdog: while the updater thread holds its lock
    (a model/rollback loads and gates the previous model under it) a tick is skipped, not waited for, or a slow
    gate would starve the watchdog and get the daemon killed."""
    from edge_daemon.config import load_config
    from edge_daemon.updater import Updater

    config_path = write_config(
        tmp_path, signed_bottle_bundle.path, signed_bottle_bundle.public_key, 1883, [{"id": "cam0", "source": "x.avi"}]
    )
    updater = Updater(load_config(config_path), host=None)  # type: ignore[arg-type]  # no probation: no host call
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with updater._lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert held.wait(10)
        ticker = threading.Thread(target=updater.tick)
        ticker.start()
        ticker.join(20)  # a deadlock check, not a timing: the tick returns at once, or never while the lock is held
        assert not ticker.is_alive(), "the tick waited for the updater's lock"
    finally:
        release.set()
        holder.join()
    updater.tick()  # and with the lock free it runs (nothing on probation: nothing to do)
