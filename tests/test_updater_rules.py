"""The updater's rules in the corners the end-to-end tests (test_daemon_updates.py) cannot reach quickly.

The updater, its state file, its downloads (file:// URLs), bundle verification and signatures are all real; the
daemon around it is a small host that keeps the UpdateHost protocol (which bundle serves, the live counters, and a
gate that can be told to fail, as a device out of memory would), and the clock is the test's, so probation and the
rollback retry take no wall time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from deploy.bundle import pack_tar, write_bundle
from deploy.signing import generate_keypair
from edge_daemon.backends import Backend, BackendError
from edge_daemon.config import DaemonConfig
from edge_daemon.model import LoadedBundle, load_bundle
from edge_daemon.updater import ROLLBACK_RETRY_S, Probe, Updater
from tests.test_bundle import make_manifest


class Host:
    """The daemon as the updater sees it. ``failing`` holds the versions whose gate fails now."""

    def __init__(self) -> None:
        self.bundle: LoadedBundle | None = None
        self.states: list[dict[str, Any]] = []
        self.frames = self.anomalous = 0
        self.failing: set[str] = set()
        self.gated: list[str] = []

    def serving_bundle(self) -> LoadedBundle:
        assert self.bundle is not None
        return self.bundle

    def make_backends(self, bundle: LoadedBundle) -> list[Backend]:
        self.gated.append(bundle.version)
        if bundle.version in self.failing:
            raise BackendError(f"{bundle.version}: CUDA out of memory")
        return []

    def switch(self, backends: list[Backend], bundle: LoadedBundle) -> None:
        self.bundle = bundle

    def publish_model_state(self, payload: bytes) -> None:
        self.states.append(json.loads(payload))

    def probe(self) -> Probe:
        return Probe(self.frames, self.anomalous, 0, None)

    def engine_build(self, bundle: LoadedBundle) -> str | None:
        return None

    def answers(self, rid: str) -> list[tuple[str, str | None]]:
        return [(s["phase"], s["reason"]) for s in self.states if s["request_id"] == rid]


class Line:
    """A device with bundle v0 configured and signed updates v1, v2 (newer each) ready as .tar files."""

    def __init__(self, tmp: Path, **updates: Any) -> None:
        key, self.public = generate_keypair(tmp / "keys" / "line")
        self.tars: dict[str, tuple[Path, str]] = {}
        folders = {}
        for month, version in enumerate(("v0", "v1", "v2"), start=1):
            folder = tmp / "made" / version
            manifest = make_manifest(model={"name": "ae", "version": version}, created=f"2026-0{month}-01T00:00:00Z")
            write_bundle(folder, manifest, {"model.onnx": version.encode() * 64}, key)
            tar = tmp / "made" / f"{version}.tar"
            pack_tar(folder, tar)
            self.tars[version] = (tar, hashlib.sha256(tar.read_bytes()).hexdigest())
            folders[version] = folder
        self.now = 0.0
        self.config = DaemonConfig(
            device_id="line3",
            bundle=folders["v0"],
            trusted_keys=[self.public],
            state_dir=tmp / "state",
            cameras=[{"id": "cam0", "source": "line.avi"}],
            updates={"probation_s": 60, **updates},
        )
        self.host = Host()
        self.updater = Updater(self.config, self.host, clock=lambda: self.now)
        self.host.bundle = load_bundle(self.updater.startup_bundle(), [self.public], self.config.state_dir)

    def set(self, rid: str, version: str) -> None:
        tar, sha = self.tars[version]
        body = {"request_id": rid, "url": tar.as_uri(), "sha256": sha, "version": version}
        self.updater._handle_set(json.dumps(body).encode())  # what the worker thread does with a queued command

    def rollback(self, rid: str) -> None:
        self.updater._handle_rollback(json.dumps({"request_id": rid}).encode())

    def pass_probation(self) -> None:
        self.now += self.config.updates.probation_s
        self.updater.tick()

    def misbehave(self) -> None:
        """Every live frame anomalous from now on: the next tick rolls the model on probation back."""
        self.host.frames += 100
        self.host.anomalous += 100

    def history(self) -> list[tuple[str, bool]]:
        return [(h["version"], Path(h["path"]).is_dir()) for h in self.updater.state["history"]]


def test_a_kept_model_pushed_again_and_rolled_back_stays_kept(tmp_path: Path) -> None:
    """A model kept for model/rollback that is pushed again is served from its kept folder: rolling the re-push back
    must not delete that folder, or model/rollback could never return to it."""
    line = Line(tmp_path, keep=3)
    line.set("s1", "v1")
    line.pass_probation()
    line.set("s2", "v2")
    line.pass_probation()
    assert line.host.serving_bundle().version == "v2" and line.history()[0] == ("v1", True)
    line.config.allow_downgrade = True
    line.set("s3", "v1")
    assert line.host.serving_bundle().version == "v1"
    line.misbehave()
    line.updater.tick()
    assert line.host.answers("s3")[-1][0] == "rolled_back"
    assert line.host.serving_bundle().version == "v2"
    assert line.history()[0] == ("v1", True)
    line.rollback("rb")
    assert line.host.answers("rb")[-1][0] == "rolled_back", line.host.answers("rb")
    assert line.host.serving_bundle().version == "v1"


def test_a_rollback_during_probation_is_answered_under_its_own_request_id(tmp_path: Path) -> None:
    line = Line(tmp_path)
    line.set("s1", "v1")
    line.rollback("rb-1")
    assert line.host.serving_bundle().version == "v0"
    assert line.host.answers("s1")[-1] == ("rolled_back", "rollback requested during probation (rb-1)")
    assert line.host.answers("rb-1") == [("rolled_back", "rollback requested during probation (rb-1)")]
    line.rollback("rb-1")  # the same request again: its recorded outcome, nothing else
    assert line.host.answers("rb-1")[-1] == ("rolled_back", "rollback requested during probation (rb-1)")
    assert line.host.serving_bundle().version == "v0"


def test_an_unwritable_state_refuses_the_request_and_blocks_no_later_one(tmp_path: Path) -> None:
    """The state file cannot be written (here: a file where its folder should be; on a device, a full disk): the
    request is refused with the reason, and once the disk is fine the next one goes through."""
    line = Line(tmp_path)
    updates = line.updater.root
    aside = updates.with_name("updates.aside")
    os.replace(updates, aside) if updates.exists() else aside.mkdir()
    updates.write_text("in the way")
    line.set("s1", "v1")
    phase, reason = line.host.answers("s1")[-1]
    assert phase == "refused" and reason is not None and "cannot write the update state" in reason
    updates.unlink()
    os.replace(aside, updates)
    line.set("s2", "v1")
    assert line.host.answers("s2")[-1][0] == "probation"
    line.pass_probation()
    assert line.host.answers("s2")[-1][0] == "active"


def test_a_rollback_whose_previous_model_fails_its_gate_is_retried_and_never_confirmed(tmp_path: Path) -> None:
    line = Line(tmp_path)
    line.set("s1", "v1")
    line.host.failing = {"v0"}
    line.misbehave()
    line.updater.tick()
    assert line.host.serving_bundle().version == "v1"
    phase, reason = line.host.answers("s1")[-1]
    assert phase == "probation" and reason is not None and "fails its gate now" in reason
    tries = line.host.gated.count("v0")
    line.now += ROLLBACK_RETRY_S / 2
    line.updater.tick()
    assert line.host.gated.count("v0") == tries  # no retry before its time (every 0.25 s it would hog the device)
    line.rollback("rb")  # asked for meanwhile: answered, and tried at once
    phase, reason = line.host.answers("rb")[-1]
    assert phase == "refused" and reason is not None and "fails its gate now" in reason
    line.now += line.config.updates.probation_s  # far past the probation window: still never confirmed
    line.host.failing = set()
    line.updater.tick()
    assert line.host.serving_bundle().version == "v0"
    assert line.host.answers("s1")[-1][0] == "rolled_back"
    line.set("s2", "v2")  # and the updater takes requests again
    assert line.host.answers("s2")[-1][0] == "probation"


def test_downloads_that_became_no_update_are_deleted(tmp_path: Path) -> None:
    """A refused or interrupted download can leave up to max_bundle_mb in updates/downloads/: all of it goes, but
    the newest partial download, which a push of the same bundle again resumes."""
    line = Line(tmp_path)
    downloads = line.updater.root / "downloads"
    downloads.mkdir(parents=True)
    for i, name in enumerate(["a" * 64 + ".tar.part", "b" * 64 + ".tar", "c" * 64 + ".tar.part"]):
        (downloads / name).write_bytes(b"x" * 1000)
        os.utime(downloads / name, (1_700_000_000 + i, 1_700_000_000 + i))
    line.set("s1", "v1")
    line.pass_probation()
    assert line.host.answers("s1")[-1][0] == "active"
    assert sorted(p.name for p in downloads.iterdir()) == ["c" * 64 + ".tar.part"]


def test_a_tar_is_unpacked_only_inside_the_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from a pushed tar is written outside the daemon's state directory (DESIGN.md, "Security model"), not
    even for verification: with the system temporary folder unusable the update still goes through."""
    import tempfile

    line = Line(tmp_path)
    not_a_folder = tmp_path / "system-tmp"
    not_a_folder.write_text("any temporary file made outside the state directory fails here")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    line.set("s1", "v1")
    assert line.host.answers("s1")[-1][0] == "probation", line.host.answers("s1")


def test_pushing_the_serving_model_again_ends_active(tmp_path: Path) -> None:
    """A fleet push retried after a partial failure sends the same bundle to devices that already switched: they answer
    "active" (nothing to do, said in the reason), so the retry can succeed. It used to be refused for ever."""
    line = Line(tmp_path)
    line.set("s1", "v1")
    line.pass_probation()
    assert line.host.answers("s1")[-1][0] == "active"
    line.set("s1-again", "v1")
    phase, reason = line.host.answers("s1-again")[-1]
    assert phase == "active" and "is already active" in str(reason), line.host.answers("s1-again")
    assert line.host.serving_bundle().version == "v1" and line.updater.state["pending"] is None
    line.set("s1-again", "v1")  # a repeated request_id gets the recorded outcome
    assert line.host.answers("s1-again")[-1][0] == "active"
    line.set("s2", "v2")  # and nothing is left busy
    assert line.host.answers("s2")[-1][0] == "probation"
