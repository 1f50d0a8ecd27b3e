"""Running the real daemon in tests: configs, the process, and checks on what a subscriber received."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tests.mqtt_broker import Received

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from line_video import LineVideo, make_line_video  # noqa: E402

__all__ = ["LineVideo", "make_line_video", "Daemon", "write_config", "events_of", "check_events_and_crops"]

DEVICE = "line3-cam-a"
PREFIX = f"inspect/{DEVICE}"


def write_config(
    tmp: Path, bundle: Path, trusted: Path, port: int, cameras: list[dict[str, Any]], **extra: Any
) -> Path:
    """A daemon config in ``tmp``: the bundle, a broker on 127.0.0.1:port, these cameras, state under tmp/state."""
    config: dict[str, Any] = {
        "device_id": DEVICE,
        "bundle": str(bundle),
        "trusted_keys": [str(trusted)],
        "state_dir": str(tmp / "state"),
        "backend": "onnxruntime",
        "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5},
        "cameras": cameras,
        "spool": {"path": str(tmp / "state" / "spool.db"), "synchronous": "NORMAL"},
        "stats_interval_s": 1,
        "http": {"bind": "127.0.0.1:0"},
        "drain_timeout_s": 5,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


RUNNING: list[Daemon] = []  # killed after each test by conftest's reap_daemons: a failed test leaves none behind


class Daemon:
    """``edge-daemon run --config`` as a child process, its log kept in a file beside the config."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log = config.with_suffix(".log")
        self._log_file = open(self.log, "ab")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon.cli", "run", "--config", str(config), "--log-level", "info"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        RUNNING.append(self)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the daemon did not exit within {timeout} s; log:\n{self.text()[-3000:]}") from None
        finally:
            self._log_file.close()

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def final_counts(self) -> dict[str, dict[str, Any]]:
        """The per-camera counts of the daemon's last "final:" log line (its last run when the log holds several)."""
        lines = [ln for ln in self.text().splitlines() if "final: " in ln]
        assert lines, f"no final line in the daemon's log:\n{self.text()[-3000:]}"
        return json.loads(lines[-1].split("final: ", 1)[1])  # type: ignore[no-any-return]


def events_of(messages: list[Received]) -> list[dict[str, Any]]:
    """Event JSONs in arrival order, QoS 1 duplicates (same event_id and seq) removed."""
    seen, out = set(), []
    for m in messages:
        if m.topic.endswith("/events"):
            ev = json.loads(m.payload)
            key = (ev["event_id"], ev["seq"])
            if key not in seen:
                seen.add(key)
                out.append(ev)
    return out


def check_events_and_crops(messages: list[Received], model_sha: str) -> list[dict[str, Any]]:
    """Check what a subscriber got: every event's crop arrived before it with the same sha256 and size and decodes
    as a JPEG; seqs per event are 0, 1, 2, ... in order; start first, end last; the model sha. Returns the events."""
    crops_seen: dict[str, bytes] = {}
    seqs: dict[str, list[int]] = {}
    types: dict[str, list[str]] = {}
    for m in messages:
        if "/crop/" in m.topic:
            assert not m.retain, "crops are never retained"
            crops_seen[hashlib.sha256(m.payload).hexdigest()] = m.payload
            img = cv2.imdecode(np.frombuffer(m.payload, np.uint8), cv2.IMREAD_COLOR)
            assert img is not None and img.size > 0, f"crop on {m.topic} is not a decodable JPEG"
            continue
        if not m.topic.endswith("/events"):
            continue
        assert not m.retain, "events are never retained"
        ev = json.loads(m.payload)
        if ev["seq"] in seqs.get(ev["event_id"], []):
            continue  # QoS 1 redelivery
        if ev["crop"] is not None:
            data = crops_seen.get(ev["crop"]["sha256"])
            assert data is not None, f"{ev['event_id']} seq {ev['seq']}: crop {ev['crop']['sha256'][:12]} not before it"
            assert len(data) == ev["crop"]["bytes"]
            assert m.topic.rsplit("/", 1)[0] + "/crop/" + ev["event_id"] == ev["crop"]["topic"]  # the full topic
        assert ev["model"]["sha"] == model_sha
        seqs.setdefault(ev["event_id"], []).append(ev["seq"])
        types.setdefault(ev["event_id"], []).append(ev["type"])
    for event_id, s in seqs.items():
        assert s == list(range(len(s))), f"{event_id}: seqs {s} are not 0, 1, 2, ... in order"
        t = types[event_id]
        assert t[0] == "start" and all(x == "update" for x in t[1:-1]), f"{event_id}: {t}"
    return events_of(messages)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
