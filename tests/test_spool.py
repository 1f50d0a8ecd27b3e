"""The outbox (edge_daemon.spool): order, durability across reopen and SIGKILL, the byte bound, bad files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edge_daemon.spool import Spool, SpoolError

REPO = Path(__file__).resolve().parents[1]


def test_put_pending_ack_in_id_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", 1_000_000) as spool:
        ids = [spool.put(f"p/cam0/events/{i}", f"payload {i}".encode(), "event") for i in range(10)]
        assert ids == sorted(ids) and len(set(ids)) == 10
        assert spool.depth() == (10, sum(len(f"payload {i}") for i in range(10)))

        rows = spool.pending()
        assert [r.id for r in rows] == ids
        assert [r.payload for r in rows] == [f"payload {i}".encode() for i in range(10)]
        assert all(r.kind == "event" and r.qos == 1 and r.attempts == 0 and r.created > 0 for r in rows)
        assert [r.id for r in spool.pending(after_id=ids[3], limit=2)] == ids[4:6]

        spool.ack(ids[0])
        spool.ack_many([ids[5], ids[6]])
        spool.ack(ids[5])  # twice: ignored
        spool.ack(999_999)  # never existed: ignored
        assert [r.id for r in spool.pending()] == [i for i in ids if i not in (ids[0], ids[5], ids[6])]
        assert spool.depth()[0] == 7

        spool.mark_attempted([ids[1], ids[1], ids[2]])
        attempts = {r.id: r.attempts for r in spool.pending()}
        assert attempts[ids[1]] == 2 and attempts[ids[2]] == 1 and attempts[ids[3]] == 0

        spool.ack_many(r.id for r in spool.pending())
        assert spool.depth() == (0, 0) and spool.pending() == []
        # Ids never go back, even once the table is empty: a sender may remember "handed over up to N".
        assert spool.put("p/x", b"new", "crop") > ids[-1]
        assert spool.last_id() > ids[-1]


def test_rows_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "spool.db"  # parents are created
    spool = Spool(path, 1_000_000)
    for i in range(20):
        spool.put(f"p/cam{i % 2}/events", bytes([i]) * (i + 1), "crop" if i % 3 == 0 else "event")
    spool.mark_attempted([r.id for r in spool.pending(limit=3)])
    before = spool.pending()
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        spool.put("p/x", b"", "event")

    with Spool(path, 1_000_000) as again:
        assert again.pending() == before
        assert again.depth() == (20, sum(range(1, 21)))
        assert [r.attempts for r in again.pending(limit=4)] == [1, 1, 1, 0]


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_rows_survive_sigkill_of_the_writer(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "spool.db"
    n = 300
    child = textwrap.dedent(
        f"""
        import os, signal
        from edge_daemon.spool import Spool
        spool = Spool({str(path)!r}, 10_000_000, synchronous={synchronous!r})
        for i in range({n}):
            spool.put("p/cam0/events", b'{{"n": %d}}' % i, "event")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with Spool(path, 10_000_000) as spool:
        rows = spool.pending(limit=10 * n)
        assert [r.payload for r in rows] == [b'{"n": %d}' % i for i in range(n)]
        assert spool.depth()[0] == n


def test_full_spool_drops_oldest_crops_before_any_event(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1000)
    e1 = spool.put("p/e", b"e" * 200, "event")
    c1 = spool.put("p/c", b"1" * 300, "crop")
    e2 = spool.put("p/e", b"f" * 200, "event")
    c2 = spool.put("p/c", b"2" * 300, "crop")  # 1000 bytes: full
    assert spool.depth() == (4, 1000) and spool.dropped == {"crops": 0, "events": 0}

    e3 = spool.put("p/e", b"g" * 250, "event")  # needs 250 bytes: the oldest crop (300) goes
    assert [r.id for r in spool.pending()] == [e1, e2, c2, e3]  # c1 is gone
    assert c1 < c2
    assert spool.dropped == {"crops": 1, "events": 0}

    c3 = spool.put("p/c", b"3" * 300, "crop")  # needs 250 more: crop c2 goes, never an event
    assert [r.id for r in spool.pending()] == [e1, e2, e3, c3]
    assert spool.dropped == {"crops": 2, "events": 0}

    assert spool.put("p/c", b"4" * 400, "crop") == 0  # c3 is not enough and a crop never evicts an event
    assert [r.id for r in spool.pending()] == [e1, e2, e3, c3]
    assert spool.dropped == {"crops": 3, "events": 0}

    e4 = spool.put("p/e", b"h" * 600, "event")  # the crop, then the oldest events
    assert [r.id for r in spool.pending()] == [e3, e4]
    assert spool.dropped == {"crops": 4, "events": 2}
    assert spool.depth() == (2, 850)

    assert spool.put("p/e", b"x" * 1001, "event") == 0  # larger than the whole spool
    assert spool.dropped == {"crops": 4, "events": 3}
    spool.close()

    with Spool(path, 1000) as again:  # the drop counts persist
        assert again.dropped == {"crops": 4, "events": 3}
        assert again.depth() == (2, 850)


def test_concurrent_writers(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10_000_000, synchronous="NORMAL")

    def write(k: int) -> None:
        for i in range(100):
            spool.put(f"p/{k}", b"%d-%d" % (k, i), "event")

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = spool.pending(limit=1000)
    assert len(rows) == 400 and len({r.id for r in rows}) == 400
    for k in range(4):  # each writer's rows are in its own order
        assert [r.payload for r in rows if r.topic == f"p/{k}"] == [b"%d-%d" % (k, i) for i in range(100)]
    spool.close()


def test_clear_errors_for_files_that_are_not_spools(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(SpoolError, match="not an SQLite database"):
        Spool(text, 1000)
    assert text.read_bytes() == b"this is not a database\n" * 200  # untouched

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (name TEXT)")
    with pytest.raises(SpoolError, match="something else"):
        Spool(other, 1000)

    with pytest.raises(SpoolError, match="is a directory"):
        Spool(tmp_path, 1000)

    with pytest.raises(ValueError, match="synchronous"):
        Spool(tmp_path / "s.db", 1000, synchronous="SOMETIMES")
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path / "s.db", 0)
    with Spool(tmp_path / "s.db", 1000) as spool, pytest.raises(ValueError, match="kind"):
        spool.put("p/x", b"", "picture")


def test_a_damaged_spool_of_ours_is_set_aside_and_a_new_one_serves(tmp_path: Path) -> None:
    """A torn write after a power cut: the header (first 16 bytes) or b-tree pages unreadable. The daemon must keep
    spooling (it refused to start for ever: exit 2, and systemd does not restart that), the damaged file kept."""
    import os

    for damage in ("header", "pages"):
        path = tmp_path / damage / "spool.db"
        with Spool(path, 10_000_000) as spool:
            for i in range(200):
                spool.put(f"p/cam0/events/{i}", os.urandom(3000), "event")
        with sqlite3.connect(path) as conn:  # fold the WAL in, so that the damage is in the file itself
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page = conn.execute("PRAGMA page_size").fetchone()[0]
        data = bytearray(path.read_bytes())
        if damage == "header":
            data[:16] = bytes(16)
        else:
            for n in (1, 2, 3):
                data[n * page : n * page + 16] = b"\xff" * 16
        path.write_bytes(data)
        with Spool(path, 10_000_000) as spool:
            assert spool.set_aside is not None and spool.set_aside.name.startswith("spool.db.corrupt-")
            assert spool.set_aside.read_bytes() == bytes(data)
            assert spool.depth() == (0, 0)
            row = spool.put("p/cam0/events", b"{}", "event")
            assert [m.id for m in spool.pending()] == [row]
        with Spool(path, 10_000_000) as spool:  # the new one is sound
            assert spool.set_aside is None and spool.depth() == (1, 2)


def test_damage_found_while_running_keeps_every_readable_message(tmp_path: Path) -> None:
    """Pages torn under a running daemon (a flash cell failing, a torn write of another process): SQLite reports
    'malformed' at the next read. The spool used to raise on every call from then on, so events went out without the
    outbox and were lost while the broker was away. Now the file is set aside, the rows still readable move to a new
    spool with their ids, the call is answered, and new ids continue above the old ones."""
    import os

    path = tmp_path / "spool.db"
    payloads = {}
    with Spool(path, 100_000_000) as spool:
        for i in range(2000):  # ~6 MB: more than SQLite's page cache, so the reads below go to the file
            payloads[spool.put(f"p/cam0/events/{i}", os.urandom(3000), "event")] = i
        with sqlite3.connect(path) as other:
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page = other.execute("PRAGMA page_size").fetchone()[0]
        middle = path.stat().st_size // page // 2
        with open(path, "r+b") as f:  # in place: the spool's open file sees it
            for n in range(middle, middle + 3):
                f.seek(n * page)
                f.write(b"\xff" * 64)
        rows = spool.pending(limit=5000)
        assert spool.set_aside is not None and spool.set_aside.name.startswith("spool.db.corrupt-")
        assert spool.set_aside.is_file()
        # three bad pages hold a handful of rows; everything on either side of them is kept, ids and bytes unchanged
        assert 1990 <= len(rows) < 2000
        assert all(payloads[m.id] == int(m.topic.rsplit("/", 1)[1]) for m in rows)
        assert spool.depth() == (len(rows), 3000 * len(rows))
        new = spool.put("p/cam0/events/new", b"{}", "event")
        assert new > max(payloads)
        spool.ack_many([m.id for m in rows])
        assert [m.id for m in spool.pending()] == [new]
    with Spool(path, 100_000_000) as spool:  # the new file is sound and remembers its ids
        assert spool.set_aside is None and spool.last_id() == new and spool.depth() == (1, 2)


def test_damaged_spools_set_aside_in_the_same_second_are_all_kept(tmp_path: Path) -> None:
    """Set-aside names carried whole seconds, so a second damage within the same second replaced the first damaged
    file, which the docstring promises to keep for recovery."""
    path = tmp_path / "spool.db"
    aside = []
    for round_ in range(3):
        with Spool(path, 10_000_000) as spool:
            spool.put("p/cam0/events", f"round {round_}".encode(), "event")
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = bytearray(path.read_bytes())
        data[:16] = bytes(16)
        path.write_bytes(data)
        with Spool(path, 10_000_000) as spool:
            assert spool.set_aside is not None
            aside.append(spool.set_aside)
    assert len(set(aside)) == 3 and all(p.is_file() for p in aside), aside
