"""Events left open by a crash are ended at the next start (DESIGN.md: "An open event is always closed").

A SIGKILL, a watchdog abort, an OOM kill or a power cut ends the daemon with no chance to send ``end`` for the events
that were open. Their ``start`` (and updates) are in the spool and reach the broker, so a consumer (an HMI's "defect
active", a reject gate) would wait for an ``end`` for ever. ``OpenEventLog`` keeps the last message sent for each
open event in ``<state_dir>/open_events.json`` (written atomically and durably when an event starts, is updated or
ends), and at the next start ``ends_after_crash`` turns each one left there into its ``end``: the same event_id, the
next seq, ``reason: "restart"``, ``ended_at`` the time of that start (the crash time is not known, so
``duration_s`` runs to it), everything else as last sent.

A ``start`` or ``update`` is noted before it is handed to the spool and an ``end`` after it (``send_noted``): a crash
between the two can cost at most an ``end`` that a consumer ignores (for an event whose ``start`` never went out, or
a second ``end``), never a ``start`` without an ``end``. (Noting after the spool left that window open for as long as
the link's sender thread took to deliver the ``start`` before the note was written: seconds on a loaded device.)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from deploy.durable import write_bytes_atomic
from edge_daemon.events import Outgoing, iso_utc

log = logging.getLogger(__name__)
FILE_NAME = "open_events.json"


class OpenEventLog:
    """The last message of every open event, on disk. Thread-safe (scoring workers share it)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE_NAME
        self._open: dict[str, dict[str, Any]] = {}  # event_id -> its last message
        self._lock = threading.Lock()

    def ends_after_crash(self, now_wall: float) -> list[Outgoing]:
        """The ``end`` of each event the last run left open, in start order, and forget them (call once at start,
        before any new event). An unreadable file is logged and set aside: its events cannot be ended."""
        if not self.path.exists():
            return []
        try:
            left = json.loads(self.path.read_bytes())
            if not isinstance(left, dict) or not all(isinstance(m, dict) for m in left.values()):
                raise ValueError("not an object of messages")
            ends = [_end_of(message, now_wall) for message in left.values()]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{FILE_NAME}.bad")
            log.error("%s is unreadable (%s): set aside as %s; its events stay without an end", self.path, exc, aside)
            self.path.replace(aside)
            return []
        with self._lock:
            self._open.clear()
            self._save()
        for event_id in left:
            log.warning("ending event %s, left open by the last run (a crash or power cut)", event_id)
        return ends

    def send_noted(self, message: Outgoing, send: Callable[[Outgoing], None]) -> None:
        """``send(message)`` (hand it to the spool), keeping the record right around it: a start or update is recorded
        before it is sent, an end after (module docstring). Crops are sent unrecorded."""
        if message.kind != "event":
            send(message)
            return
        body = json.loads(message.payload)
        if body["type"] != "end":
            with self._lock:
                self._open[body["event_id"]] = body
                self._save()
            send(message)
            return
        send(message)
        with self._lock:
            if self._open.pop(body["event_id"], None) is not None:
                self._save()

    def _save(self) -> None:
        try:
            write_bytes_atomic(self.path, json.dumps(self._open, separators=(",", ":")).encode("utf-8"))
        except OSError as exc:  # a full disk must not stop scoring: the events still go out, only this is lost
            log.error("cannot record open events in %s: %s", self.path, exc.strerror or exc)


def _end_of(last: dict[str, Any], now_wall: float) -> Outgoing:
    started = datetime.fromisoformat(str(last["started_at"]).replace("Z", "+00:00")).timestamp()
    end = {
        **last,
        "type": "end",
        "seq": int(last["seq"]) + 1,
        "ts": iso_utc(now_wall),
        "ended_at": iso_utc(now_wall),
        "duration_s": round(max(0.0, now_wall - started), 3),
        "reason": "restart",
    }
    end.pop("replayed", None)
    payload = json.dumps(end, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Outgoing(suffix=f"{last['camera']}/events", payload=payload, kind="event")
