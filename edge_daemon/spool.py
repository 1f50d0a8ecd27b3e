"""The outbox: every event and crop is written here before it is published, and deleted only once the
broker has acknowledged it (QoS 1 PUBACK), so nothing is lost across broker outages, SIGKILL or power loss.

One SQLite file in WAL mode. ``synchronous="FULL"`` (the default) fsyncs the WAL at every commit, so a row
that :meth:`Spool.put` returned survives power loss; ``"NORMAL"`` survives a crash of the process (SIGKILL)
but may lose the last transactions on power loss, and is much cheaper on slow storage (DESIGN.md: 21-58 us
per insert+delete with NORMAL, 0.1-8 ms per fsync with FULL). Events are rare, so FULL is the default.

The spool is bounded by ``max_bytes`` of payload (SQLite's own pages and the WAL add a little on disk).
When a new message does not fit, the oldest crops are dropped first; events are dropped (oldest first)
only when no crop is left, and a crop never evicts an event: a new crop that cannot fit by dropping older
crops is itself dropped. Every drop is counted, and the counts persist in the file.

Row ids only grow (AUTOINCREMENT), even after every row was deleted: a sender may remember "everything
up to id N was handed over" and never see a new row below N.

A spool of ours that is damaged (a torn write on SD/eMMC after a power cut: its header unreadable, or
``PRAGMA quick_check`` failing at open, or SQLite reporting a malformed page while running) is set aside as
``<name>.corrupt-<unix time>`` (with its -wal and -shm) and a new spool is started, logged as an error: every row
that can still be read from the damaged file (walking the table from both ends, so one bad page loses only the rows
on it) is copied into the new one with its id, and the operation that met the damage is run again. The daemon keeps
running and spooling instead of refusing to start for ever or publishing without the outbox, row ids keep growing
from the highest one handed out, and the damaged file stays for whoever wants to recover more from it. A file that
is not ours (another application's database, any other file) is never touched: that stays a SpoolError.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["KINDS", "SpoolError", "SpooledMessage", "Spool"]

log = logging.getLogger(__name__)

KINDS = ("event", "crop")
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# PRAGMA application_id marks the file as ours ("EDSP"), so that a path pointing at another application's
# database is refused instead of having tables added to it.
APPLICATION_ID = 0x45445350
SCHEMA_VERSION = 1
_COLUMNS = "id, topic, payload, kind, qos, created, attempts, size"
_SALVAGE_CHUNK = 256  # rows copied per transaction from a damaged spool
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL
);
CREATE INDEX outbox_kind ON outbox (kind, id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SpoolError(RuntimeError):
    """The spool file cannot be used: not a spool, not writable, disk full, closed. The message names the file."""


class _Damaged(Exception):
    """A spool of ours that SQLite finds damaged (set aside and started afresh: module docstring)."""


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    text = str(e).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


@dataclass(frozen=True)
class SpooledMessage:
    """One stored message. ``created`` is unix time in seconds; ``attempts`` counts the connections that
    carried the message without its acknowledgement (see :meth:`Spool.mark_attempted`)."""

    id: int
    topic: str
    payload: bytes
    kind: str
    qos: int
    created: float
    attempts: int


class Spool:
    """A bounded, durable FIFO of MQTT messages (the outbox). Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, max_bytes: int, *, synchronous: str = "FULL") -> None:
        """Open or create the spool at ``path`` (parent directories are created).

        ``max_bytes``: bound on the sum of stored payload sizes, in bytes (> 0).
        ``synchronous``: SQLite's synchronous mode, OFF | NORMAL | FULL | EXTRA (module docstring).
        Raises :class:`SpoolError` when the file is not a spool (another file or another SQLite database)
        or cannot be written, ``ValueError`` on bad arguments.
        """
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"spool synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._count = 0
        self._bytes = 0
        self._conn: sqlite3.Connection | None = None
        self._sync = sync
        self._highest_id = 0  # the highest row id handed out by this object: a replacement spool continues above it
        self.set_aside: Path | None = None  # where a damaged spool of ours was last moved, if one was
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot create its directory: {e}") from e
        if self.path.is_dir():
            raise SpoolError(f"spool {self.path} is a directory, not a file")
        try:
            self._open(sync)
        except _Damaged as damage:
            self._replace_damaged(str(damage))

    def _replace_damaged(self, why: str) -> None:
        """Set the damaged file aside, open a new spool in its place holding every row still readable from it, with
        ids continuing above the highest handed out. SpoolError when that fails too."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.set_aside = self._set_aside()
        rows = _salvage(self.set_aside)
        try:
            self._open(self._sync)
        except _Damaged as again:
            raise SpoolError(f"spool {self.path}: a new spool is damaged too ({again}); is the disk failing?") from None
        conn = self._db()
        highest = max([self._highest_id, *(r[0] for r in rows)])
        try:  # first, on its own: whatever happens to the copy, new ids continue above every id handed out
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (highest,))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._fail("starting a new spool after damage", e) from e
        copied = 0
        try:  # in chunks, so that a disk too full for all of it keeps what fitted
            for start in range(0, len(rows), _SALVAGE_CHUNK):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows[start : start + _SALVAGE_CHUNK],
                )
                conn.execute("COMMIT")
                copied = min(len(rows), start + _SALVAGE_CHUNK)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the copy's WAL would stay as big as the spool
        except sqlite3.Error as e:
            self._fail("copying the readable rows of the damaged spool", e)
            log.error(
                "spool %s: copied %d of the %d readable message(s) before %s; the rest stay in %s",
                self.path,
                copied,
                len(rows),
                e,
                self.set_aside.name,
            )
        self._reload_counts()
        log.error(
            "spool %s is damaged (%s): set aside as %s; a new spool serves with the %d message(s) that could still be "
            "read from it (%d bytes)",
            self.path,
            why,
            self.set_aside.name,
            self._count,
            self._bytes,
        )

    def _guarded(self, what: str, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` on the connection under the lock. A failure rolls back and resynchronises the counters
        (SpoolError naming ``what``); damage found on the way replaces the file (``_replace_damaged``) and runs
        ``body`` once more on the new spool."""
        with self._lock:
            try:
                return body(self._db())
            except sqlite3.Error as e:
                error = self._fail(what, e)
                if not (isinstance(e, sqlite3.DatabaseError) and _is_corruption(e)):
                    raise error from e
                damage = str(e)
            self._replace_damaged(damage)
            try:
                return body(self._db())
            except sqlite3.Error as e:
                raise self._fail(what, e) from e

    def _open(self, sync: str) -> None:
        """Connect and set up; SpoolError (unusable, not ours) or _Damaged (ours, damaged), the connection closed."""
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: cannot open: {e}") from e
        try:
            self._setup(sync)
        except (sqlite3.Error, SpoolError, _Damaged) as e:
            self._conn.close()
            self._conn = None
            if isinstance(e, sqlite3.DatabaseError) and _is_corruption(e) and self._marked_ours():
                raise _Damaged(str(e)) from None
            if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
                raise SpoolError(f"spool {self.path} is not a spool: the file is not an SQLite database") from e
            if isinstance(e, sqlite3.Error):
                raise SpoolError(f"spool {self.path}: cannot be used ({e}); is it writable?") from e
            raise

    def _marked_ours(self) -> bool:
        """Whether the file's SQLite header still carries our application_id (bytes 68-71), whatever else is torn."""
        try:
            with open(self.path, "rb") as f:
                header = f.read(72)
        except OSError:
            return False
        return len(header) == 72 and int.from_bytes(header[68:72], "big") == APPLICATION_ID

    def _set_aside(self) -> Path:
        """Move the damaged spool and its -wal/-shm to ``<name>.corrupt-<unix time>[.<n>][-wal|-shm]`` (never over an
        earlier one); its new path."""
        stamp = int(time.time())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while any(target.with_name(target.name + s).exists() for s in ("", "-wal", "-shm")):  # never overwrite one
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
        for suffix in ("-wal", "-shm", ""):  # the main file last: until it moves, a restart finds the damage again
            source = self.path.with_name(self.path.name + suffix)
            if source.exists():
                try:
                    source.replace(target.with_name(target.name + suffix))
                except OSError as e:
                    raise SpoolError(f"spool {self.path} is damaged and cannot be moved away: {e}") from e
        return target

    def _setup(self, sync: str) -> None:
        conn = self._db()
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise SpoolError(
                f"spool {self.path} is an SQLite database of something else (application_id {app_id:#x}, "
                f"tables {sorted(tables)}), not an edge-inspect spool; refusing to touch it"
            )
        if app_id == APPLICATION_ID:
            check = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
            if check != ["ok"]:
                raise _Damaged(" ".join(" ".join(map(str, check)).split()))  # one line
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool {self.path}: cannot switch to WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if app_id != APPLICATION_ID:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            else:
                schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if schema is None or schema[0] != SCHEMA_VERSION:
                    raise SpoolError(
                        f"spool {self.path} has schema {schema[0] if schema else None}, this daemon reads "
                        f"{SCHEMA_VERSION}; move the file away to start a new spool"
                    )
            # A real write at open: a read-only file or directory fails here, not at the first event.
            self._bump_meta("opens", 1)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._reload_counts()
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._highest_id = max(self._highest_id, int(seq[0]) if seq else 0)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(f"spool {self.path} is closed")
        return self._conn

    def _bump_meta(self, key: str, delta: int) -> None:
        self._db().execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, delta),
        )

    def _reload_counts(self) -> None:
        count, size = self._db().execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(count), int(size)

    def _fail(self, what: str, e: sqlite3.Error) -> SpoolError:
        """Roll back whatever was open and resynchronise the in-memory counters after a failed write."""
        conn = self._conn
        if conn is not None:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._reload_counts()
            except sqlite3.Error:
                pass
        return SpoolError(f"spool {self.path}: {what} failed: {e}")

    def put(self, topic: str, payload: bytes, kind: str, qos: int = 1) -> int:
        """Store one message durably (per ``synchronous``) and return its row id (> 0).

        Makes room first when the spool would exceed ``max_bytes`` (module docstring). A message that
        cannot be stored (larger than ``max_bytes`` on its own, or a crop when only events are left to
        drop) is counted as dropped, logged, and 0 is returned. Raises :class:`SpoolError` when the
        database fails (disk full, I/O error), ``ValueError`` on a bad kind or QoS.
        """
        if kind not in KINDS:
            raise ValueError(f"spool kind must be one of {KINDS}, got {kind!r}")
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos!r}")
        data = bytes(payload)
        size = len(data)

        def store(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            evict = self._plan_eviction(size, kind)
            if evict is None:
                self._bump_meta(f"dropped_{kind}s", 1)
                conn.execute("COMMIT")
                log.warning(
                    "spool full: dropped a new %s of %d bytes on %s (max %d bytes, %d bytes of events stored)",
                    kind,
                    size,
                    topic,
                    self.max_bytes,
                    self._bytes,
                )
                return 0
            freed = 0
            for kind_dropped, ids_sizes in evict.items():
                if ids_sizes:
                    conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i, _ in ids_sizes])
                    self._bump_meta(f"dropped_{kind_dropped}s", len(ids_sizes))
                    freed += sum(s for _, s in ids_sizes)
            cur = conn.execute(
                "INSERT INTO outbox (topic, payload, kind, qos, created, size) VALUES (?, ?, ?, ?, ?, ?)",
                (topic, data, kind, qos, time.time(), size),
            )
            conn.execute("COMMIT")
            n_evicted = sum(len(v) for v in evict.values())
            self._count += 1 - n_evicted
            self._bytes += size - freed
            if n_evicted:
                log.warning(
                    "spool full (max %d bytes): dropped the oldest %d crop(s) and %d event(s)",
                    self.max_bytes,
                    len(evict["crop"]),
                    len(evict["event"]),
                )
            row_id = cur.lastrowid
            assert row_id is not None
            self._highest_id = max(self._highest_id, int(row_id))
            return int(row_id)

        return self._guarded("put", store)

    def _plan_eviction(self, size: int, kind: str) -> dict[str, list[tuple[int, int]]] | None:
        """Rows to delete, oldest crops first, so that ``size`` more bytes fit; None: drop the new message."""
        plan: dict[str, list[tuple[int, int]]] = {"crop": [], "event": []}
        need = self._bytes + size - self.max_bytes
        if need <= 0:
            return plan
        if size > self.max_bytes:
            return None
        conn = self._db()
        for victim in ("crop", "event"):
            if victim == "event" and kind == "crop":
                return None  # a crop never evicts an event
            for row_id, row_size in conn.execute("SELECT id, size FROM outbox WHERE kind = ? ORDER BY id", (victim,)):
                plan[victim].append((int(row_id), int(row_size)))
                need -= int(row_size)
                if need <= 0:
                    return plan
        return None

    def pending(self, after_id: int = 0, limit: int = 100) -> list[SpooledMessage]:
        """Up to ``limit`` stored messages with id > ``after_id``, in id order (the publishing order)."""
        rows = self._guarded(
            "read",
            lambda conn: conn.execute(
                "SELECT id, topic, payload, kind, qos, created, attempts FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (int(after_id), int(limit)),
            ).fetchall(),
        )
        return [SpooledMessage(int(r[0]), r[1], bytes(r[2]), r[3], int(r[4]), float(r[5]), int(r[6])) for r in rows]

    def mark_attempted(self, ids: Iterable[int]) -> None:
        """Add one to ``attempts`` of each row in ``ids`` (rows that no longer exist are ignored)."""
        params = [(int(i),) for i in ids]
        if not params:
            return

        def mark(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", params)
            conn.execute("COMMIT")

        self._guarded("mark_attempted", mark)

    def ack(self, row_id: int) -> None:
        """Delete one acknowledged row; a row that is already gone (dropped, acked twice) is ignored."""
        self.ack_many((row_id,))

    def ack_many(self, ids: Iterable[int]) -> None:
        """Delete several acknowledged rows in one transaction (one fsync with FULL)."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return

        def delete(conn: sqlite3.Connection) -> None:
            removed = freed = 0
            conn.execute("BEGIN IMMEDIATE")
            for row_id in wanted:
                row = conn.execute("SELECT size FROM outbox WHERE id = ?", (row_id,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                    removed += 1
                    freed += int(row[0])
            conn.execute("COMMIT")
            self._count -= removed
            self._bytes -= freed

        self._guarded("ack", delete)

    def last_id(self) -> int:
        """The highest row id ever assigned (0 for a new spool), whether or not that row still exists."""
        row = self._guarded(
            "read", lambda conn: conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        )
        return int(row[0]) if row else 0

    def depth(self) -> tuple[int, int]:
        """(stored messages, stored payload bytes)."""
        with self._lock:
            return self._count, self._bytes

    @property
    def dropped(self) -> dict[str, int]:
        """Messages dropped because the spool was full, since the file was created: {"crops": n, "events": n}."""
        rows = dict(
            self._guarded(
                "read",
                lambda conn: conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('dropped_crops', 'dropped_events')"
                ).fetchall(),
            )
        )
        return {"crops": int(rows.get("dropped_crops", 0)), "events": int(rows.get("dropped_events", 0))}

    def close(self) -> None:
        """Close the file (idempotent). Rows not acknowledged stay for the next open."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("spool %s: checkpoint at close failed: %s", self.path, e)
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _salvage(damaged: Path) -> list[tuple[int, str, bytes, str, int, float, int, int]]:
    """Every outbox row that can still be read from a damaged spool file (opened read-only, never changed), in id
    order. The table is walked from the lowest id up and from the highest down, each until the first unreadable
    page, so one bad page loses only the rows on it and after it in one direction; empty when nothing can be read."""
    found: dict[int, tuple[int, str, bytes, str, int, float, int, int]] = {}
    try:
        conn = sqlite3.connect(f"{damaged.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return []
    try:
        for order in ("ASC", "DESC"):
            try:
                for r in conn.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id {order}"):
                    if r[3] in KINDS and isinstance(r[2], bytes) and isinstance(r[1], str):
                        found[int(r[0])] = (int(r[0]), r[1], r[2], r[3], int(r[4]), float(r[5]), int(r[6]), len(r[2]))
            except (sqlite3.Error, TypeError, ValueError):
                continue
    finally:
        conn.close()
    return [found[i] for i in sorted(found)]
