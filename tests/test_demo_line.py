"""The README's main job, second half (scripts/demo_line.py): the real daemon on a line video of real bottle
photographs, its events arriving over MQTT from a private broker: Debian's mosquitto, or the embedded amqtt broker
that a machine without mosquitto gets (DESIGN.md: the README's command must work on a fresh machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.conftest import SignedBundle

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("kind", "name", "protocol"), [("mosquitto", "mosquitto", "5"), ("embedded", "amqtt", "3.1.1")]
)
def test_demo_line_events_arrive(
    kind: str, name: str, protocol: str, signed_bottle_bundle: SignedBundle, shared_data: Path, tmp_path: Path
) -> None:
    work = tmp_path / "line"
    b = signed_bottle_bundle
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "demo_line.py"),
            *("--bundle", str(b.path), "--trusted", str(b.public_key)),
            *("--data", str(shared_data / "mvtec_bottle"), "--work", str(work), "--hold", "2", "--broker", kind),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["broker"].startswith(name) and summary["mqtt_protocol"] == protocol
    assert summary["frames_scored"] == summary["frames"] == 2 * summary["parts"]
    assert summary["events"] >= 1 and summary["true_alarms"] >= 1, summary
    crops = sorted((work / "crops").glob("*.jpg"))
    assert len(crops) >= summary["events"], "every event's start has its crop"
    assert all(cv2.imread(str(c)) is not None for c in crops)
