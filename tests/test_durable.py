"""deploy.durable: a replaced file is its old or its new content, never torn, and no temporary file is left."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deploy.durable import atomic_file, fsync_tree, write_bytes_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_atomic_replaces_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    write_bytes_atomic(target, b"secret", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old checkpoint")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as f:
        f.write(b"half of a new ch")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old checkpoint"
    assert _leftovers(tmp_path) == []


def test_missing_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "absent" / "x.json", b"{}")


def test_fsync_tree_walks_nested_folders(tmp_path: Path) -> None:
    (tmp_path / "engines" / "sm87").mkdir(parents=True)
    (tmp_path / "engines" / "sm87" / "a.plan").write_bytes(b"x")
    (tmp_path / "model.onnx").write_bytes(b"y")
    fsync_tree(tmp_path)  # opens every file read-only: nothing changes
    assert (tmp_path / "model.onnx").read_bytes() == b"y"
