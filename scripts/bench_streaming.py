"""Streaming benchmark (DESIGN.md, "Benchmark protocols"): the daemon on a video at full speed, against two
baselines measured in the same run on the same frames.

    python scripts/bench_streaming.py --bundle .demo/bundles/ae-bottle --trusted .demo/keys/demo.pub \
        --data ../shared/data/mvtec_bottle --configs 1x1,4x1,4x2 --results docs/results/streaming.json

For each camera count N (every camera plays the same line video of real photographs, losslessly, as fast as it
is scored):
- raw backend: ONNX Runtime (one thread, no spinning) on pre-decoded, pre-processed frames, N frames per call,
  and again at one worker's batch (its share of the cameras, ceil(N / workers) frames per call): the most one
  single-threaded worker could score, so ``workers`` times it bounds the daemon;
- minimal loop: one thread doing decode -> ROI -> preprocess -> backend (N frames per call) -> calibrate ->
  publish, the least a daemon must do; publish as DESIGN.md's hand-written loop did it ("Hot-path facts"): the
  first anomalous frame of a run sends its ROI as a JPEG crop and a start event, the first normal frame after it
  an end event, each through a row of a SQLite spool (the daemon's, same settings) that its QoS 1 PUBACK deletes;
- daemon: the real ``edge-daemon run`` process with a private mosquitto, timed from READY=1 (sd_notify) to its
  "pipeline ended" log line; CPU time and peak RSS of the process over that span from /proc; capture-to-outbox
  latency percentiles from its final log line.
Ratios daemon / loop and daemon / raw are per wall-clock second and per CPU-second (cores used).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from line_video import LineVideo, make_line_video  # noqa: E402
from private_broker import Broker  # noqa: E402

from deploy.bundle import verify_bundle_details  # noqa: E402
from deploy.parity import onnxruntime_runner  # noqa: E402
from deploy.preprocess import preprocess  # noqa: E402
from edge_daemon.events import encode_jpeg  # noqa: E402
from edge_daemon.pipeline import DEFAULT_THRESHOLD  # noqa: E402
from edge_daemon.spool import Spool  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _frames(video: LineVideo) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(video.video))
    out = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        out.append(frame)
    return out


def raw_backend_fps(onnx: Path, inputs: np.ndarray, batch: int, seconds: float = 3.0) -> float:
    """Frames/s of ONNX Runtime alone on pre-processed frames, ``batch`` per call."""
    run = onnxruntime_runner(onnx)
    run(inputs[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(inputs) - batch + 1, batch):
            run(inputs[i : i + batch])
            n += batch
    return n / (time.perf_counter() - t0)


class LoopPublisher:
    """The minimal loop's publish stage: per camera, the first anomalous frame of a run sends its ROI as a JPEG crop
    (quality 90, the daemon's default) and a start event, the first normal frame after it an end event. Each message
    is a row of a SQLite spool (FULL, the daemon's default) before it goes out with QoS 1; its PUBACK deletes it."""

    def __init__(self, port: int, spool_path: Path) -> None:
        import paho.mqtt.client as mqtt

        self.spool = Spool(spool_path, 64 << 20)
        self._rows: dict[int, int] = {}  # paho message id -> spool row
        self._lock = threading.Lock()
        self._open: dict[int, bool] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-loop", protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            row = self._rows.pop(mid, None)
        if row:
            self.spool.ack(row)

    def _send(self, topic: str, payload: bytes, kind: str) -> None:
        row = self.spool.put(topic, payload, kind)
        with self._lock:  # the PUBACK may come back before publish() returns
            self._rows[self.client.publish(topic, payload, qos=1).mid] = row

    def frame(self, camera: int, roi: np.ndarray, anomalous: bool, seq: int) -> None:
        if anomalous == self._open.get(camera, False):
            return
        self._open[camera] = anomalous
        event: dict[str, Any] = {"type": "start" if anomalous else "end", "camera": camera, "frame": seq}
        if anomalous:
            crop = encode_jpeg(roi, 90)
            event["crop"] = {"bytes": len(crop)}
            self._send(f"bench/loop/cam{camera}/crop", crop, "crop")
        self._send(f"bench/loop/cam{camera}/events", json.dumps(event).encode(), "event")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.spool.close()


def minimal_loop_fps(
    video: LineVideo, onnx: Path, bundle_dir: Path, cameras: int, broker_port: int, work: Path
) -> tuple[float, float]:
    """(frames/s, CPU cores used) of one thread: decode N cameras -> ROI -> preprocess -> backend -> calibrate ->
    publish (``LoopPublisher``, to the broker on ``broker_port``, spool in ``work``)."""
    manifest = verify_bundle_details(bundle_dir, [], require_signature=False).manifest
    spec, cal = manifest.input.to_input_spec(), manifest.calibration
    run = onnxruntime_runner(onnx)
    x, y, w, h = video.roi
    caps = [cv2.VideoCapture(str(video.video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1]) for _ in range(cameras)]
    work.mkdir(parents=True, exist_ok=True)
    publisher = LoopPublisher(broker_port, work / "loop-spool.db")
    n, seq, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while True:
        rois, batch = [], []
        for cap in caps:
            ok, frame = cap.read()
            if ok:
                rois.append(frame[y : y + h, x : x + w])
                batch.append(preprocess(rois[-1], spec))
        if not batch:
            break
        raw, _ = run(np.stack(batch))
        normalised = cal.normalise(raw)
        for camera, (roi, score) in enumerate(zip(rois, normalised, strict=True)):
            publisher.frame(camera, roi, bool(score >= DEFAULT_THRESHOLD), seq)
        n += len(batch)
        seq += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    publisher.close()
    return n / wall, cpu / wall


def daemon_run(video: LineVideo, bundle: Path, trusted: Path, cameras: int, workers: int, work: Path) -> dict[str, Any]:
    """Run the real daemon on ``cameras`` copies of the video with ``workers`` scoring threads; returns fps, CPU,
    RSS and latency figures."""
    work.mkdir(parents=True, exist_ok=True)
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    with Broker(work / "broker") as broker:
        config = {
            "device_id": "bench",
            "bundle": str(bundle),
            "trusted_keys": [str(trusted)],
            "state_dir": str(work / "state"),
            "backend": "onnxruntime",
            "workers": workers,
            "mqtt": {"host": "127.0.0.1", "port": broker.port},
            "cameras": [{"id": f"cam{i}", "source": str(video.video), "roi": list(video.roi)} for i in range(cameras)],
            "spool": {"path": str(work / "state" / "spool.db")},
            "http": {"bind": None},
        }
        (work / "config.yaml").write_text(json.dumps(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon.cli", "run", "--config", str(work / "config.yaml")],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            cwd=REPO,
        )
        marks: dict[str, Any] = {}
        lines: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "pipeline ended" in line:
                    marks["end"] = (time.perf_counter(), _cpu_seconds(proc.pid), _peak_rss_mb(proc.pid))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
        t_ready, cpu_ready = time.perf_counter(), _cpu_seconds(proc.pid)
        rc = proc.wait(300)
        reader.join(10)
    notify.close()
    if rc != 0 or "end" not in marks:
        raise RuntimeError(f"daemon exit {rc}:\n{''.join(lines)[-3000:]}")
    final = json.loads(next(ln for ln in reversed(lines) if "final: " in ln).split("final: ", 1)[1])
    t_end, cpu_end, rss = marks["end"]
    frames = sum(c["frames_scored"] for c in final.values())
    wall = t_end - t_ready
    return {
        "fps": frames / wall,
        "frames": frames,
        "dropped": sum(c["frames_dropped"] for c in final.values()),
        "cpu_cores": (cpu_end - cpu_ready) / wall,
        "rss_mb": rss,
        "latency_p50_ms": float(np.median([c["latency_p50_ms"] for c in final.values()])),
        "latency_p99_ms": float(max(c["latency_p99_ms"] for c in final.values())),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--trusted", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--configs", default="1x1,4x1,4x2", help="cameras x scoring workers, comma-separated")
    p.add_argument("--hold", type=int, default=10, help="frames per part (83 parts)")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is kept")
    p.add_argument("--results", type=Path, required=True)
    args = p.parse_args()

    bundle = args.bundle.resolve()
    onnx = bundle / "model.onnx"
    manifest = verify_bundle_details(bundle, [args.trusted]).manifest
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        video = make_line_video(args.data, Path(tmp) / "line.avi", hold=args.hold)
        spec = manifest.input.to_input_spec()
        x, y, w, h = video.roi
        inputs = np.stack([preprocess(f[y : y + h, x : x + w], spec) for f in _frames(video)])
        records = []
        for n, workers in [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]:
            runs = []
            for r in range(args.repeat):
                raw = raw_backend_fps(onnx, inputs, batch=n)
                per_worker = -(-n // workers)  # each worker batches its own cameras only
                raw_worker = raw if per_worker == n else raw_backend_fps(onnx, inputs, batch=per_worker)
                loop_work = Path(tmp) / f"loop{n}x{workers}-{r}"
                with Broker(loop_work / "broker") as broker:
                    loop_fps, loop_cores = minimal_loop_fps(video, onnx, bundle, n, broker.port, loop_work)
                d = daemon_run(video, bundle, args.trusted.resolve(), n, workers, Path(tmp) / f"d{n}x{workers}-{r}")
                runs.append(
                    {"raw_fps": raw, "raw_worker_fps": raw_worker, "loop_fps": loop_fps, "loop_cores": loop_cores, **d}
                )
                print(
                    f"{n} camera(s), {workers} worker(s), run {r}: daemon {d['fps']:.0f} fps "
                    f"({d['cpu_cores']:.2f} cores, "
                    f"p50 {d['latency_p50_ms']:.1f} ms, p99 {d['latency_p99_ms']:.1f} ms, {d['rss_mb']:.0f} MB), "
                    f"loop {loop_fps:.0f} fps ({loop_cores:.2f} cores), raw backend {raw:.0f} fps "
                    f"({raw_worker:.0f} at a worker's batch of {per_worker})",
                    flush=True,
                )
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            records.append(
                {
                    "protocol": "streaming",
                    "model": str(manifest.model.get("name")),
                    "normal_class": f"{n} camera(s), {workers} worker(s)",
                    "workers": workers,
                    "cameras": n,
                    "image_size": spec.height,
                    "frames_per_run": int(med["frames"]),
                    "repeats": args.repeat,
                    "daemon_fps": med["fps"],
                    "loop_fps": med["loop_fps"],
                    "raw_fps": med["raw_fps"],
                    "raw_worker_fps": med["raw_worker_fps"],
                    "daemon_vs_loop": med["fps"] / med["loop_fps"],
                    "daemon_vs_raw": med["fps"] / med["raw_fps"],
                    "daemon_cores": med["cpu_cores"],
                    "loop_cores": med["loop_cores"],
                    "daemon_vs_loop_per_core": (med["fps"] / med["cpu_cores"]) / (med["loop_fps"] / med["loop_cores"]),
                    "latency_p50_ms": med["latency_p50_ms"],
                    "latency_p99_ms": med["latency_p99_ms"],
                    "rss_mb": med["rss_mb"],
                    "dropped": int(med["dropped"]),
                    "device": "cpu",
                    "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.processor() or ''}".strip(
                        ", "
                    ),
                    "commit": os.environ.get("BENCH_COMMIT")
                    or subprocess.run(
                        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
                    ).stdout.strip(),
                    "command": "python scripts/bench_streaming.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"),
                }
            )
    args.results.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
