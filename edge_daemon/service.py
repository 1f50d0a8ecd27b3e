"""The daemon as a service: start-up order, MQTT commands, housekeeping, signals, shutdown.

Start-up: verify the bundle -> choose and gate a backend -> open the spool and the MQTT link -> start the cameras
-> HTTP -> READY=1 -> the pipeline loop (edge_daemon.pipeline) on the main thread. A housekeeping thread feeds
the systemd watchdog (only while the scoring loop makes progress), publishes stats, swaps in a TensorRT engine
once its background build passed the gate, and applies a SIGHUP reload. SIGTERM/SIGINT: STOPPING=1, open events
end with reason "shutdown", and the outbox is flushed to the broker for at most ``drain_timeout_s``; whatever is
left stays in the spool for the next start (nothing is lost).

Exit codes (DESIGN.md): 0 stopped or every file source ended; 1 the work failed (no backend passed the gate);
2 bad input (bundle refused, spool unusable); 3 a capability is missing (backend tensorrt without TensorRT).
"""

from __future__ import annotations

import json
import logging
import platform
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from deploy.engines import probe_device
from deploy.manifest import BundleError
from edge_daemon import __version__
from edge_daemon.backends import (
    Backend,
    BackendError,
    BackendUnavailable,
    EngineBuild,
    another_backend,
    select_backend,
)
from edge_daemon.backends import finish_build as finish_engine_build
from edge_daemon.capture.camera import Camera, CameraStatus, stop_cameras
from edge_daemon.commands import CommandError, ThresholdSet, parse_command, request_id_of
from edge_daemon.config import ConfigError, DaemonConfig, load_config, writable_folder_problem
from edge_daemon.events import CropTuning, EventTracker, EventTuning, Outgoing
from edge_daemon.http import HealthServer
from edge_daemon.model import LoadedBundle, load_bundle
from edge_daemon.mqtt import MqttLink, MqttSettings
from edge_daemon.notify import Notifier
from edge_daemon.open_events import OpenEventLog
from edge_daemon.pipeline import DEFAULT_THRESHOLD, FAILING_S, CameraLane, Pipeline, PipelinePool, percentile_ms
from edge_daemon.spool import Spool
from edge_daemon.updater import Probe, Updater

log = logging.getLogger("edge_daemon")
COMMAND_TOPICS = ("+/threshold/set", "model/set", "model/rollback")
# Config keys a SIGHUP applies: read afresh where they are used (the cameras' thresholds are applied by _reload;
# the rest of cameras, events and crop are compared apart). Any other key that changed needs a restart, and says so.
RELOADABLE_KEYS = frozenset(
    {"cameras", "events", "crop", "stats_interval_s", "drain_timeout_s", "updates", "allow_downgrade"}
)
STALL_S = 10.0  # no loop progress for this long: /healthz says failing and the watchdog is no longer fed


class StartupError(Exception):
    """The daemon cannot start; ``code`` is the exit code (DESIGN.md)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


def mqtt_settings(config: DaemonConfig) -> MqttSettings:
    """The MQTT link's settings from the daemon config."""
    m = config.mqtt
    return MqttSettings(
        host=m.host,
        port=m.port,
        topic_prefix=m.topic_prefix,
        device_id=config.device_id,
        client_id=m.client_id,
        keepalive=m.keepalive,
        username=m.username,
        password=config.mqtt_password(),
        tls_ca=m.tls.ca if m.tls else None,
        tls_cert=m.tls.cert if m.tls else None,
        tls_key=m.tls.key if m.tls else None,
        tls_insecure=m.tls.insecure if m.tls else False,
        protocol=m.protocol,
    )


def event_tuning(config: DaemonConfig) -> tuple[EventTuning, CropTuning]:
    e, c = config.events, config.crop
    return (
        EventTuning(e.open_frames, e.close_frames, e.max_seconds, e.min_gap_s, e.update_interval_s),
        CropTuning(c.padding, c.max_side, c.jpeg_quality, c.min_side),
    )


class Daemon:
    """One daemon process. ``run()`` blocks until stopped and returns the exit code."""

    def __init__(self, config: DaemonConfig, config_path: Path | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.workers = max(1, min(config.workers, len(config.cameras)))
        self.frame_events = [threading.Event() for _ in range(self.workers)]  # one per scoring worker
        self.started = time.time()
        self.bundle: LoadedBundle | None = None
        self.build: EngineBuild | None = None
        self.pipeline: PipelinePool | None = None
        self.link: MqttLink | None = None
        self.spool: Spool | None = None
        self.open_events: OpenEventLog | None = None
        self.cameras: dict[str, Camera] = {}
        self.http: HealthServer | None = None
        self.updater: Updater | None = None
        self._prev_scored: dict[str, tuple[float, int]] = {}
        self._fps_scored: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- start-up

    def _start_model(self, path: Path) -> tuple[LoadedBundle, Backend]:
        cfg = self.config
        try:
            bundle = load_bundle(path, cfg.trusted_keys, cfg.state_dir, allow_unsigned=cfg.allow_unsigned)
        except BundleError as exc:
            # A damaged active update must not keep the line dark: start on the config's bundle instead.
            fallback = self.updater.startup_refused(path, str(exc)) if self.updater is not None else None
            if fallback is None:
                raise StartupError(f"bundle {path} refused: {exc}", 2) from None
            return self._start_model(fallback)
        try:
            backend, self.build = select_backend(
                bundle,
                cfg.backend,
                max_batch=cfg.max_batch,
                cache_dir=cfg.state_dir / "engines",
                precision=cfg.tensorrt_precision,
                build_time_limit_s=cfg.engine_build_timeout_s,
            )
        except BackendUnavailable as exc:
            raise StartupError(str(exc), 3) from None
        except BackendError as exc:
            raise StartupError(str(exc), 1) from None
        log.info(
            "model %s %s (sha %s) on %s: %s; preprocessing: %s",
            bundle.name,
            bundle.version,
            bundle.sha[:12],
            backend.kind,
            backend.parity,
            backend.preprocessing,
        )
        return bundle, backend

    def _check_before_start(self) -> None:
        """What no retry can fix, refused before anything starts: a camera this OpenCV cannot open at all (exit 3, a
        capability missing) and a state folder that cannot be written (exit 2)."""
        from edge_daemon.capture.sources import missing_capability, parse_source

        for cam in self.config.cameras:
            missing = missing_capability(parse_source(cam.source))
            if missing is not None:
                raise StartupError(f"camera {cam.id}: {missing}", 3)
        problem = writable_folder_problem(self.config.state_dir)
        if problem is not None:
            raise StartupError(f"state_dir {problem}", 2)

    def _start_link(self) -> MqttLink:
        cfg = self.config
        try:
            self.spool = Spool(cfg.spool.path, int(cfg.spool.max_mb * 1024 * 1024), synchronous=cfg.spool.synchronous)
        except Exception as exc:
            raise StartupError(f"spool {cfg.spool.path} cannot be used: {exc}", 2) from None
        try:
            settings = mqtt_settings(cfg)
        except (OSError, ValueError) as exc:  # the password file went away since the config was checked
            raise StartupError(f"mqtt.password_file {cfg.mqtt.password_file}: {exc}", 2) from None
        return MqttLink(settings, self.spool, command_topics=COMMAND_TOPICS, on_command=self._on_command)

    def _start_cameras(self, tuning: EventTuning, crop: CropTuning) -> list[list[CameraLane]]:
        """The cameras' lanes, dealt round-robin to the scoring workers."""
        lanes: list[list[CameraLane]] = [[] for _ in range(self.workers)]
        for i, cam in enumerate(self.config.cameras):
            camera = Camera(
                cam.id,
                cam.source,
                loop=cam.loop,
                realtime=cam.realtime,
                fps_cap=cam.fps_cap,
                roi=cam.roi,
                expected_fps=cam.expected_fps,
                open_timeout_s=cam.open_timeout_s,
                read_timeout_s=cam.read_timeout_s,
                frame_ready=self.frame_events[i % self.workers],
                on_status=self._on_camera_status,
            )
            self.cameras[cam.id] = camera
            threshold, source = (
                (cam.threshold, "config") if cam.threshold is not None else (DEFAULT_THRESHOLD, "bundle")
            )
            tracker = EventTracker(
                cam.id, self.config.device_id, tuning, crop, topic_prefix=self.config.mqtt.topic_prefix
            )
            lanes[i % self.workers].append(
                CameraLane(camera, tracker, roi=cam.roi, threshold=threshold, threshold_source=source)
            )
        return lanes

    def run(self) -> int:
        """Start everything, score until stopped, shut down. Returns the exit code."""
        try:
            return self._run()
        except StartupError as exc:
            log.error("%s", exc)
            self._teardown()
            return exc.code

    def _run(self) -> int:
        self._install_signals()
        import cv2

        cv2.setNumThreads(1)  # one busy core per scoring worker (DESIGN.md, "Hot-path facts")
        self._check_before_start()
        self.link = self._start_link()
        self.open_events = OpenEventLog(self.config.state_dir)
        for end in self.open_events.ends_after_crash(time.time()):  # spooled now, sent once the link is up
            self._send(end)
        self.updater = Updater(self.config, self)
        self.bundle, backend = self._start_model(self.updater.startup_bundle())
        tuning, crop = event_tuning(self.config)
        groups = self._start_cameras(tuning, crop)
        backends = [backend]
        try:
            for _ in groups[1:]:
                backends.append(another_backend(backend, self.bundle, cache_dir=self.config.state_dir / "engines"))
        except BackendError as exc:
            raise StartupError(f"a second scoring worker cannot get a backend: {exc}", 1) from None
        self.pipeline = PipelinePool(
            [
                Pipeline(group, b, self.bundle, self._send, event)
                for group, b, event in zip(groups, backends, self.frame_events, strict=True)
            ]
        )
        self._publish_retained_states()
        self.updater.start()
        self.link.start()
        for camera in self.cameras.values():
            camera.start()
        if self.config.http.bind:
            try:
                self.http = HealthServer(self.config.http.bind, self.snapshot, self.health).start()
            except OSError as exc:
                raise StartupError(f"http.bind {self.config.http.bind}: {exc}", 2) from None
        housekeeping = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        housekeeping.start()
        self.notifier.ready(f"scoring {len(self.cameras)} camera(s) with {backend.kind}")
        log.info(
            "ready: %d camera(s) on %d worker(s), backend %s, broker %s:%d",
            len(self.cameras),
            self.workers,
            backend.kind,
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        outcome = self.pipeline.run(self.stop_event)
        log.info("pipeline %s; shutting down", outcome)
        self.notifier.stopping("draining events")
        self.stop_event.set()
        # Cameras first, then the frames they left in their slots: every frame read is scored or counted
        # dropped, so the final counts add up (frames_in == frames_scored + frames_dropped).
        stop_cameras(self.cameras.values())
        self.pipeline.drain()
        self.pipeline.close_all("shutdown")
        self._publish_stats()
        self._teardown()
        log.info("final: %s", json.dumps(self.final_counts(), sort_keys=True))
        return 0

    def final_counts(self) -> dict[str, Any]:
        """Per camera: frames captured, dropped, skipped (fps cap) and scored, events opened and closed,
        capture-to-outbox latency percentiles over the last frames, ms (the log's last line).

        After a shutdown, frames_in == frames_scored + frames_dropped + frames_skipped + roi_errors (frames the ROI
        did not fit) + frames_failed (frames of batches the backend failed on)."""
        assert self.pipeline is not None
        out: dict[str, Any] = {}
        for cam_id, lane in self.pipeline.lanes.items():
            cam, ev = lane.camera.stats(), lane.tracker.stats()
            out[cam_id] = {
                "frames_in": cam.get("frames_in"),
                "frames_dropped": cam.get("frames_dropped"),
                "frames_skipped": cam.get("frames_skipped"),
                "frames_scored": lane.scored,
                "roi_errors": lane.roi_errors,
                "frames_failed": lane.frames_failed,
                "events_opened": ev["events_opened"],
                "events_closed": ev["events_closed"],
                "latency_p50_ms": percentile_ms(lane.latencies_s, 50),
                "latency_p99_ms": percentile_ms(lane.latencies_s, 99),
            }
        return out

    def _teardown(self) -> None:
        self.stop_event.set()
        if self.updater is not None:
            self.updater.stop()
        stop_cameras(self.cameras.values())  # again: an error path may reach here with cameras running
        if self.link is not None:
            connected = self.link.connected  # stop() waits for the spool to drain only while connected
            drained = self.link.stop(self.config.drain_timeout_s)
            if not drained and self.spool is not None:
                n, size = self.spool.depth()
                why = (
                    f"the spool did not drain in {self.config.drain_timeout_s:.0f} s"
                    if connected
                    else "not connected to the broker"
                )
                log.warning("%s: %d message(s) (%d bytes) stay in the spool for the next start", why, n, size)
        if self.spool is not None:
            self.spool.close()
        if self.http is not None:
            self.http.stop()

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop_event.set()
            for event in self.frame_events:
                event.set()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reload_requested.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGHUP, reload)

    # ------------------------------------------------------------------------------------- outbox

    def _send(self, message: Outgoing) -> None:
        if self.open_events is None:
            self._to_outbox(message)
        else:
            self.open_events.send_noted(message, self._to_outbox)

    def _to_outbox(self, message: Outgoing) -> None:
        assert self.link is not None
        self.link.send(message.suffix, message.payload, message.kind)

    # ------------------------------------------------------------------------------------- retained states

    def info(self) -> dict[str, Any]:
        from edge_daemon.doctor import runtime_facts

        assert self.bundle is not None and self.pipeline is not None
        return {
            "device_id": self.config.device_id,
            "daemon_version": __version__,
            "started_at": _iso(self.started),
            "host": platform.node(),
            **runtime_facts(),
            "backend": self.pipeline.backend.describe(),
            "model": self.bundle.describe(),
            "config_digest": self.config.digest(),
            "cameras": [c.id for c in self.config.cameras],
        }

    def _publish_retained_states(self) -> None:
        assert self.link is not None and self.pipeline is not None and self.bundle is not None
        self.link.set_retained("info", _json(self.info()))
        for lane in self.pipeline.lanes.values():
            self._threshold_state(lane.camera_id, None, True, None)

    def _on_camera_status(self, camera_id: str, status: CameraStatus) -> None:
        payload = {"state": status.state, "reason": status.reason, "detail": status.detail, "since": _iso(status.since)}
        log.info(
            "camera %s: %s%s", camera_id, status.state, f" ({status.reason}: {status.detail})" if status.reason else ""
        )
        if self.link is not None:
            self.link.set_retained(f"{camera_id}/status", _json(payload))
        for event in self.frame_events:  # let the pipeline close an open event of a lost camera promptly
            event.set()

    def _threshold_state(self, camera_id: str, request_id: str | None, ok: bool, reason: str | None) -> None:
        assert self.link is not None and self.pipeline is not None
        lane = self.pipeline.lanes.get(camera_id)
        body = {
            "request_id": request_id,
            "ok": ok,
            "reason": reason,
            "threshold": lane.threshold if lane else None,
            "source": lane.threshold_source if lane else None,
        }
        if lane is None:  # no retained topic for a camera that does not exist
            self.link.publish_volatile(f"{camera_id}/threshold/state", _json(body))
        else:
            self.link.set_retained(f"{camera_id}/threshold/state", _json(body))

    # ------------------------------------------------------------------------------------- commands

    def _on_command(self, suffix: str, payload: bytes) -> None:
        """Called on the MQTT thread for every non-retained command. Answers every command; never raises."""
        assert self.pipeline is not None and self.link is not None and self.bundle is not None
        parts = suffix.split("/")
        if len(parts) == 3 and parts[1:] == ["threshold", "set"]:
            camera_id = parts[0]
            try:
                cmd = parse_command(ThresholdSet, payload)
            except CommandError as exc:
                log.warning("threshold/set for %s refused: %s", camera_id, exc)
                self._threshold_state(camera_id, request_id_of(payload), False, str(exc))
                return
            if camera_id not in self.pipeline.lanes:
                self._threshold_state(camera_id, cmd.request_id, False, f"no camera {camera_id!r} on this device")
                return
            if cmd.threshold is None:
                configured = self.config.camera(camera_id).threshold
                value, source = (configured, "config") if configured is not None else (DEFAULT_THRESHOLD, "bundle")
            else:
                value, source = cmd.threshold, "command"
            self.pipeline.set_threshold(camera_id, value, source)
            log.info("camera %s threshold %.4f (%s)", camera_id, value, source)
            self._threshold_state(camera_id, cmd.request_id, True, None)
        elif suffix in ("model/set", "model/rollback"):
            assert self.updater is not None
            self.updater.submit(suffix, payload)
        else:
            log.warning("command on unknown topic %s ignored", suffix)

    # ------------------------------------------------------------------------------------- the updater's host

    def serving_bundle(self) -> LoadedBundle:
        if self.bundle is None:
            raise RuntimeError("no bundle loaded yet")
        return self.bundle

    def make_backends(self, bundle: LoadedBundle) -> list[Backend]:
        """Gated backends for ``bundle``, one per scoring worker (BackendError naming the failure)."""
        cfg, cache = self.config, self.config.state_dir / "engines"
        try:
            first, _ = select_backend(
                bundle, cfg.backend, max_batch=cfg.max_batch, cache_dir=cache, precision=cfg.tensorrt_precision
            )
        except BackendUnavailable as exc:
            raise BackendError(str(exc)) from None
        return [first] + [another_backend(first, bundle, cache_dir=cache) for _ in range(self.workers - 1)]

    def switch(self, backends: list[Backend], bundle: LoadedBundle) -> None:
        """Serve ``bundle`` from the next batch on (between two batches; open events end with "model_swap")."""
        assert self.pipeline is not None and self.link is not None
        self.pipeline.request_swap(backends, bundle)
        self.bundle = bundle
        self.link.set_retained("info", _json(self.info()))

    def publish_model_state(self, payload: bytes) -> None:
        if self.link is not None:
            self.link.set_retained("model/state", payload)

    def probe(self) -> Probe:
        assert self.pipeline is not None and self.bundle is not None
        lanes = list(self.pipeline.lanes.values())
        # latency only of the workers that serve the newest model already: a swap is applied between two batches,
        # and each worker's latency window starts afresh then
        serving = [
            lane for p in self.pipeline.pipelines if p.bundle.sha == self.bundle.sha for lane in p.lanes.values()
        ]
        p99s = [v for v in (percentile_ms(lane.latencies_s, 99) for lane in serving) if v is not None]
        return Probe(
            frames=sum(lane.scored for lane in lanes),
            anomalous=sum(lane.anomalous for lane in lanes),
            backend_errors=self.pipeline.backend_errors,
            latency_p99_ms=max(p99s) if p99s else None,
        )

    def engine_build(self, bundle: LoadedBundle) -> str | None:
        """Build the TensorRT engine for ``bundle`` here when TensorRT is in use; None when done or not needed."""
        if self.config.backend == "onnxruntime" or probe_device().missing():
            return None
        build = EngineBuild(
            bundle,
            self.config.state_dir / "engines",
            precision=self.config.tensorrt_precision,
            max_batch=self.config.max_batch,
            time_limit_s=self.config.updates.build_timeout_s,
        ).start()
        while build.poll() == "building":
            time.sleep(0.5)
        return None if build.poll() == "done" else build.error

    # ------------------------------------------------------------------------------------- housekeeping

    def _housekeeping(self) -> None:
        next_stats = time.monotonic() + self.config.stats_interval_s
        watchdog_every = (self.notifier.watchdog_interval_s or 0) / 2
        next_watchdog = time.monotonic()
        while not self.stop_event.wait(0.25):
            now = time.monotonic()
            try:
                if watchdog_every and now >= next_watchdog and self._making_progress(now):
                    self.notifier.watchdog()
                    next_watchdog = now + watchdog_every
                if now >= next_stats:
                    next_stats = now + self.config.stats_interval_s
                    self._publish_stats()
                if self.updater is not None:
                    self.updater.tick()
                if self.build is not None:
                    self._poll_build()
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._reload()
            except Exception:  # housekeeping must keep going; the error is in the log
                log.exception("housekeeping failed")

    def _making_progress(self, now: float) -> bool:
        return self.pipeline is not None and now - self.pipeline.heartbeat < STALL_S

    def _poll_build(self) -> None:
        assert self.build is not None and self.bundle is not None and self.pipeline is not None
        if self.build.poll() == "building":
            return
        backend = finish_engine_build(self.build, self.bundle)
        self.build = None
        if backend is not None:
            cache = self.config.state_dir / "engines"
            try:
                others = [another_backend(backend, self.bundle, cache_dir=cache) for _ in self.pipeline.pipelines[1:]]
            except BackendError as exc:
                log.warning("the TensorRT engine cannot serve every worker (%s); ONNX Runtime keeps serving", exc)
                return
            self.pipeline.request_swap([backend, *others], self.bundle)
            assert self.link is not None
            self.link.set_retained("info", _json(self.info()))

    def _reload(self) -> None:
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, it has problems: %s", "; ".join(exc.problems))
            return
        assert self.pipeline is not None
        for cam in new.cameras:
            lane = self.pipeline.lanes.get(cam.id)
            if lane is not None and lane.threshold_source != "command":
                value, source = (
                    (cam.threshold, "config") if cam.threshold is not None else (DEFAULT_THRESHOLD, "bundle")
                )
                self.pipeline.set_threshold(cam.id, value, source)
                self._threshold_state(cam.id, None, True, None)
        needs_restart = [
            key
            for key in type(new).model_fields
            if key not in RELOADABLE_KEYS and getattr(new, key) != getattr(self.config, key)
        ]
        if [c.model_dump(exclude={"threshold"}) for c in new.cameras] != [
            c.model_dump(exclude={"threshold"}) for c in self.config.cameras
        ]:
            needs_restart.append("cameras")
        needs_restart += [key for key in ("events", "crop") if getattr(new, key) != getattr(self.config, key)]
        # What needs a restart keeps its running value here, so that the next reload still sees it differ.
        self.config = new.model_copy(update={k: getattr(self.config, k) for k in needs_restart})
        if self.updater is not None:
            self.updater.config = self.config  # updates.* and allow_downgrade apply to the next request
        log.info(
            "SIGHUP: config reloaded (thresholds applied)%s",
            f"; a restart is needed for: {', '.join(needs_restart)}" if needs_restart else "",
        )

    # ------------------------------------------------------------------------------------- observability

    def snapshot(self) -> dict[str, Any]:
        """Everything /metrics, /healthz and P/stats report, read without stopping the pipeline."""
        pipeline, link, spool = self.pipeline, self.link, self.spool
        now = time.monotonic()
        cams: dict[str, Any] = {}
        if pipeline is not None:
            for cam_id, lane in pipeline.lanes.items():
                stats = lane.camera.stats()
                prev_t, prev_n = self._prev_scored.get(cam_id, (now, lane.scored))
                latencies = list(lane.latencies_s)
                cams[cam_id] = {
                    **stats,
                    "frames_scored": lane.scored,
                    "fps_scored": self._fps_scored.get(cam_id),
                    "anomalous": lane.anomalous,
                    "roi_errors": lane.roi_errors,
                    "frames_failed": lane.frames_failed,
                    "threshold": lane.threshold,
                    "events_opened": lane.tracker.stats().get("events_opened", 0),
                    "latency_p50_ms": percentile_ms(latencies, 50),
                    "latency_p95_ms": percentile_ms(latencies, 95),
                    "latency_p99_ms": percentile_ms(latencies, 99),
                }
                if now - prev_t >= 1.0:
                    self._fps_scored[cam_id] = (lane.scored - prev_n) / (now - prev_t)
                    self._prev_scored[cam_id] = (now, lane.scored)
                elif cam_id not in self._prev_scored:
                    self._prev_scored[cam_id] = (now, lane.scored)
        depth = spool.depth() if spool is not None else (0, 0)
        return {
            "ts": _iso(time.time()),
            "uptime_s": round(time.time() - self.started, 1),
            "cameras": cams,
            "mqtt": link.stats() if link is not None else {},
            "spool_messages": depth[0],
            "spool_bytes": depth[1],
            "spool_dropped": spool.dropped if spool is not None else {},
            "backend": pipeline.backend.describe() if pipeline is not None else None,
            "backend_errors": pipeline.backend_errors if pipeline is not None else 0,
            "last_error": pipeline.last_error if pipeline is not None else None,
            "engine_build": self.build.poll() if self.build is not None else None,
        }

    def _publish_stats(self) -> None:
        if self.link is not None:
            self.link.publish_volatile("stats", _json(self.snapshot()))

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for /healthz: 503 when failing, 200 when ok or degraded (with the reasons)."""
        now = time.monotonic()
        problems, failing = [], False
        if self.pipeline is None:
            failing = True
            problems.append("starting")
        elif not self._making_progress(now):
            failing = True
            problems.append(f"the scoring loop has made no progress for {now - self.pipeline.heartbeat:.0f} s")
        if self.pipeline is not None:
            for cam_id, lane in self.pipeline.lanes.items():
                stuck = lane.failing_for(now)
                if stuck is not None and stuck >= FAILING_S:  # not the watchdog's business: a restart would not help
                    failing = True
                    problems.append(f"camera {cam_id}: no frame scored for {stuck:.0f} s: {lane.failure}")
        for cam_id, camera in self.cameras.items():
            if camera.status.state not in ("online", "ended"):
                problems.append(f"camera {cam_id} {camera.status.state}: {camera.status.reason}")
        if self.link is not None and not self.link.connected:
            problems.append("MQTT broker not connected (events go to the spool)")
        status = "failing" if failing else ("degraded" if problems else "ok")
        return (503 if failing else 200), {"status": status, "problems": problems, "version": __version__}


def run_daemon(config_path: Path) -> int:
    """``edge-daemon run --config FILE``: load the config (exit 2 with its problems), run, return the exit code."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("%s: %s", config_path, problem)
        return 2
    return Daemon(config, config_path).run()
