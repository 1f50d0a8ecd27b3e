"""/healthz (JSON) and /metrics (Prometheus text) on the configured bind, default 127.0.0.1:9108.

Both are read at request time from a ``snapshot()`` callable, so the hot path pays nothing for them.
/healthz answers 200 when the daemon is "ok" or "degraded" (e.g. one camera offline) and 503 when it is
"failing" (the scoring loop stopped making progress, or a camera's frames arrive and every one has failed to be
scored for 10 s: an ROI outside the frame, a backend that errors).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("edge_daemon.http")
Snapshot = Callable[[], dict[str, Any]]


class _Collector:
    """Turns the daemon's snapshot into Prometheus metrics at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        cams = snap.get("cameras", {})
        per_camera = {
            "frames_in": ("edge_frames_captured_total", "frames read from the camera", CounterMetricFamily),
            "frames_dropped": ("edge_frames_dropped_total", "frames replaced before scoring", CounterMetricFamily),
            "frames_scored": ("edge_frames_scored_total", "frames scored", CounterMetricFamily),
            "anomalous": ("edge_frames_anomalous_total", "frames at or above threshold", CounterMetricFamily),
            "reconnects": ("edge_camera_reconnects_total", "camera reopen attempts", CounterMetricFamily),
            "roi_errors": ("edge_roi_errors_total", "frames unscored: roi outside them", CounterMetricFamily),
            "frames_failed": ("edge_frames_failed_total", "frames unscored: the backend failed", CounterMetricFamily),
            "events_opened": ("edge_events_opened_total", "anomaly events started", CounterMetricFamily),
            "threshold": ("edge_threshold", "current threshold, normalised units", GaugeMetricFamily),
            "latency_p50_ms": ("edge_latency_p50_ms", "capture to outbox, median, ms", GaugeMetricFamily),
            "latency_p99_ms": ("edge_latency_p99_ms", "capture to outbox, 99th percentile, ms", GaugeMetricFamily),
        }
        for key, (name, doc, kind) in per_camera.items():
            fam = kind(name.removesuffix("_total"), doc, labels=["camera"])
            for cam_id, cam in cams.items():
                value = cam.get(key)
                if value is not None:
                    fam.add_metric([cam_id], float(value))
            yield fam
        up = GaugeMetricFamily("edge_camera_up", "1 online, 0.5 degraded, 0 otherwise", labels=["camera"])
        for cam_id, cam in cams.items():
            up.add_metric([cam_id], {"online": 1.0, "degraded": 0.5}.get(cam.get("state", ""), 0.0))
        yield up
        mqtt = snap.get("mqtt", {})
        yield GaugeMetricFamily(
            "edge_mqtt_connected", "1 when connected to the broker", value=float(bool(mqtt.get("connected")))
        )
        yield GaugeMetricFamily(
            "edge_spool_messages", "messages waiting in the spool", value=float(snap.get("spool_messages", 0))
        )
        yield GaugeMetricFamily(
            "edge_spool_bytes", "payload bytes waiting in the spool", value=float(snap.get("spool_bytes", 0))
        )
        dropped = CounterMetricFamily("edge_spool_dropped", "messages dropped from a full spool", labels=["kind"])
        for kind, n in snap.get("spool_dropped", {}).items():
            dropped.add_metric([kind], float(n))
        yield dropped
        yield CounterMetricFamily(
            "edge_backend_errors", "failed backend calls", value=float(snap.get("backend_errors", 0))
        )
        yield GaugeMetricFamily("edge_uptime_seconds", "seconds since start", value=float(snap.get("uptime_s", 0)))


class HealthServer:
    """Serves /healthz and /metrics on a daemon thread. ``health()`` returns (http status, JSON body)."""

    def __init__(self, bind: str, snapshot: Snapshot, health: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        host, _, port = bind.rpartition(":")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))  # type: ignore[arg-type]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                try:
                    if self.path.split("?")[0] == "/healthz":
                        code, body = health()
                        self._reply(code, "application/json", json.dumps(body).encode())
                    elif self.path.split("?")[0] == "/metrics":
                        self._reply(200, "text/plain; version=0.0.4", generate_latest(registry))
                    else:
                        self._reply(404, "text/plain", b"not found: try /healthz or /metrics\n")
                except Exception as exc:  # a failing snapshot must not kill the server thread
                    log.exception("HTTP %s failed", self.path)
                    self._reply(500, "text/plain", f"error: {exc}\n".encode())

            def _reply(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
                log.debug("http: " + format, *args)

        address = host.strip("[]")
        server_class = _ThreadingHTTPServerV6 if ":" in address else ThreadingHTTPServer  # "[::1]:9108", "[::]:9108"
        self.server = server_class((address, int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    """For an IPv6 ``http.bind`` ("[::1]:9108"): http.server binds IPv4 sockets only."""

    address_family = socket.AF_INET6
