"""The README's main job, second half: a signed bundle watching a "line" video, events arriving over MQTT.

    python scripts/demo_line.py --bundle .demo/bundles/ae-bottle --trusted .demo/keys/demo.pub \
        --data ../shared/data/mvtec_bottle --work .demo/line

1. assembles a line video from the folder's real test photographs (scripts/line_video.py; each part is held
   for a few frames, like parts passing a camera);
2. starts a private MQTT broker on a free loopback port (scripts/private_broker.py): Debian's mosquitto when it
   is installed, else the embedded amqtt broker (MQTT 3.1.1 only: the daemon's config and the watcher say so);
3. writes a daemon config and runs the real daemon (``edge-daemon run``) on the video at full speed;
4. prints every event as it arrives over MQTT, checks each crop's sha256 and saves it under WORK/crops/;
5. ends with a summary against the known defective parts: frames, events, true and false alarms.
Exit 0 when the daemon ran and every message checked out; 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from line_video import LineVideo, make_line_video  # noqa: E402
from private_broker import BrokerError, private_broker  # noqa: E402

DEVICE = "demo-line"
PREFIX = f"inspect/{DEVICE}"


class Watcher:
    """Subscribes to the device's topics; keeps crops by sha256 and events de-duplicated by (event_id, seq)."""

    def __init__(self, port: int, crops_dir: Path, quiet: bool = False, protocol: str = "5") -> None:
        self.crops: dict[str, bytes] = {}
        self.events: list[dict[str, Any]] = []
        self.seen: set[tuple[str, int]] = set()
        self.problems: list[str] = []
        self.stats: dict[str, Any] | None = None
        self.crops_dir = crops_dir
        self.quiet = quiet
        self.lock = threading.Lock()
        version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-watcher", protocol=version)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        with self.lock:
            if len(parts) >= 5 and parts[3] == "crop":
                self.crops[hashlib.sha256(msg.payload).hexdigest()] = bytes(msg.payload)
            elif parts[-1] == "events":
                self._on_event(json.loads(msg.payload))
            elif parts[-1] == "stats":
                self.stats = json.loads(msg.payload)

    def _on_event(self, ev: dict[str, Any]) -> None:
        key = (ev["event_id"], ev["seq"])
        if key in self.seen:
            return  # a QoS 1 redelivery
        self.seen.add(key)
        self.events.append(ev)
        crop = ev.get("crop")
        saved = ""
        if crop and ev["type"] != "end":  # an end names the crop already shown
            data = self.crops.get(crop["sha256"])
            if data is None:
                self.problems.append(f"{ev['event_id']} seq {ev['seq']}: its crop did not arrive before it")
            else:
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                if img is None:
                    self.problems.append(f"{ev['event_id']}: the crop is not a decodable JPEG")
                path = self.crops_dir / f"{ev['event_id']}-{ev['seq']}.jpg"  # seq 0: start, then updates
                path.write_bytes(data)
                saved = f"crop {img.shape[1]}x{img.shape[0]} -> {path}" if img is not None else ""
        if not self.quiet:
            s = ev["score"]
            print(
                f"  {ev['type']:<6} {ev['event_id']} seq {ev['seq']} frames {ev.get('first_frame')}-"
                f"{ev.get('last_frame')} score {s['normalized']:.2f} (threshold {s['threshold']:.2f})"
                + (f" reason {ev['reason']}" if ev.get("reason") else "")
                + (f" {saved}" if saved else ""),
                flush=True,
            )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(
    work: Path, bundle: Path, trusted: Path, video: LineVideo, port: int, realtime: bool, protocol: str
) -> Path:
    """The daemon's config for the demo; ``protocol``: the broker's MQTT version (the daemon would find a
    3.1.1-only broker by itself, but amqtt takes 3 s to hang up on an MQTT 5 CONNECT: longer than the video)."""
    config = {
        "device_id": DEVICE,
        "bundle": str(bundle.resolve()),
        "trusted_keys": [str(trusted.resolve())],
        "state_dir": str((work / "state").resolve()),
        "backend": "auto",
        "mqtt": {"host": "127.0.0.1", "port": port, "protocol": protocol},
        "cameras": [{"id": "cam0", "source": str(video.video.resolve()), "realtime": realtime, "roi": list(video.roi)}],
        "spool": {"path": str((work / "state" / "spool.db").resolve())},
        "stats_interval_s": 1,
        "http": {"bind": "127.0.0.1:0"},
    }
    path = work / "config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def summarise(video: LineVideo, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Match events to parts by frame numbers: an event covers the parts shown in its first..last anomalous frame."""
    ends = [e for e in events if e["type"] == "end"]
    caught: set[int] = set()
    true_alarms = false_alarms = 0
    for ev in ends:
        covered = {
            p.index for p in video.parts if p.first_frame <= ev["last_frame"] and p.last_frame >= ev["first_frame"]
        }
        if any(video.parts[i].defective for i in covered):
            true_alarms += 1
        else:
            false_alarms += 1
        caught |= covered
    defective = [p for p in video.parts if p.defective]
    good = [p for p in video.parts if not p.defective]
    return {
        "parts": len(video.parts),
        "defective_parts": len(defective),
        "defective_caught": sum(p.index in caught for p in defective),
        "good_parts": len(good),
        "good_flagged": sum(p.index in caught for p in good),
        "events": len(ends),
        "true_alarms": true_alarms,
        "false_alarms": false_alarms,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--trusted", type=Path, required=True, help="the public key the bundle is signed with")
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout folder whose test/ images become the line")
    p.add_argument("--work", type=Path, default=Path(".demo/line"))
    p.add_argument("--hold", type=int, default=5, help="frames per part")
    p.add_argument("--realtime", action="store_true", help="play the video at its frame rate (default: full speed)")
    p.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "embedded"),
        default="auto",
        help="the private broker: mosquitto, the embedded amqtt, or auto (mosquitto when installed, else amqtt)",
    )
    args = p.parse_args()

    work = args.work
    (work / "crops").mkdir(parents=True, exist_ok=True)
    for old in (work / "crops").glob("*.jpg"):
        old.unlink()
    # A fresh device each run: a spool left by an earlier run (a broker that was not reached) would replay that
    # run's events into this run's summary.
    shutil.rmtree(work / "state", ignore_errors=True)
    video = make_line_video(args.data, work / "line.avi", hold=args.hold)
    n_bad = sum(p.defective for p in video.parts)
    print(
        f"line video {video.video}: {video.frames} frames, {len(video.parts)} parts ({n_bad} defective), "
        f"assembled from the real photographs in {args.data}/test"
    )
    try:
        broker = private_broker(work / "broker", args.broker)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with broker:
        print(f"private MQTT broker ({broker.name}, MQTT {broker.protocol}) on 127.0.0.1:{broker.port}")
        config = write_config(work, args.bundle, args.trusted, video, broker.port, args.realtime, broker.protocol)
        watcher = Watcher(broker.port, work / "crops", protocol=broker.protocol)
        print(f"edge-daemon run --config {config}   (events below arrive over MQTT)")
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "edge_daemon.cli", "run", "--config", str(config), "--log-level", "warning"], env=env
        )
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # the last QoS 1 messages
        watcher.close()
    summary = summarise(video, watcher.events)
    stats = (watcher.stats or {}).get("cameras", {}).get("cam0", {})
    protocol = (watcher.stats or {}).get("mqtt", {}).get("protocol")
    print(
        f"\nsummary: daemon exit {proc.returncode} after {elapsed:.1f} s (MQTT {protocol or '?'} to {broker.name}); "
        f"{stats.get('frames_scored', '?')} of "
        f"{video.frames} frames scored; {summary['events']} events: {summary['true_alarms']} true alarms, "
        f"{summary['false_alarms']} false alarms; defective parts caught {summary['defective_caught']}/"
        f"{summary['defective_parts']}; good parts flagged {summary['good_flagged']}/{summary['good_parts']}; "
        f"{len(list((work / 'crops').glob('*.jpg')))} crops saved in {work / 'crops'}"
    )
    for problem in watcher.problems:
        print(f"problem: {problem}")
    record = {
        **summary,
        "frames": video.frames,
        "frames_scored": stats.get("frames_scored"),
        "broker": broker.name,
        "mqtt_protocol": protocol,
        "daemon_exit": proc.returncode,
    }
    (work / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0 if proc.returncode == 0 and not watcher.problems else 1


if __name__ == "__main__":
    sys.exit(main())
