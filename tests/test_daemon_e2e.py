"""The daemon end to end: a real signed bundle, a line video of real photographs, a real mosquitto, the real process.

The bundle is a small AE trained on the MVTec bottle's normal images (conftest.signed_bottle_bundle); the video
holds the bottle's test photographs (good and defective), each for a few frames (scripts/line_video.py).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from deploy.bundle import verify_bundle_details
from tests.conftest import SignedBundle
from tests.daemon_helpers import (
    PREFIX,
    Daemon,
    LineVideo,
    check_events_and_crops,
    events_of,
    make_line_video,
    wait_until,
    write_config,
)
from tests.mqtt_broker import Broker, Subscriber


@pytest.fixture(scope="module")
def line(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> LineVideo:
    """40 real bottle photographs (shuffled, good and defective), 4 frames each: 160 frames at 20 fps."""
    out = tmp_path_factory.mktemp("line") / "line.avi"
    return make_line_video(shared_data / "mvtec_bottle", out, hold=4, fps=20.0, limit=40)


def model_sha(bundle: SignedBundle) -> str:
    return verify_bundle_details(bundle.path, [bundle.public_key]).manifest_sha256


def camera(line: LineVideo, **extra: object) -> dict[str, object]:
    return {"id": "cam0", "source": str(line.video), "roi": list(line.roi), **extra}


def test_video_to_events_and_crops(signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path) -> None:
    """Every frame scored (a file plays losslessly), every event has its crop first, the daemon exits 0 at the end."""
    b = signed_bottle_bundle
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/#") as sub:
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [camera(line)])
        daemon = Daemon(config)
        assert daemon.wait(120) == 0, daemon.text()[-3000:]
        sub.wait_for(
            lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms), 10, "status stopped"
        )
    msgs = sub.messages
    events = check_events_and_crops(msgs, model_sha(b))
    counts = daemon.final_counts()["cam0"]
    assert counts["frames_scored"] == line.frames == counts["frames_in"]
    assert counts["frames_dropped"] == 0
    starts = [e for e in events if e["type"] == "start"]
    ends = [e for e in events if e["type"] == "end"]
    assert len(starts) == counts["events_opened"] >= 1
    assert len(ends) == counts["events_closed"] == len(starts), "every event is closed"
    assert all(e["reason"] in ("normal", "source_ended") for e in ends)
    # the events are about defective parts: at least one covers a defective photograph
    defective = {p.index for p in line.parts if p.defective}
    covered = {
        p.index
        for e in ends
        for p in line.parts
        if p.first_frame <= e["last_frame"] and p.last_frame >= e["first_frame"]
    }
    assert covered & defective, "no event on any defective part"
    # retained state: online first, info naming the model, stopped at the end
    status = [m.payload for m in msgs if m.topic == f"{PREFIX}/status"]
    assert status[0] == b"online" and status[-1] == b"stopped"
    info = json.loads([m for m in msgs if m.topic == f"{PREFIX}/info"][-1].payload)
    assert info["model"]["sha"] == model_sha(b) and info["backend"]["kind"] == "onnxruntime"
    assert "parity ok" in info["backend"]["parity"]
    assert "prepares the 12 golden source images exactly as the trainer did" in info["backend"]["preprocessing"]
    cam_status = [json.loads(m.payload)["state"] for m in msgs if m.topic == f"{PREFIX}/cam0/status"]
    assert "online" in cam_status and cam_status[-1] == "ended"


def test_broker_outages_lose_nothing(signed_bottle_bundle: SignedBundle, shared_data: Path, tmp_path: Path) -> None:
    """The broker is down at start, then killed (SIGKILL) twice mid-run: every event arrives exactly once after
    de-duplication, in order, and those held back by an outage are flagged replayed."""
    b = signed_bottle_bundle
    line = make_line_video(shared_data / "mvtec_bottle", tmp_path / "line.avi", hold=8, fps=20.0, limit=40)  # 16 s
    # Persistence keeps the subscriber's session across restarts, as a plant broker does. Its subscription is
    # saved by the clean stop below; each kill waits until the subscriber is back, so that the broker never dies
    # holding messages it queued for an absent subscriber (that loss would be the broker's, not ours).
    with (
        Broker(tmp_path / "broker", persistence=True) as broker,
        Subscriber(broker.port, f"{PREFIX}/#", client_id="outage-watcher") as sub,
    ):
        broker.stop()
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [camera(line, realtime=True)])
        daemon = Daemon(config)
        time.sleep(3.0)  # about 60 frames scored with no broker: their events wait in the spool
        for kills in range(3):
            broker.start()
            wait_until(lambda k=kills: sub.connects >= 2 + k, 20, "the subscriber to reconnect")
            if kills < 2:
                time.sleep(1.5)
                broker.kill()
                time.sleep(1.0)
        assert daemon.wait(120) == 0, daemon.text()[-3000:]
        sub.wait_for(
            lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms), 20, "status stopped"
        )
    events = check_events_and_crops(sub.messages, model_sha(b))
    counts = daemon.final_counts()["cam0"]
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == counts["events_opened"] >= 1
    assert len([e for e in events if e["type"] == "end"]) == counts["events_closed"]
    assert [e["first_frame"] for e in starts] == sorted(e["first_frame"] for e in starts), "events out of order"
    assert "connection lost" in daemon.text()
    early = [e for e in events if e["last_frame"] is not None and e["last_frame"] < 40]
    assert all(e.get("replayed") for e in early), "events spooled during the first outage are flagged replayed"


def test_sigkill_with_a_full_spool_replays_after_restart(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    """No broker at all: the daemon spools, is SIGKILLed; the next start replays the spool intact, in order."""
    b = signed_bottle_bundle
    with Broker(tmp_path / "broker") as broker:
        broker.stop()
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [camera(line, realtime=True)])
        spool = tmp_path / "state" / "spool.db"
        daemon = Daemon(config)

        def spooled() -> list[tuple[str, bytes]]:
            if not spool.exists():
                return []
            with sqlite3.connect(f"file:{spool}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT * FROM sqlite_master WHERE type='table'").fetchall()
                tables = [r[1] for r in rows if r[1] not in ("meta", "sqlite_sequence")]
                if not tables:  # the daemon has created the file but not yet its schema
                    return []
                table = tables[0]
                return [(t, bytes(p)) for t, p in db.execute(f"SELECT topic, payload FROM {table} ORDER BY id")]

        wait_until(lambda: sum(t.endswith("/events") for t, _ in spooled()) >= 2, 60, "two events in the spool")
        daemon.kill()
        before = spooled()
        assert before
        broker.start()
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            again = Daemon(config)
            assert again.wait(120) == 0, again.text()[-3000:]
            sub.wait_for(
                lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms),
                20,
                "status stopped",
            )
    got = [(m.topic, m.payload) for m in sub.messages if "/events" in m.topic or "/crop/" in m.topic]
    replayed = [(t, p) for t, p in got[: len(before)]]
    assert [t for t, _ in replayed] == [f"{PREFIX}/{t}" if not t.startswith(PREFIX) else t for t, _ in before]
    for (_, sent), (_, stored) in zip(replayed, before, strict=True):
        if sent[:1] == b"{":
            ev, orig = json.loads(sent), json.loads(stored)
            assert ev.pop("replayed") is True
            orig.pop("replayed", None)
            assert ev == orig
        else:
            assert sent == stored  # crops byte for byte
    events_of(sub.messages)


def test_a_clean_exit_with_the_broker_down_keeps_the_spool_for_the_next_start(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    """The video ends while the broker is down: the daemon exits 0 without waiting for a broker it is not connected
    to, says how many messages stay in the spool, and the next start delivers every one of them, flagged replayed."""
    b = signed_bottle_bundle
    with Broker(tmp_path / "broker") as broker:
        broker.stop()
        config = write_config(tmp_path, b.path, b.public_key, broker.port, [camera(line)])
        first = Daemon(config)
        assert first.wait(120) == 0, first.text()[-3000:]
        kept = re.search(
            r"not connected to the broker: (\d+) message\(s\) \(\d+ bytes\) stay in the spool", first.text()
        )
        assert kept is not None, first.text()[-3000:]
        opened = first.final_counts()["cam0"]["events_opened"]
        assert opened >= 1
        broker.start()
        with Subscriber(broker.port, f"{PREFIX}/#") as sub:
            second = Daemon(config)
            assert second.wait(120) == 0, second.text()[-3000:]
            sub.wait_for(
                lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms), 20, "stopped"
            )
    events = check_events_and_crops(sub.messages, model_sha(b))
    replayed = [e for e in events if e.get("replayed")]
    assert len({e["event_id"] for e in replayed}) == opened, "every event of the first run, once"
    crops = {e["crop"]["sha256"] for e in replayed if e.get("crop") and e["type"] != "end"}  # an end names its last
    assert len(replayed) + len(crops) == int(kept.group(1)), "the spool held these events and their crops, no more"
    assert "stay in the spool" not in second.text()[len(first.text()) :]  # the log file is shared: its second run


def test_two_workers_two_cameras(signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path) -> None:
    """Two scoring workers, each with its own camera and backend session: every frame of both cameras scored,
    each camera's events complete and in order."""
    b = signed_bottle_bundle
    cams = [camera(line), {**camera(line), "id": "cam1"}]
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/#") as sub:
        config = write_config(tmp_path, b.path, b.public_key, broker.port, cams, workers=2)
        daemon = Daemon(config)
        assert daemon.wait(120) == 0, daemon.text()[-3000:]
        sub.wait_for(
            lambda ms: any(m.topic == f"{PREFIX}/status" and m.payload == b"stopped" for m in ms), 10, "status stopped"
        )
    assert "on 2 worker(s)" in daemon.text()
    events = check_events_and_crops(sub.messages, model_sha(b))
    counts = daemon.final_counts()
    for cam_id in ("cam0", "cam1"):
        assert counts[cam_id]["frames_scored"] == line.frames
        starts = [e for e in events if e["camera"] == cam_id and e["type"] == "start"]
        assert len(starts) == counts[cam_id]["events_opened"] >= 1
        assert [e["first_frame"] for e in starts] == sorted(e["first_frame"] for e in starts)
    # the same video through the same model: both cameras see the same events at the same frames
    spans = {
        c: [(e["first_frame"], e["last_frame"]) for e in events if e["camera"] == c and e["type"] == "end"]
        for c in ("cam0", "cam1")
    }
    assert spans["cam0"] == spans["cam1"]


def test_an_event_a_crash_left_open_is_ended_at_the_next_start(
    signed_bottle_bundle: SignedBundle, line: LineVideo, tmp_path: Path
) -> None:
    """DESIGN.md: an open event is always closed. SIGKILL (the watchdog's abort, an OOM kill, a power cut) leaves no
    chance to send its end: the next start sends it, reason "restart", the event's next seq."""
    b = signed_bottle_bundle
    never_closes = {"open_frames": 1, "close_frames": 1000, "max_seconds": 3600}
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.port, f"{PREFIX}/#") as sub:
        config = write_config(
            tmp_path, b.path, b.public_key, broker.port, [camera(line, realtime=True, loop=True)], events=never_closes
        )
        first = Daemon(config)
        wait_until(lambda: any(e["type"] == "start" for e in events_of(sub.messages)), 60, "an event to start")
        first.kill()
        opened = [e for e in events_of(sub.messages) if e["type"] == "start"]
        assert len(opened) == 1
        event_id = opened[0]["event_id"]
        second = Daemon(config)

        def end_of_the_first() -> dict[str, object] | None:
            ends = [e for e in events_of(sub.messages) if e["event_id"] == event_id and e["type"] == "end"]
            return ends[0] if ends else None

        wait_until(lambda: end_of_the_first() is not None, 60, "the end of the event left open")
        assert second.terminate(30) == 0, second.text()[-3000:]
    end = end_of_the_first()
    assert end is not None and end["reason"] == "restart"
    last = [e for e in events_of(sub.messages) if e["event_id"] == event_id and e["type"] != "end"][-1]
    assert end["seq"] == last["seq"] + 1 and end["started_at"] == opened[0]["started_at"]
    assert "left open by the last run" in second.text()
    check_events_and_crops(sub.messages, model_sha(b))
