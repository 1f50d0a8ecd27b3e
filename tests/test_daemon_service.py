"""The daemon as a service: sd_notify, SIGTERM, SIGHUP, MQTT commands, /healthz and /metrics, refused bundles,
a camera that vanishes and comes back. Real process, real mosquitto, real signed bundle, real photographs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import SignedBundle
from tests.daemon_helpers import PREFIX, Daemon, LineVideo, make_line_video, wait_until, write_config
from tests.mqtt_broker import Broker, Subscriber, free_port, publish
from tests.test_capture import MjpegServer, jpeg


@pytest.fixture(scope="module")
def line(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> LineVideo:
    out = tmp_path_factory.mktemp("line") / "line.avi"
    return make_line_video(shared_data / "mvtec_bottle", out, hold=4, fps=25.0, limit=12)


def looping(line: LineVideo) -> dict[str, object]:
    """A camera that plays the line video forever at its frame rate, like a live camera."""
    return {"id": "cam0", "source": str(line.video), "roi": list(line.roi), "loop": True, "realtime": True}


def last_json(sub: Subscriber, topic: str) -> dict[str, object]:
    msgs = sub.on(topic)
    assert msgs, f"nothing on {topic}"
    return json.loads(msgs[-1].payload)


def test_notify_watchdog_and_sigterm(signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path) -> None:
    """READY=1 after start-up, WATCHDOG=1 while scoring, STOPPING=1 on SIGTERM, exit 0, retained status stopped."""
    b = signed_bottle_bundle
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(30)
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/#") as sub:
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [looping(line)])
        daemon = Daemon(config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
        seen: list[str] = []
        while sum(m.startswith("WATCHDOG=1") for m in seen) < 2:
            seen.append(notify.recv(4096).decode())
        assert seen[0].startswith("READY=1") and "STATUS=scoring 1 camera(s)" in seen[0]
        assert daemon.terminate(30) == 0, daemon.text()[-3000:]
        while not any(m.startswith("STOPPING=1") for m in seen):
            seen.append(notify.recv(4096).decode())
        sub.wait_for(
            lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms), 10, "status stopped"
        )
    notify.close()


def test_commands_health_metrics_and_reload(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    b = signed_bottle_bundle
    port = free_port()
    state = f"{PREFIX}/cam0/threshold/state"
    with Broker(tmp_path / "broker") as broker:
        # a stale retained command must not re-apply itself at start-up
        publish(broker.port, f"{PREFIX}/cam0/threshold/set", b'{"threshold": 0.9, "request_id": "stale"}', retain=True)
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            config = write_config(
                tmp_path, b.path, b.public_key, broker.port, [looping(line)], http={"bind": f"127.0.0.1:{port}"}
            )
            daemon = Daemon(config)
            sub.wait_for(lambda ms: any(m.topic == state for m in ms), 30, "the retained threshold state")
            wait_until(lambda: _get(port, "/healthz")[0] == 200, 30, "/healthz 200")
            first = last_json(sub, state)
            assert first["threshold"] == 0.5 and first["source"] == "bundle" and first["request_id"] is None

            def answer(request_id: str) -> dict[str, object]:
                sub.wait_for(
                    lambda ms: any(m.topic == state and request_id.encode() in m.payload for m in ms),
                    20,
                    f"the answer to {request_id}",
                )
                return last_json(sub, state)

            publish(broker.port, f"{PREFIX}/cam0/threshold/set", b'{"threshold": 0.7, "request_id": "r1"}')
            assert answer("r1") == {
                "request_id": "r1",
                "ok": True,
                "reason": None,
                "threshold": 0.7,
                "source": "command",
            }
            for rid, payload, reason in [
                ("r2", b'{"threshold": 1.5, "request_id": "r2"}', "threshold: Input should be less than 1"),
                ("r3", b'{"threshold": 0.6, "request_id": "r3", "extra": 1}', "extra: unknown key"),
                ("r4", b'{"request_id": "r4", "threshold": "high"}', "threshold: Input should be a valid number"),
            ]:
                publish(broker.port, f"{PREFIX}/cam0/threshold/set", payload)
                got = answer(rid)
                assert got["ok"] is False and reason in str(got["reason"]), got
                assert got["threshold"] == 0.7  # unchanged
            publish(broker.port, f"{PREFIX}/cam0/threshold/set", b"\xff\xfe not json")
            sub.wait_for(lambda ms: any(m.topic == state and b"not UTF-8" in m.payload for m in ms), 20, "non-UTF-8")
            publish(broker.port, f"{PREFIX}/nocam/threshold/set", b'{"threshold": 0.6, "request_id": "r5"}')
            sub.wait_for(lambda ms: any(b"r5" in m.payload and b"no camera" in m.payload for m in ms), 20, "no camera")
            publish(
                broker.port,
                f"{PREFIX}/model/set",
                b'{"request_id": "m1", "url": "file:///x", "sha256": "00", "version": "2"}',
            )
            sub.wait_for(
                lambda ms: any(m.topic == f"{PREFIX}/model/state" and b"m1" in m.payload for m in ms),
                20,
                "model/state answer",
            )
            assert last_json(sub, f"{PREFIX}/model/state")["phase"] == "refused"
            assert not any(b"stale" in m.payload for m in sub.on(state)), "the retained command was applied"

            code, body = _get(port, "/healthz")
            assert code == 200 and json.loads(body)["status"] in ("ok", "degraded")
            code, metrics = _get(port, "/metrics")
            assert code == 200 and 'edge_frames_scored_total{camera="cam0"}' in metrics.decode()
            assert "edge_mqtt_connected 1.0" in metrics.decode()
            sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/stats" for m in ms), 20, "stats")
            stats = last_json(sub, f"{PREFIX}/stats")
            assert stats["cameras"]["cam0"]["frames_scored"] > 0  # type: ignore[index]

            # SIGHUP: a config with a new threshold; the command's threshold stays (an operator set it on purpose)
            config.write_text(config.read_text().replace('"loop": true', '"loop": true, "threshold": 0.65'))
            daemon.proc.send_signal(1)
            wait_until(lambda: "config reloaded" in daemon.text(), 20, "the reload")
            assert daemon.alive()
            publish(broker.port, f"{PREFIX}/cam0/threshold/set", b'{"threshold": null, "request_id": "r6"}')
            assert answer("r6")["threshold"] == 0.65 and last_json(sub, state)["source"] == "config"
            # an events change needs a restart: said at every reload until then (the second one forgot it)
            config.write_text(
                config.read_text().replace('"drain_timeout_s": 5', '"drain_timeout_s": 5, "events": {"open_frames": 5}')
            )
            for reloads in (2, 3):
                daemon.proc.send_signal(1)
                wait_until(lambda n=reloads: daemon.text().count("config reloaded") == n, 20, f"reload {reloads}")
            assert daemon.text().count("a restart is needed for: events") == 2, daemon.text()[-3000:]
            # a broken config on SIGHUP is refused and the daemon keeps running
            config.write_text("device_id: [\n")
            daemon.proc.send_signal(1)
            wait_until(lambda: "config not reloaded" in daemon.text(), 20, "the refused reload")
            assert daemon.alive()
            assert daemon.terminate(30) == 0, daemon.text()[-3000:]


def test_health_fails_while_no_frame_can_be_scored_and_an_ended_worker_is_no_stall(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    """cam0's ROI lies outside its frames (a camera swapped for one of lower resolution): every frame arrives and
    none is scored, so /healthz fails and names it. cam1, a file on the second worker, ends after about 2 s:
    that worker stops beating, which is no stall, so the watchdog is still fed and /healthz does not call the
    scoring loop stuck."""
    b = signed_bottle_bundle
    port = free_port()
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(5)
    cams = [
        {**looping(line), "roi": [5000, 5000, 64, 64]},
        {"id": "cam1", "source": str(line.video), "roi": list(line.roi), "loop": False, "realtime": True},
    ]
    with Broker(tmp_path / "broker") as broker:
        config = write_config(
            tmp_path, b.path, b.public_key, broker.port, cams, workers=2, http={"bind": f"127.0.0.1:{port}"}
        )
        daemon = Daemon(config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
        wait_until(lambda: _get(port, "/healthz")[0] == 503 and b"cam0" in _get(port, "/healthz")[1], 60, "503")
        code, body = _get(port, "/healthz")
        problems = json.loads(body)["problems"]
        assert any(p.startswith("camera cam0: no frame scored for ") and "lies outside the" in p for p in problems), (
            problems
        )
        assert not any("no progress" in p for p in problems), problems  # cam1's worker ended: not a stall
        with Subscriber(broker.port, [f"{PREFIX}/cam0/status"]) as sub:  # the plant's side is told too, retained
            status = sub.wait_for(lambda ms: bool(ms), 10, "cam0's retained status")[-1]
        assert json.loads(status.payload)["state"] == "degraded", status.payload
        assert json.loads(status.payload)["reason"] == "roi", status.payload
        assert "lies outside the" in json.loads(status.payload)["detail"], status.payload
        assert "on 2 worker(s)" in daemon.text() and daemon.alive()
        # said once in the log (per frame size), counted on /metrics
        warning = "camera cam0: roi (5000, 5000, 64, 64) lies outside the"
        assert daemon.text().count(warning) == 1, daemon.text()[-3000:]
        metrics = _get(port, "/metrics")[1].decode()
        roi_errors = re.search(r'^edge_roi_errors_total\{camera="cam0"\} (\S+)$', metrics, re.MULTILINE)
        assert roi_errors is not None and float(roi_errors.group(1)) > 0, metrics
        notify.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            while True:  # skip what was sent until now: the watchdog must still be fed after cam1 ended
                notify.recv(4096)
        notify.settimeout(5)
        assert notify.recv(4096).decode().startswith("WATCHDOG=1")
        assert daemon.terminate(30) == 0, daemon.text()[-3000:]
    notify.close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


@pytest.mark.parametrize("case", ["untrusted", "unsigned", "tampered"])
def test_refused_bundles_exit_2_with_the_reason(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path, case: str
) -> None:
    import shutil

    from deploy.signing import generate_keypair

    b = signed_bottle_bundle
    bundle, trusted = tmp_path / "bundle", b.public_key
    shutil.copytree(b.path, bundle)
    if case == "untrusted":
        trusted = generate_keypair(tmp_path / "other")[1]
        expected = "signed by an untrusted key"
    elif case == "unsigned":
        (bundle / "signature").unlink()
        expected = "signature"
    else:
        with open(bundle / "model.onnx", "ab") as f:
            f.write(b"\0")
        expected = "model.onnx"
    config = write_config(tmp_path, bundle, trusted, free_port(), [looping(line)])
    daemon = Daemon(config)
    assert daemon.wait(60) == 2
    text = daemon.text()
    assert "refused" in text and expected in text and "Traceback" not in text, text[-2000:]


def test_camera_that_vanishes_and_comes_back(
    signed_bottle_bundle: SignedBundle, shared_data: Path, tmp_path: Path
) -> None:
    """An HTTP MJPEG camera on loopback stops and restarts: status offline (reason), then online, scoring resumes."""
    b = signed_bottle_bundle
    photos = sorted((shared_data / "mvtec_bottle" / "test" / "good").glob("*.png"))[:4]
    server = MjpegServer([jpeg(cv2.imread(str(p))) for p in photos], fps=15)
    server.start()
    status_topic = f"{PREFIX}/cam1/status"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/#") as sub:
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [{"id": "cam1", "source": server.url}])
        daemon = Daemon(config)
        try:

            def states() -> list[str]:
                return [json.loads(m.payload)["state"] for m in sub.on(status_topic)]

            wait_until(lambda: "online" in states(), 30, "camera online")
            server.stop()
            wait_until(lambda: "offline" in states(), 30, "camera offline")
            offline = [json.loads(m.payload) for m in sub.on(status_topic)][-1]
            assert offline["reason"] in ("read_failed", "open_failed", "no_frames") and offline["detail"]
            server.start()  # same port
            wait_until(lambda: states()[-1] == "online", 60, "camera online again")
            sub.wait_for(lambda ms: any(m.topic == f"{PREFIX}/stats" for m in ms), 20, "stats")
            scored = last_json(sub, f"{PREFIX}/stats")["cameras"]["cam1"]["frames_scored"]  # type: ignore[index]
            wait_until(
                lambda: last_json(sub, f"{PREFIX}/stats")["cameras"]["cam1"]["frames_scored"] > scored,  # type: ignore[index]
                30,
                "scoring to resume",
            )
            assert daemon.alive()
        finally:
            assert daemon.terminate(30) == 0, daemon.text()[-3000:]
            server.stop()


def test_camera_timeouts_come_from_the_config(signed_bottle_bundle: SignedBundle, tmp_path: Path) -> None:
    """A network camera that accepts the connection and never answers: the daemon gives up each open
    after the camera's ``open_timeout_s`` (1 s here, 10 s by default) and reports it offline saying so."""
    b = signed_bottle_bundle
    status_topic = f"{PREFIX}/mute/status"
    with socket.socket() as listener, Broker(tmp_path / "broker") as broker:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        source = f"http://127.0.0.1:{listener.getsockname()[1]}/video"
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            camera = {"id": "mute", "source": source, "open_timeout_s": 1, "read_timeout_s": 2}
            config = write_config(tmp_path, b.path, b.public_key, broker.port, [camera])
            daemon = Daemon(config)
            try:
                sub.wait_for(lambda ms: any(m.topic == status_topic for m in ms), 30, "the camera's status")

                def offline() -> list[dict[str, object]]:
                    payloads = [json.loads(m.payload) for m in sub.on(status_topic)]
                    return [p for p in payloads if p["state"] == "offline"]

                wait_until(lambda: offline(), 30, "camera offline")
                status = offline()[0]
                assert status["reason"] == "open_failed"
                assert "within 1 s" in str(status["detail"]), status
                assert daemon.alive()
            finally:
                assert daemon.terminate(30) == 0, daemon.text()[-3000:]


def test_an_roi_that_does_not_fit_its_frames_is_named() -> None:
    from edge_daemon.pipeline import cut_roi, roi_fit_problem

    frame = np.zeros((288, 320, 3), np.uint8)
    assert roi_fit_problem((10, 20, 100, 50), frame.shape[:2]) is None
    assert roi_fit_problem((200, 200, 256, 256), frame.shape[:2]) == (
        "roi (200, 200, 256, 256) reaches past the 320x288 frame: only its 120x88 part inside is scored"
    )
    assert cut_roi(frame, (200, 200, 256, 256)).shape == (88, 120, 3)
    assert roi_fit_problem((400, 400, 50, 50), frame.shape[:2]) == (
        "roi (400, 400, 50, 50) lies outside the 320x288 frame: none of its frames is scored"
    )


def test_the_health_server_binds_an_ipv6_address() -> None:
    """http.bind "[::1]:PORT" passed check-config and then failed at start: http.server binds IPv4 only."""
    from edge_daemon.http import HealthServer

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = HealthServer("[::1]:0", lambda: {}, lambda: (200, {"ok": True})).start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == {"ok": True}
    finally:
        server.stop()


def test_an_event_whose_frames_stop_being_scored_ends_and_the_camera_says_why(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    """Frames keep coming but none can be scored (here an roi that no longer fits them; a backend that keeps failing
    takes the same path): after ``failing_end_s`` the open event ends with reason "scoring_failed" (it used to stay
    open until scoring came back, for ever if it never did), and the camera is degraded with reason "roi" until the
    roi fits again. A real camera on the line video and a real ONNX Runtime session."""
    import threading

    from edge_daemon.backends.onnxruntime import open_onnxruntime
    from edge_daemon.capture.camera import Camera
    from edge_daemon.events import CropTuning, EventTracker, EventTuning
    from edge_daemon.model import load_bundle
    from edge_daemon.pipeline import CameraLane, Pipeline

    bundle = load_bundle(signed_bottle_bundle.path, [signed_bottle_bundle.public_key], tmp_path / "state")
    ready = threading.Event()
    camera = Camera("cam0", str(line.video), loop=True, realtime=True, roi=line.roi, frame_ready=ready)
    tracker = EventTracker("cam0", "dev", EventTuning(), CropTuning())
    lane = CameraLane(camera, tracker, roi=line.roi, threshold=1e-6)  # every frame is anomalous: an event opens
    sent: list[dict[str, object]] = []
    backend = open_onnxruntime(bundle, max_batch=1, cache_dir=None)
    pipeline = Pipeline(
        [lane],
        backend,
        bundle,
        lambda m: sent.append(json.loads(m.payload)) if m.kind == "event" else None,
        ready,
        failing_end_s=1.0,
    )
    camera.start()
    try:
        wait_until(lambda: pipeline.step() >= 0 and tracker.is_open, 60, "an event opened")
        event_id = tracker.current_event_id
        lane.roi, lane.roi_checked_for = (5000, 5000, 64, 64), None  # the camera now gives frames the roi misses
        wait_until(lambda: pipeline.step() >= 0 and not tracker.is_open, 30, "the event ended")
        end = [m for m in sent if m["event_id"] == event_id and m["type"] == "end"]
        assert len(end) == 1 and end[0]["reason"] == "scoring_failed", end
        wait_until(lambda: pipeline.step() >= 0 and camera.status.state == "degraded", 10, "camera degraded")
        assert camera.status.reason == "roi" and "lies outside the" in str(camera.status.detail)
        lane.roi, lane.roi_checked_for = line.roi, None  # fixed: scored again, online again
        wait_until(lambda: pipeline.step() >= 0 and camera.status.state == "online", 10, "camera online")
        assert lane.roi_errors > 0 and lane.frames_failed == 0
        # The backend now fails (ONNX Runtime itself, refusing inputs one pixel short): each frame of each failed
        # batch is counted for its camera (only the batches were counted, not whose frames they were).
        ort = pipeline.backend
        pipeline.backend = dataclasses.replace(ort, run=lambda x: ort.run(np.ascontiguousarray(x[..., :-1])))
        wait_until(lambda: pipeline.step() >= 0 and lane.frames_failed >= 3, 10, "failed batches")
        assert pipeline.backend_errors == lane.frames_failed  # max_batch 1: one frame per batch
        assert "onnxruntime" in str(pipeline.last_error)
    finally:
        camera.stop()


def test_failing_time_runs_from_the_first_failure_not_the_last_success(line: LineVideo) -> None:
    """A source that pauses (a paced file, a stalled pipeline thread) and then fails one batch has not been failing for
    the whole pause: counting from the last success ended its open event ('scoring_failed') after a single failure."""
    from edge_daemon.capture.camera import Camera
    from edge_daemon.events import CropTuning, EventTracker, EventTuning
    from edge_daemon.pipeline import CameraLane

    lane = CameraLane(Camera("cam0", str(line.video)), EventTracker("cam0", "dev", EventTuning(), CropTuning()))
    lane.last_scored = 100.0
    assert lane.failing_for(130.0) is None
    lane.note_failure(130.0, "backend: RuntimeError")  # 30 s after the last frame scored: the first failure
    assert lane.failing_for(130.5) == 0.5
    lane.note_failure(135.0, "backend: RuntimeError")
    assert lane.failing_for(141.0) == 11.0 and lane.failure == "backend: RuntimeError"
    lane.last_scored = 142.0  # scored again: not failing; the next failure starts a new count
    assert lane.failing_for(143.0) is None
    lane.note_failure(150.0, "roi")
    assert lane.failing_for(151.0) == 1.0
