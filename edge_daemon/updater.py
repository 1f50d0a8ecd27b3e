"""Remote model updates: ``P/model/set`` and ``P/model/rollback`` (DESIGN.md, "MQTT" and "Security model").

A request goes through phases, each published on ``P/model/state`` (retained JSON: request_id, phase, reason,
model = the model serving now, target = the requested version and sha256, progress while downloading):

    downloading -> verifying -> building -> validating -> probation -> active
    any phase before probation -> refused (the serving model never stopped)
    probation -> rolled_back (the previous model serves again, automatically, with the reason)

- downloading: resumable HTTP(S) or file:// download with a size cap into ``<state_dir>/updates/downloads/``
  (edge_daemon.download), checked against the command's sha256;
- verifying: the signature must verify against the device's trusted keys (an unsigned or untrusted bundle is
  refused whatever the command says: ``allow_unsigned`` does not apply to updates), the daemon must be new enough,
  the command's version must be the manifest's, and a bundle older than the active one (manifest "created") is a
  downgrade, refused unless ``allow_downgrade``;
- building: a TensorRT engine for this device when TensorRT is present (background thread, time limit);
- validating: a backend per scoring worker, each through the golden parity gate;
- probation: the pipeline switches between two batches (open events end with reason "model_swap"; events carry
  the model's sha) and the new model is watched for ``updates.probation_s``: a backend error, a p99 latency over
  ``updates.max_latency_ms``, or an anomaly rate above ``updates.max_anomaly_rate`` (the calibrated false-alarm
  rate is a fraction of a percent; a model that fires on most frames is broken) rolls back automatically;
- active: the bundle becomes the one the daemon starts with; the previous ones are kept (``updates.keep``) for
  ``model/rollback``.

Everything the updater knows is in ``<state_dir>/updates/state.json`` (written atomically), so a daemon killed in
any phase starts again on the last active model: an interrupted request is reported as refused (before the
switch) or rolled_back (during probation). An active update that is refused at start (a file no longer matches
its hash) is skipped for the previous model kept for rollback (or, failing those, the config's bundle), reported as
rolled_back (``startup_refused``). A config whose ``bundle`` changed since the last start (a technician installed
another bundle by hand) is obeyed: that bundle replaces the active update, which is kept for ``model/rollback``.
A request_id seen before is answered with its recorded outcome and nothing else happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from deploy.bundle import manifest_sha256
from deploy.durable import write_bytes_atomic
from deploy.engines import probe_device, prune_engine_cache
from deploy.manifest import BundleError, parse_manifest
from deploy.untrusted_json import parse_untrusted_json
from edge_daemon import __version__
from edge_daemon.backends import Backend, BackendError
from edge_daemon.commands import CommandError, ModelRollback, ModelSet, parse_command, request_id_of
from edge_daemon.config import DaemonConfig
from edge_daemon.model import LoadedBundle, load_bundle

log = logging.getLogger("edge_daemon.updater")
MAX_REMEMBERED_REQUESTS = 200
ROLLBACK_RETRY_S = 10.0  # between tries of a rollback whose previous model failed its gate (Updater._roll_back)
FINAL_PHASES = ("active", "refused", "rolled_back")


class Refused(Exception):
    """A request that cannot go on; the message is the reason published with phase "refused"."""


class AlreadyActive(Exception):
    """The requested bundle is the one serving: nothing to do, and the request ends "active" with this message as its
    reason, so that a fleet push retried after a partial failure succeeds on the devices that already switched."""


@dataclass
class Probe:
    """Cumulative counters of the serving pipeline, read at the switch and during probation."""

    frames: int
    anomalous: int
    backend_errors: int
    latency_p99_ms: float | None


class UpdateHost(Protocol):
    """What the updater needs from the daemon (edge_daemon.service implements it)."""

    def serving_bundle(self) -> LoadedBundle: ...

    def make_backends(self, bundle: LoadedBundle) -> list[Backend]: ...  # gated, one per worker; BackendError

    def switch(self, backends: list[Backend], bundle: LoadedBundle) -> None: ...

    def publish_model_state(self, payload: bytes) -> None: ...

    def probe(self) -> Probe: ...

    def engine_build(self, bundle: LoadedBundle) -> str | None: ...  # None: nothing to build; else a failure reason


def update_state_path(state_dir: str | Path) -> Path:
    """Where the updater keeps its state: ``<state_dir>/updates/state.json``."""
    return Path(state_dir) / "updates" / "state.json"


def read_update_state(path: Path) -> dict[str, Any] | None:
    """The saved update state, or None when there is none. ValueError naming the problem when the file cannot be
    read, is not JSON, or lacks what start-up relies on (an ``active`` update and ``history`` entries each with a
    folder ``path``): the daemon sets such a file aside and starts from the config's bundle."""
    if not path.is_file():
        return None
    try:
        data = parse_untrusted_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc)) from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    active, history = data.get("active"), data.get("history", [])
    if not isinstance(history, list):
        raise ValueError("its history is not a list")
    for name, entry in [("active update", active), *(("history entry", e) for e in history)]:
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            raise ValueError(f"its {name} has no path")
    last = data.get("last")
    if last is not None and not (isinstance(last, dict) and isinstance(last.get("phase"), str)):
        raise ValueError("its last outcome has no phase")
    return data


def config_bundle_replaces_update(state: dict[str, Any], config_sha: str) -> bool:
    """True when the config's bundle (manifest sha256 ``config_sha`` now) differs from the one seen at the last start
    while an update is active: the config is the operator's word and wins at this start (``_follow_config_bundle``)."""
    before = state.get("config_sha")
    return before is not None and before != config_sha and state.get("active") is not None


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class Updater:
    """Runs update requests one at a time on its own thread; ``tick()`` (housekeeping) watches probation."""

    def __init__(self, config: DaemonConfig, host: UpdateHost, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.host = host
        self.clock = clock
        self.state_path = update_state_path(config.state_dir)
        self.root = self.state_path.parent
        self.state: dict[str, Any] = {
            "active": None,
            "history": [],
            "pending": None,
            "requests": {},
            "config_sha": None,  # manifest sha256 of the config's bundle at the last start (_follow_config_bundle)
            "last": None,  # the last outcome, answered again on P/model/state at each start
        }
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=16)
        self._lock = threading.RLock()
        self._probation: dict[str, Any] | None = None  # {"bundle", "previous", "since", "baseline": Probe}
        self._startup_failures: list[str] = []  # why each model tried at start was refused (startup_refused)
        self._startup_tried: set[Path] = set()
        self._thread = threading.Thread(target=self._work, name="updater", daemon=True)
        self._load_state()

    # ------------------------------------------------------------------ start-up

    def _load_state(self) -> None:
        try:
            data = read_update_state(self.state_path)
        except ValueError as exc:
            bad = self.state_path.with_suffix(f".bad-{int(time.time())}")
            log.error(
                "update state %s unreadable (%s): kept as %s, starting from the config's bundle",
                self.state_path,
                exc,
                bad.name,
            )
            os.replace(self.state_path, bad)
            return
        if data is None:
            return
        for key in self.state:
            if key in data:
                self.state[key] = data[key]

    def _save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.state_path, json.dumps(self.state, indent=1, sort_keys=True).encode("utf-8"))

    def startup_bundle(self) -> Path:
        """The bundle the daemon must start on: the last active update, else the config's ``bundle``. A config bundle
        that changed since the last start wins over the active update (``_follow_config_bundle``); an active update
        whose folder is gone from disk is skipped as ``startup_refused`` describes.

        A request that was interrupted by a restart is closed here: refused before the switch, rolled back during
        probation (the daemon comes back on the last active model either way). Call once, before serving.
        """
        pending = self.state.get("pending")
        if pending:
            phase = pending.get("phase")
            if phase == "probation":
                self._remember(
                    pending["request_id"],
                    "rolled_back",
                    f"the daemon restarted during probation of {pending.get('version')}; back on the last active model",
                )
            else:
                self._remember(
                    pending["request_id"],
                    "refused",
                    f"interrupted by a daemon restart while {phase}; the active model kept serving",
                )
            self.state["pending"] = None
            self._save_state()
        self._follow_config_bundle()
        active = self.state.get("active")
        if not active:
            return Path(self.config.bundle)
        if not Path(active["path"]).exists():
            fallback = self.startup_refused(Path(active["path"]), f"its folder {active['path']} is gone from disk")
            return fallback if fallback is not None else Path(self.config.bundle)
        return Path(active["path"])

    def _follow_config_bundle(self) -> None:
        """The config's ``bundle`` is the operator's word: when it holds another bundle than at the last start (a new
        path, or new content at the same path), that bundle replaces the active update, which goes to the front of
        the history (``model/rollback`` returns to it) and is reported on P/model/state. Bundles are compared by
        manifest sha256 (read, not verified: loading verifies); an unreadable config bundle changes nothing here."""
        try:
            now = manifest_sha256(Path(self.config.bundle))
        except BundleError:
            return
        before, active = self.state.get("config_sha"), self.state.get("active")
        if before == now:
            return
        replaces = config_bundle_replaces_update(self.state, now)
        self.state["config_sha"] = now
        dropped: list[dict[str, Any]] = []
        if replaces and before is not None and active is not None:  # replaces implies both; mypy does not know
            dropped = self._push_history(active)
            self.state["active"] = None
            why = (
                f"the config's bundle changed (sha {before[:12]} -> {now[:12]}): it replaces the update "
                f"{active.get('version')} (sha {str(active.get('sha'))[:12]}), which model/rollback returns to"
            )
            log.warning("%s", why)
            self.state["last"] = {"request_id": None, "phase": "active", "reason": why, "target": None}
        self._save_state()
        self._delete_unkept(dropped)

    def startup_refused(self, path: Path, reason: str) -> Path | None:
        """``path`` (from ``startup_bundle``, or from an earlier call of this) was refused at start because of the
        bundle itself (``reason``: a file that fails its hash, a signature no longer trusted). Return the next model
        to try, or None when there is nothing else to try (the daemon must not serve what nobody configured).

        The order is the one ``model/rollback`` would take: the active update, then the previous models kept for
        rollback (``updates.keep``, newest first, those still on disk), then the config's ``bundle``. The first
        refusal and every later one are recorded, so that ``start`` publishes them on P/model/state (phase
        ``rolled_back``).

        The state keeps the update as active: the next start tries it again and falls back again, with the same
        message, until a new update replaces it. Nothing is deleted (the files are the evidence).
        """
        active = self.state.get("active")
        if not active:
            return None
        entries = [active, *self.state["history"]]
        paths = [Path(e["path"]) for e in entries]
        if Path(path) not in paths:
            return None  # the config's bundle: nothing comes after it
        self._startup_tried.add(Path(path))
        i = paths.index(Path(path))
        label = "the active update" if i == 0 else "the previous model"
        self._startup_failures.append(
            f"{label} {entries[i].get('version')} (sha {str(entries[i].get('sha'))[:12]}) cannot serve: {reason}"
        )
        later = [j for j in range(i + 1, len(entries)) if paths[j].exists() and paths[j] not in self._startup_tried]
        config_bundle = Path(self.config.bundle)
        if later:
            nxt = paths[later[0]]
            sha = str(entries[later[0]].get("sha"))[:12]
            target = f"back on the previous model {entries[later[0]].get('version')} (sha {sha})"
        elif config_bundle not in self._startup_tried:
            nxt, target = config_bundle, "back on the config's bundle"
        else:
            return None  # the config's bundle was in the history (a folder used in place) and failed already
        why = "; ".join([*self._startup_failures, target])
        log.error("%s", why)
        self.state["last"] = {"request_id": None, "phase": "rolled_back", "reason": why, "target": None}
        self._save_state()
        return nxt

    def start(self) -> None:
        """Start the worker thread and publish the retained state (the interrupted request's outcome, if any)."""
        last = self.state.get("last")
        if last:
            self._publish(last.get("request_id"), last["phase"], last.get("reason"), last.get("target"))
        else:
            self._publish(None, "active", None, None)
        self._prune_disk()
        self._thread.start()

    # ------------------------------------------------------------------ commands (MQTT thread)

    def submit(self, command: str, payload: bytes) -> None:
        """Queue ``model/set`` or ``model/rollback``; a full queue is refused at once. Never raises."""
        try:
            self._queue.put_nowait((command, payload))
        except queue.Full:
            self._publish(request_id_of(payload), "refused", "too many update requests queued; try again later", None)

    def stop(self) -> None:
        """Let the worker thread end after the request in hand (a download in flight resumes after a restart)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            command, payload = item
            try:
                if command == "model/set":
                    self._handle_set(payload)
                else:
                    self._handle_rollback(payload)
            except Exception as exc:  # a bug here must not kill the updater; the request is answered
                log.exception("update request failed")
                self._publish(request_id_of(payload), "refused", f"internal error: {type(exc).__name__}: {exc}", None)

    def _handle_set(self, payload: bytes) -> None:
        try:
            cmd = parse_command(ModelSet, payload)
        except CommandError as exc:
            self._publish(request_id_of(payload), "refused", str(exc), None)
            return
        rid = cmd.request_id
        if rid is None:
            self._publish(None, "refused", "request_id is required for model/set", None)
            return
        if self._replay(rid):
            return
        target = {"version": cmd.version, "sha256": cmd.sha256}
        with self._lock:
            if self._probation is not None or self.state.get("pending"):
                busy = (self.state.get("pending") or {}).get("request_id")
                self._publish(rid, "refused", f"another update ({busy}) is in progress; try again after it", target)
                return
            self.state["pending"] = {
                "request_id": rid,
                "phase": "downloading",
                "version": cmd.version,
                "sha256": cmd.sha256,
                "started": _now_iso(),
            }
            try:
                self._save_state()
            except OSError as exc:  # a full disk: the request cannot be tracked, and must not block later ones
                self.state["pending"] = None
                why = f"cannot write the update state {self.state_path}: {exc.strerror or exc}"
                log.error("update %s refused: %s", rid, why)
                self._publish(rid, "refused", why, target)
                return
        try:
            bundle, backends = self._prepare(rid, cmd, target)
        except Exception as exc:  # a bug must end this request too, or "pending" would refuse every later one
            phase = "refused"
            if isinstance(exc, AlreadyActive):
                phase, reason = "active", str(exc)
                log.info("update %s: %s", rid, exc)
            elif isinstance(exc, Refused):
                reason = str(exc)
                log.warning("update %s refused: %s", rid, exc)
            else:
                reason = f"internal error: {type(exc).__name__}: {exc}"
                log.exception("update %s failed", rid)
            with self._lock:
                self.state["pending"] = None
                self._record(rid, phase, reason, target)
                self._prune_disk()  # the refused bundle, if it was unpacked, and its engine
                self._publish(rid, phase, reason, target)
            return
        self._begin_probation(rid, bundle, backends, target)

    def _set_phase(
        self, rid: str, phase: str, reason: str | None, target: dict[str, Any], progress: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            if self.state.get("pending"):
                self.state["pending"]["phase"] = phase
                self._save_state()
        self._publish(rid, phase, reason, target, progress)

    def _prepare(self, rid: str, cmd: ModelSet, target: dict[str, Any]) -> tuple[LoadedBundle, list[Backend]]:
        """Download, verify, build and gate: the bundle and its gated backends (one per worker), or Refused."""
        from edge_daemon.download import DownloadError, fetch

        cfg = self.config.updates
        self._set_phase(rid, "downloading", None, target)
        last_progress = [0.0]

        def progress(done: int, total: int | None) -> None:
            now = self.clock()
            if now - last_progress[0] >= 1.0:
                last_progress[0] = now
                self._publish(rid, "downloading", None, target, {"bytes": done, "total": total})

        tar = self.root / "downloads" / f"{cmd.sha256}.tar"
        try:
            fetch(
                cmd.url,
                tar,
                expected_sha256=cmd.sha256,
                max_bytes=int(cfg.max_bundle_mb * 1024 * 1024),
                stall_timeout_s=cfg.stall_timeout_s,
                total_timeout_s=cfg.download_timeout_s,
                progress=progress,
            )
        except DownloadError as exc:
            raise Refused(f"download failed: {exc}") from None
        self._set_phase(rid, "verifying", None, target)
        try:
            bundle = load_bundle(tar, list(self.config.trusted_keys), self.root / "unpacked", allow_unsigned=False)
        except BundleError as exc:
            raise Refused(f"bundle refused: {exc}") from None
        finally:
            tar.unlink(missing_ok=True)  # the unpacked, verified folder is what is kept
        if bundle.version != cmd.version:
            raise Refused(f"the command says version {cmd.version!r} but the bundle is {bundle.version!r}")
        serving = self.host.serving_bundle()
        if bundle.sha == serving.sha:
            raise AlreadyActive(f"{bundle.name} {bundle.version} (sha {bundle.sha[:12]}) is already active")
        if bundle.manifest.created < serving.manifest.created and not self.config.allow_downgrade:
            raise Refused(
                f"downgrade refused: {bundle.version} was made {bundle.manifest.created}, before the active "
                f"{serving.version} ({serving.manifest.created}); set allow_downgrade or use model/rollback"
            )
        self._set_phase(rid, "building", None, target)
        failure = self.host.engine_build(bundle)
        if failure:
            raise Refused(f"engine build failed: {failure}")
        self._set_phase(rid, "validating", None, target)
        try:
            backends = self.host.make_backends(bundle)
        except BackendError as exc:
            raise Refused(f"validation failed: {exc}") from None
        return bundle, backends

    def _begin_probation(self, rid: str, bundle: LoadedBundle, backends: list[Backend], target: dict[str, Any]) -> None:
        previous = self.host.serving_bundle()
        with self._lock:
            self.state["pending"].update({"phase": "probation", "path": str(bundle.root), "sha": bundle.sha})
            self._save_state()
            self._probation = {
                "request_id": rid,
                "bundle": bundle,
                "previous": previous,
                "target": target,
                "since": self.clock(),
                "baseline": None,
            }
            self.host.switch(backends, bundle)
            self._probation["baseline"] = self.host.probe()
        log.info(
            "update %s: now serving %s %s on probation for %.0f s",
            rid,
            bundle.name,
            bundle.version,
            self.config.updates.probation_s,
        )
        self._publish(rid, "probation", None, target)

    # ------------------------------------------------------------------ probation (housekeeping thread)

    def tick(self) -> None:
        """Check the model on probation: roll back on trouble, make it active when the window has passed.

        Called by the housekeeping thread, which also feeds the systemd watchdog: while the updater thread holds
        the lock (loading and gating a model for model/set or model/rollback, which can take longer than the
        watchdog's 30 s on a slow device) the tick is skipped, not waited for; the next one comes 0.25 s later.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._tick()
        finally:
            self._lock.release()

    def _tick(self) -> None:
        p = self._probation
        if p is None or p["baseline"] is None:
            return
        if p.get("rollback_reason") is not None:  # a rollback that failed: the model was found bad, never confirm it
            if self.clock() >= p["rollback_retry_at"]:
                self._roll_back(p, p["rollback_reason"])
            return
        cfg = self.config.updates
        now, base = self.host.probe(), p["baseline"]
        frames, anomalous = now.frames - base.frames, now.anomalous - base.anomalous
        errors = now.backend_errors - base.backend_errors
        reason = None
        if errors > 0:
            reason = f"the new model's backend failed {errors} time(s) on live frames"
        elif (
            cfg.max_latency_ms is not None
            and now.latency_p99_ms is not None
            and (now.latency_p99_ms > cfg.max_latency_ms)
        ):
            reason = f"p99 latency {now.latency_p99_ms:.0f} ms is over the budget of {cfg.max_latency_ms:.0f} ms"
        elif frames >= cfg.probation_min_frames and anomalous / frames > cfg.max_anomaly_rate:
            far = p["bundle"].calibration.target_false_alarm_rate
            reason = (
                f"anomaly rate {anomalous / frames:.2f} over {frames} live frames, far above the calibrated "
                f"false-alarm rate {far if far is not None else 'of the bundle'} "
                f"(limit {cfg.max_anomaly_rate:.2f})"
            )
        if reason is not None:
            self._roll_back(p, reason)
        elif self.clock() - p["since"] >= cfg.probation_s:
            self._confirm(p, frames)

    def _confirm(self, p: dict[str, Any], frames: int) -> None:
        bundle: LoadedBundle = p["bundle"]
        previous: LoadedBundle = p["previous"]
        dropped = self._push_history(_entry(previous), also_drop=bundle.sha)
        replaced = self.state.get("active")  # when not ``previous``: the update the daemon fell back from at start
        self.state["active"] = _entry(bundle)
        self.state["pending"] = None
        self._probation = None
        why = f"passed probation ({frames} frames)"
        self._record(p["request_id"], "active", why, p["target"])
        self._delete_unkept([*dropped, replaced])
        self._prune_disk()
        self._publish(p["request_id"], "active", why, p["target"])  # last: "active" means the disk is tidy too
        log.info("update %s: %s %s is active", p["request_id"], bundle.name, bundle.version)

    def _roll_back(self, p: dict[str, Any], reason: str, rollback_rid: str | None = None) -> None:
        """End probation ``p`` on the previous model. ``rollback_rid``: the model/rollback that asked for it, answered
        (and recorded) with the same outcome as the update's own request_id.

        When the previous model fails its gate now (it passed it before: out of memory with two models loaded, a
        device fault), the new model keeps serving, probation stays open and the rollback is tried again every
        ``ROLLBACK_RETRY_S`` by ``tick``, the failure published on P/model/state each time; the model found bad is
        never confirmed. A daemon restart also ends it (``startup_bundle``: back on the last active model)."""
        previous: LoadedBundle = p["previous"]
        try:
            backends = self.host.make_backends(previous)
        except BackendError as exc:  # the old model passed its gate before; this should not happen
            p["rollback_reason"] = reason
            p["rollback_retry_at"] = self.clock() + ROLLBACK_RETRY_S
            why = (
                f"{reason}; but the previous model {previous.version} fails its gate now ({exc}): the new model "
                f"keeps serving, the rollback is tried again in {ROLLBACK_RETRY_S:.0f} s"
            )
            log.error("update %s: %s", p["request_id"], why)
            self._publish(p["request_id"], "probation", why, p["target"])
            if rollback_rid is not None and rollback_rid != p["request_id"]:
                self._publish(rollback_rid, "refused", why, None)
            return
        self.host.switch(backends, previous)
        self.state["pending"] = None
        self._probation = None
        rids = [p["request_id"], *([rollback_rid] if rollback_rid not in (None, p["request_id"]) else [])]
        for rid in rids:
            self._record(rid, "rolled_back", reason, p["target"])
        # The update leaves disk unless it is also a model kept for rollback (a re-push of one): then it stays.
        self._delete_unkept([_entry(p["bundle"])])
        self._prune_disk()
        for rid in rids:
            self._publish(rid, "rolled_back", reason, p["target"])
        log.warning("update %s rolled back: %s", p["request_id"], reason)

    # ------------------------------------------------------------------ model/rollback

    def _handle_rollback(self, payload: bytes) -> None:
        try:
            cmd = parse_command(ModelRollback, payload)
        except CommandError as exc:
            self._publish(request_id_of(payload), "refused", str(exc), None)
            return
        rid = cmd.request_id
        if rid is not None and self._replay(rid):
            return
        with self._lock:
            if self._probation is not None:
                self._roll_back(self._probation, f"rollback requested during probation ({rid})", rollback_rid=rid)
                return
            if self.state.get("pending"):
                self._publish(rid, "refused", "an update is in progress; roll back after it", None)
                return
            if not self.state["history"]:
                self._publish(rid, "refused", "no previous model to go back to", None)
                return
            entry = self.state["history"][0]
            try:
                previous = load_bundle(
                    Path(entry["path"]),
                    list(self.config.trusted_keys),
                    self.root / "unpacked",
                    allow_unsigned=self.config.allow_unsigned,
                )
                backends = self.host.make_backends(previous)
            except (BundleError, BackendError) as exc:
                self._remember(rid, "refused", f"the previous model cannot serve: {exc}", None)
                return
            current = self.host.serving_bundle()
            self.host.switch(backends, previous)
            replaced = self.state.get("active")
            self.state["history"] = self.state["history"][1:]
            self.state["active"] = entry
            why = f"rollback requested: back to {previous.version} from {current.version}"
            self._record(rid, "rolled_back", why, None)
            # Nothing rolls forward (a new model/set does): the update left behind is deleted, like one that is
            # rolled back during probation, or disk would grow with every rollback.
            self._delete_unkept([replaced])
            self._prune_disk()
            self._publish(rid, "rolled_back", why, None)

    # ------------------------------------------------------------------ bookkeeping

    def _replay(self, rid: str) -> bool:
        """A request_id seen before: answer with its recorded outcome and do nothing else."""
        with self._lock:
            known = self.state["requests"].get(rid)
            pending = self.state.get("pending")
        if pending and pending.get("request_id") == rid:
            self._publish(rid, pending["phase"], "already in progress (duplicate request_id)", None)
            return True
        if known:
            self._publish(rid, known["phase"], known["reason"], known.get("target"))
            return True
        return False

    def _remember(self, rid: str | None, phase: str, reason: str | None, target: dict[str, Any] | None = None) -> None:
        """Record the outcome (``_record``) and answer it on P/model/state."""
        self._record(rid, phase, reason, target)
        self._publish(rid, phase, reason, target)

    def _record(self, rid: str | None, phase: str, reason: str | None, target: dict[str, Any] | None = None) -> None:
        """Save ``phase`` as request ``rid``'s outcome (a repeated request gets it again) and as the last one (published
        again at start), without answering yet: a final phase is answered once its clean-up is done."""
        if rid is not None:
            requests = self.state["requests"]
            requests[rid] = {"phase": phase, "reason": reason, "target": target, "at": _now_iso()}
            while len(requests) > MAX_REMEMBERED_REQUESTS:
                requests.pop(next(iter(requests)))
        self.state["last"] = {"request_id": rid, "phase": phase, "reason": reason, "target": target}
        self._save_state()

    def _publish(
        self,
        rid: str | None,
        phase: str,
        reason: str | None,
        target: dict[str, Any] | None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        try:
            model = self.host.serving_bundle().describe()
        except Exception:  # before the first bundle is loaded
            model = None
        body: dict[str, Any] = {
            "request_id": rid,
            "phase": phase,
            "reason": reason,
            "model": model,
            "target": target,
            "daemon_version": __version__,
        }
        if progress is not None:
            body["progress"] = progress
        self.host.publish_model_state(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    def _delete_bundle(self, entry: dict[str, Any]) -> None:
        """Remove an unpacked bundle we own (never anything outside <state_dir>/updates)."""
        path = Path(entry["path"]).resolve()
        if self.root.resolve() in path.parents and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    def _push_history(self, entry: dict[str, Any], *, also_drop: str | None = None) -> list[dict[str, Any]]:
        """Put ``entry`` at the front of the history kept for model/rollback (removing other entries of its sha, and
        of ``also_drop``), cut to ``updates.keep``; return the entries that fell off (``_delete_unkept`` them once
        the state is saved)."""
        history = [entry, *(h for h in self.state["history"] if h["sha"] not in (entry["sha"], also_drop))]
        self.state["history"] = history[: self.config.updates.keep]
        return history[self.config.updates.keep :]

    def _delete_unkept(self, entries: Iterable[dict[str, Any] | None]) -> None:
        """Delete the unpacked bundles of ``entries`` that are neither the active update nor in the history (call
        after saving the state: a crash in between leaks a folder, never loses a kept one)."""
        kept = {e["sha"] for e in [self.state.get("active"), *self.state["history"]] if e}
        for entry in entries:
            if entry and entry["sha"] not in kept:
                self._delete_bundle(entry)

    def _prune_disk(self) -> None:
        """Delete what no model kept on disk needs any more: stale unpacked config bundles, then their engines.
        Never raises: a failure is logged, and the answer that follows the clean-up is still sent."""
        try:
            self._prune_bundle_copies()
            self._prune_downloads()
            self._prune_engine_cache()
        except Exception as exc:  # an unexpected disk problem must not swallow a request's answer
            log.error("disk clean-up failed: %s: %s", type(exc).__name__, exc)

    def _prune_bundle_copies(self) -> None:
        """Delete unpacked bundles that nothing needs: copies of config bundles (``<state_dir>/bundles/<sha>``, one
        per bundle the config ever named as a tar) and updates that were refused or left behind
        (``<state_dir>/updates/unpacked/bundles/<sha>``), unless serving, the active update, one of the
        ``updates.keep`` previous models, or the update in hand. The config's bundle is unpacked again from its tar
        if it is ever needed. Half-done unpacks (``.unpack-*``) are ``load_bundle``'s to clean."""
        entries = [self.state.get("active"), *self.state["history"], self.state.get("pending")]
        keep = {
            self.host.serving_bundle().root.resolve(),
            *(Path(e["path"]).resolve() for e in entries if e and "path" in e),
        }
        if self._probation is not None:
            keep.add(self._probation["bundle"].root.resolve())
        for folder in (Path(self.config.state_dir) / "bundles", self.root / "unpacked" / "bundles"):
            if not folder.is_dir():
                continue
            for copy in folder.iterdir():
                if copy.name.startswith(".") or not copy.is_dir() or copy.is_symlink() or copy.resolve() in keep:
                    continue
                shutil.rmtree(copy, ignore_errors=True)
                log.info("removed %s, an unpacked bundle no longer configured, active or kept for rollback", copy)

    def _prune_downloads(self) -> None:
        """Delete what refused or interrupted downloads left in ``updates/downloads/`` (each up to
        ``updates.max_bundle_mb``): everything but the update in hand's files and the newest ``.part``, which a push
        of the same bundle again resumes (edge_daemon.download)."""
        folder = self.root / "downloads"
        if not folder.is_dir():
            return
        pending = self.state.get("pending") or {}
        files = [f for f in folder.iterdir() if f.is_file() and not f.is_symlink()]
        parts = sorted((f for f in files if f.name.endswith(".part")), key=lambda f: f.stat().st_mtime)
        keep = {f"{pending.get('sha256')}.tar", f"{pending.get('sha256')}.tar.part", *(f.name for f in parts[-1:])}
        for f in files:
            if f.name not in keep:
                f.unlink(missing_ok=True)
                log.info("removed %s, left by a download that did not become an update", f)

    def _prune_engine_cache(self) -> None:
        """Delete cached TensorRT engines of models no longer on disk (``deploy.engines.prune_engine_cache``).

        Kept: the engines of every bundle under ``<state_dir>/bundles`` and ``<state_dir>/updates/unpacked/bundles``
        (the config's bundle unpacked, the active update, the ``updates.keep`` previous ones) and of the config's
        bundle when it is a folder. A manifest that cannot be read stops the pruning (its engines cannot be told
        apart), with a warning.
        """
        state_dir = Path(self.config.state_dir)
        folders = [*(state_dir / "bundles").glob("*"), *(self.root / "unpacked" / "bundles").glob("*")]
        if Path(self.config.bundle).is_dir():
            folders.append(Path(self.config.bundle))
        keep: set[str] = set()
        for folder in folders:
            manifest = folder / "manifest.json"
            if not manifest.is_file():
                continue  # a half-unpacked ``.unpack-*`` folder, not a bundle
            try:
                keep.add(parse_manifest(manifest.read_bytes()).files["model.onnx"].sha256)
            except (OSError, BundleError, KeyError) as exc:
                log.warning("engine cache not pruned: cannot read the onnx sha of %s (%s)", folder, exc)
                return
        removed = prune_engine_cache(state_dir / "engines", keep, device=probe_device())
        if removed:
            log.info(
                "engine cache: removed %s (models no longer kept, or built for another TensorRT or GPU)",
                ", ".join(p.name for p in removed),
            )


def _entry(bundle: LoadedBundle) -> dict[str, Any]:
    return {
        "path": str(bundle.root),
        "sha": bundle.sha,
        "name": bundle.name,
        "version": bundle.version,
        "created": bundle.manifest.created,
    }
