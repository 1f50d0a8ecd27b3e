"""Writes that survive a crash or a power cut: a file is either its old content or its new content, never torn.

The recipe: write a temporary file in the same folder, ``fsync`` it, ``os.replace`` it onto the
target, then ``fsync`` the folder so the rename itself is on disk. Without the first fsync a power cut
shortly after the rename can leave a zero-length or partly written file under the final name (ext4
with ``auto_da_alloc`` mitigates only some cases; other file systems, none); without the second the
rename may be lost and the old file come back. An edge device is switched off at the breaker, so
everything the daemon keeps (update state, unpacked bundles, engine caches) is written this way.

Standard library only (the daemon runs on Python 3.10).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """fsync the folder ``path`` so renames and creations inside it are durable. Best effort: some file systems
    (and Windows) cannot open or fsync a folder, and then there is nothing more to do."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file to write; on a normal exit it becomes ``path`` durably (see the module docstring).

    The temporary file is ``.<name>.<random>.tmp`` beside ``path`` (so concurrent writers never share one) and
    gets permission bits ``mode``. On an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably (``atomic_file``)."""
    with atomic_file(path, mode=mode) as f:
        f.write(data)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root`` (and ``root`` itself), e.g. a freshly unpacked bundle
    before it is renamed into place, so that after a power cut it is complete or absent, never torn."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def scratch_prefix(prefix: str) -> str:
    """``<prefix><pid>-``: a name start for this process's scratch folders that ``remove_orphans`` understands."""
    return f"{prefix}{os.getpid()}-"


def remove_orphans(folder: Path, prefix: str) -> list[Path]:
    """Remove the folders ``<prefix><pid>-*`` in ``folder`` (``scratch_prefix``) whose process is gone: what a
    crash or a power cut in the middle of building something leaves behind. Return them.

    A folder whose pid is alive (maybe a reused pid after a reboot) is kept: leaking one folder beats deleting
    another process's work. A missing ``folder`` has no orphans.
    """
    if not Path(folder).is_dir():
        return []
    removed: list[Path] = []
    for entry in sorted(Path(folder).iterdir()):
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        except PermissionError:
            pass  # alive, another user's
    return removed
