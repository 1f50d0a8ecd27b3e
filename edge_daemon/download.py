"""Resumable, capped, hash-checked download of an update bundle (issue 7; DESIGN.md "MQTT": ``P/model/set``).

:func:`fetch` copies ``url`` (``file://`` or ``http(s)://``, nothing else) to ``dest``:

- Bytes go to ``dest + ".part"``. A ``.part`` left by an earlier call (a stall, a dropped connection, a daemon
  killed mid-download) is continued with ``Range: bytes=N-``: a 206 continues, a 200 means the server ignored the
  range and the download restarts from byte 0, a 416 means the ``.part`` may already be complete and its hash
  decides. ``file://`` resumes the same way (a seek).
- The sha256 covers the whole file: the kept prefix is re-read from disk and hashed, then every new byte is hashed
  as it is written. On success the ``.part`` is fsynced and renamed atomically to ``dest`` (and the folder fsynced).
- A hash mismatch deletes the ``.part`` (a corrupt partial must not poison the next try). When the mismatch may
  come from the kept prefix (bytes from an earlier call, e.g. the file at the url was replaced meanwhile), the
  download restarts once from byte 0 before giving up.
- ``max_bytes``: refused before any byte is read when Content-Length / the Content-Range total / the file size is
  larger, and stopped as soon as more bytes arrive than the cap (a server that lies). The ``.part`` is deleted.
- Stall (no byte for ``stall_timeout_s``), total timeout, cancellation, a dropped connection and I/O errors keep
  the ``.part`` so that the next call resumes; a full disk deletes it, to give the space back.
- Nothing is written outside ``dest``'s folder (only ``dest`` and ``dest.part``); the folder is created if missing.
  Two concurrent calls for the same ``dest`` do not mix their bytes: the ``.part`` is locked (``flock``; the
  kernel drops the lock when a process dies), and the second call fails with reason "io".

HTTP uses urllib.request from the standard library with only the http/https handlers (no ftp://, data: or
file:// through a redirect), the environment's proxy settings, ``Accept-Encoding: identity``, and TLS verified
against the system store or only ``tls_ca`` when it is given.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deploy.durable import fsync_dir

__all__ = ["CHUNK_BYTES", "REASONS", "DownloadError", "DownloadResult", "ProgressFn", "fetch"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# The reason codes of DownloadError. "stalled", "timeout", "cancelled" and "io" (except a full disk) keep the
# .part, so that the next call resumes; "too_large" and "sha256" delete it.
REASONS = ("scheme", "not_found", "http_status", "stalled", "too_large", "sha256", "io", "timeout", "cancelled")
USER_AGENT = "edge-inspect-daemon"
MAX_URL_CHARS = 4096
# Progress is reported after at least this many new bytes or this many seconds, and at the start and the end.
_PROGRESS_BYTES = CHUNK_BYTES
_PROGRESS_S = 0.5
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

ProgressFn = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total)``: bytes of the whole file so far (the resumed prefix included) and the whole
file's size when the server or the file system says it (else None). Called from the calling thread; non-decreasing
within one download, but back to 0 when the download restarts from scratch. Exceptions propagate (the .part is
kept)."""


class DownloadError(Exception):
    """A download that did not produce ``dest``. ``str(exc)`` says why in one line (with the url, its password
    removed); ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DownloadResult:
    """``path``: dest; ``bytes``: its size; ``sha256``: its lowercase hex digest; ``resumed_from``: bytes kept from
    an earlier call and not downloaded again (0 when the .part was discarded; the file's size when dest was already
    complete); ``seconds``: wall time of this call."""

    path: Path
    bytes: int
    sha256: str
    resumed_from: int
    seconds: float


def fetch(
    url: str,
    dest: Path,
    *,
    expected_sha256: str,
    max_bytes: int,
    stall_timeout_s: float = 30.0,
    total_timeout_s: float = 3600.0,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    tls_ca: Path | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest`` (see the module docstring for the rules) and return what was done.

    ``expected_sha256``: 64 hex digits of the whole file. ``max_bytes``: the largest accepted file.
    ``stall_timeout_s``: the longest wait for a byte (also the connect timeout). ``total_timeout_s``: checked
    between chunks, so it may be overrun by at most one ``stall_timeout_s``. ``cancel`` is checked between chunks
    (up to :data:`CHUNK_BYTES`): with a silent server, a cancel is noticed within ``stall_timeout_s``.
    ``tls_ca``: a PEM file trusted instead of the system store for https.

    If ``dest`` already holds a file with ``expected_sha256``, it is returned at once (no network access).
    Raises DownloadError for every failure of the url, the network, the server or the disk; ValueError only for
    arguments that are a programming error (max_bytes or a timeout <= 0, a dest without a file name).
    """
    t0 = time.monotonic()
    if max_bytes <= 0 or stall_timeout_s <= 0 or total_timeout_s <= 0:
        raise ValueError(
            f"max_bytes, stall_timeout_s and total_timeout_s must be > 0 "
            f"(got {max_bytes}, {stall_timeout_s}, {total_timeout_s})"
        )
    dest = Path(dest)
    if dest.name in ("", ".", ".."):
        raise ValueError(f"dest must name a file, got {str(dest)!r}")
    if not isinstance(expected_sha256, str) or not _SHA256.fullmatch(expected_sha256):
        raise DownloadError("sha256", f"expected sha256 must be 64 hex digits, got {_show(str(expected_sha256))}")
    expected = expected_sha256.lower()
    source = _parse_url(url)
    job = _Job(
        source=source,
        dest=dest,
        part=dest.with_name(dest.name + ".part"),
        expected=expected,
        max_bytes=max_bytes,
        stall_timeout_s=stall_timeout_s,
        deadline=t0 + total_timeout_s,
        total_timeout_s=total_timeout_s,
        progress=progress,
        cancel=cancel,
        tls_ca=tls_ca,
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError("io", f"cannot create the folder {dest.parent}: {_os_error(exc)}") from None
    if dest.is_dir():
        raise DownloadError("io", f"cannot download to {dest}: it is a folder")
    size, resumed = job.run()
    return DownloadResult(dest, size, expected, resumed, time.monotonic() - t0)


# --- urls ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    kind: str  # "file" | "http"
    url: str  # as given (for http: what urllib opens)
    shown: str  # for messages: one line, no password
    path: Path | None = None  # file:// only


def _show(url: str) -> str:
    """The url for a one-line message: no password, no control characters, at most 300 characters."""
    text = url
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            text = urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 300 else text[:297] + "..."


def _parse_url(url: str) -> _Source:
    if not isinstance(url, str) or not url:
        raise DownloadError("scheme", "empty url (file:// and http(s):// only)")
    shown = _show(url)
    if len(url) > MAX_URL_CHARS:
        raise DownloadError("scheme", f"url longer than {MAX_URL_CHARS} characters: {shown}")
    if any(not c.isprintable() or c.isspace() for c in url):
        raise DownloadError("scheme", f"url with spaces or control characters: {shown}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise DownloadError("scheme", f"malformed url {shown}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(
                "scheme", f"file:// url must be absolute (file:///path), got {shown} (host {parts.netloc!r})"
            )
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            raise DownloadError("scheme", f"file:// url must be absolute (file:///path), got {shown}")
        if "\x00" in path:
            raise DownloadError("scheme", f"file:// url with a NUL character: {shown}")
        if parts.query or parts.fragment:
            raise DownloadError("scheme", f"file:// url with a query or fragment: {shown}")
        return _Source("file", url, shown, Path(path))
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise DownloadError("scheme", f"malformed url {shown}: no host")
        if port == 0:
            raise DownloadError("scheme", f"malformed url {shown}: port 0")
        return _Source("http", url, shown)
    if not scheme:
        raise DownloadError("scheme", f"not a url: {shown} (file:///absolute/path and http(s):// only)")
    raise DownloadError("scheme", f"unsupported url scheme {scheme!r} (file:// and http(s):// only): {shown}")


# --- the .part file ----------------------------------------------------------------------------------------------


class _Part:
    """``dest.part`` opened read-write, locked, and known to still be the file at that path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(10):
            try:
                fd = os.open(path, flags, 0o644)
            except OSError as exc:
                raise DownloadError("io", f"cannot open {path}: {_os_error(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DownloadError("io", f"another download into {path} is in progress") from None
                raise DownloadError("io", f"cannot lock {path}: {_os_error(exc)}") from None
            # The holder of the lock may have renamed this inode to dest (or deleted it) before we locked it.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            except OSError as exc:
                os.close(fd)
                raise DownloadError("io", f"cannot stat {path}: {_os_error(exc)}") from None
            if same:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise DownloadError("io", f"{path} is not a regular file")
                self.fd = fd
                return
            os.close(fd)
        raise DownloadError("io", f"cannot lock {path}: it keeps being replaced")

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
        except OSError as exc:
            raise DownloadError("io", f"cannot truncate {self.path}: {_os_error(exc)}") from None

    def write_at(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.delete()
            raise DownloadError("io", f"cannot write {self.path}: {_os_error(exc)}") from None

    def read_at(self, offset: int, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, offset)
        except OSError as exc:
            raise DownloadError("io", f"cannot read {self.path}: {_os_error(exc)}") from None

    def delete(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def drop_if_empty(self) -> None:
        """Leave no empty .part behind (a url that never sent a byte); only while the path is still ours."""
        with contextlib.suppress(OSError):
            st = os.fstat(self.fd)
            if st.st_size == 0 and os.path.samestat(st, os.stat(self.path, follow_symlinks=False)):
                os.unlink(self.path)

    def finish(self, dest: Path) -> None:
        """fsync, rename to dest, fsync the folder."""
        try:
            os.fsync(self.fd)
            os.replace(self.path, dest)
        except OSError as exc:
            raise DownloadError("io", f"cannot move {self.path} to {dest}: {_os_error(exc)}") from None
        fsync_dir(dest.parent)

    def close(self) -> None:
        os.close(self.fd)  # also drops the lock


# --- one download ------------------------------------------------------------------------------------------------


@dataclass
class _Opened:
    """A source positioned at ``start`` (0 or the requested offset) with what it says about the size."""

    start: int
    total: int | None  # the whole file's size, when known
    end: int | None  # where this stream should end (exclusive), when known: less means truncated
    read: Callable[[], bytes]  # up to CHUNK_BYTES; b"" at the end
    close: Callable[[], None]


class _Restart(Exception):
    """The kept prefix does not fit the source: discard it and ask again from byte 0."""


class _Job:
    def __init__(
        self,
        *,
        source: _Source,
        dest: Path,
        part: Path,
        expected: str,
        max_bytes: int,
        stall_timeout_s: float,
        deadline: float,
        total_timeout_s: float,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
        tls_ca: Path | None,
    ) -> None:
        self.source = source
        self.dest = dest
        self.part_path = part
        self.expected = expected
        self.max_bytes = max_bytes
        self.stall_timeout_s = stall_timeout_s
        self.deadline = deadline
        self.total_timeout_s = total_timeout_s
        self.progress = progress
        self.cancel = cancel
        self.tls_ca = tls_ca

    def run(self) -> tuple[int, int]:
        """(size, resumed_from)."""
        part = _Part(self.part_path)
        try:
            done = self._already_there(part)
            if done is not None:
                return done, done
            return self._download(part)
        finally:
            part.drop_if_empty()
            part.close()

    def _already_there(self, part: _Part) -> int | None:
        """The size of dest when it already holds the expected file (the .part, if we just made it, goes)."""
        try:
            st = os.stat(self.dest)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_bytes:
            return None
        h = hashlib.sha256()
        try:
            with open(self.dest, "rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    self._check_time()
                    h.update(block)
        except OSError:
            return None
        if h.hexdigest() != self.expected:
            return None
        log.info("%s already holds sha256 %s: nothing to download", self.dest, self.expected[:12])
        return st.st_size

    def _download(self, part: _Part) -> tuple[int, int]:
        for _attempt in range(3):
            offset = part.size()
            if offset > self.max_bytes:
                log.info("discarding %s: %d bytes, more than the cap of %d", part.path, offset, self.max_bytes)
                part.truncate()
                offset = 0
            hasher = self._hash_prefix(part, offset)
            try:
                opened = self._open(offset)
            except _Restart as why:
                log.warning("restarting %s from byte 0: %s", self.source.shown, why)
                part.truncate()
                continue
            try:
                if opened.start != offset:  # the server ignored the Range: begin again
                    log.info("%s ignored the range request: restarting from byte 0", self.source.shown)
                    part.truncate()
                    offset = 0
                    hasher = hashlib.sha256()
                resumed = offset
                announced = opened.total if opened.total is not None else opened.end
                if announced is not None and announced > self.max_bytes:
                    part.delete()
                    raise DownloadError(
                        "too_large",
                        f"{self.source.shown} is {announced} bytes, larger than the {_mb(self.max_bytes)} cap",
                    )
                size = self._copy(part, opened, offset, hasher)
            finally:
                opened.close()
            digest = hasher.hexdigest()
            if digest != self.expected:
                if resumed > 0:  # the kept prefix may be what is wrong (the file at the url changed meanwhile)
                    log.warning(
                        "sha256 mismatch after resuming %s at byte %d: restarting from byte 0",
                        self.source.shown,
                        resumed,
                    )
                    part.truncate()
                    continue
                part.delete()
                raise DownloadError(
                    "sha256",
                    f"sha256 mismatch: got {digest[:12]}..., expected {self.expected[:12]}... "
                    f"({size} bytes from {self.source.shown})",
                )
            part.finish(self.dest)
            log.info("downloaded %s to %s: %d bytes (%d resumed)", self.source.shown, self.dest, size, resumed)
            return size, resumed
        raise DownloadError("io", f"gave up on {self.source.shown}: the download restarted too many times")

    def _hash_prefix(self, part: _Part, offset: int) -> Any:
        hasher = hashlib.sha256()
        pos = 0
        while pos < offset:
            self._check_time()
            block = part.read_at(pos, min(CHUNK_BYTES, offset - pos))
            if not block:
                raise DownloadError("io", f"{part.path} shrank while it was read")
            hasher.update(block)
            pos += len(block)
        return hasher

    def _copy(self, part: _Part, opened: _Opened, offset: int, hasher: Any) -> int:
        """Append the stream to the .part from ``offset``; returns the size of the whole file."""
        pos = offset
        reported_pos, reported_at = pos, time.monotonic()
        self._report(pos, opened.total)
        while True:
            self._check_time()
            try:
                block = opened.read()
            except TimeoutError:
                if time.monotonic() >= self.deadline:
                    raise self._timeout_error() from None
                raise DownloadError(
                    "stalled",
                    f"stalled: no byte for {self.stall_timeout_s:g} s from {self.source.shown} after {pos} bytes",
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    "io", f"connection to {self.source.shown} failed after {pos} bytes: {_net_error(exc)}"
                ) from None
            if not block:
                break
            if pos + len(block) > self.max_bytes:
                part.delete()
                raise DownloadError(
                    "too_large",
                    f"{self.source.shown} sent more than {self.max_bytes} bytes: larger than the "
                    f"{_mb(self.max_bytes)} cap",
                )
            part.write_at(pos, block)
            hasher.update(block)
            pos += len(block)
            now = time.monotonic()
            if pos - reported_pos >= _PROGRESS_BYTES or now - reported_at >= _PROGRESS_S:
                self._report(pos, opened.total)
                reported_pos, reported_at = pos, now
        if opened.end is not None and pos < opened.end:
            raise DownloadError(
                "io",
                f"connection to {self.source.shown} closed after {pos} of {opened.end} bytes "
                f"(the .part is kept; the next try resumes)",
            )
        if pos != reported_pos:
            self._report(pos, opened.total)
        return pos

    def _report(self, pos: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(pos, total)

    def _check_time(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadError("cancelled", f"download of {self.source.shown} cancelled")
        if time.monotonic() >= self.deadline:
            raise self._timeout_error()

    def _timeout_error(self) -> DownloadError:
        return DownloadError(
            "timeout", f"timeout: {self.source.shown} took longer than {self.total_timeout_s:g} s in all"
        )

    # --- sources -----------------------------------------------------------------------------------------------

    def _open(self, offset: int) -> _Opened:
        if self.source.kind == "file":
            return self._open_file(offset)
        return self._open_http(offset)

    def _open_file(self, offset: int) -> _Opened:
        path = self.source.path
        assert path is not None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DownloadError("not_found", f"file not found: {path}") from None
        except OSError as exc:
            raise DownloadError("io", f"cannot read {path}: {_os_error(exc)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DownloadError("io", f"not a regular file: {path}")
        try:
            # O_NONBLOCK: should the path have become a FIFO since the stat, do not hang waiting for a writer.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise DownloadError("not_found", f"file not found: {path}") from None
        except OSError as exc:
            raise DownloadError("io", f"cannot read {path}: {_os_error(exc)}") from None
        f: IO[bytes] = os.fdopen(fd, "rb", buffering=0)
        start = offset if offset <= st.st_size else 0
        try:
            f.seek(start)
        except OSError as exc:
            f.close()
            raise DownloadError("io", f"cannot read {path}: {_os_error(exc)}") from None

        def read() -> bytes:
            return f.read(CHUNK_BYTES) or b""

        return _Opened(start=start, total=st.st_size, end=None, read=read, close=f.close)

    def _open_http(self, offset: int) -> _Opened:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.source.url, headers=headers)
        remaining = self.deadline - time.monotonic()
        timeout = max(0.05, min(self.stall_timeout_s, remaining))
        shown = self.source.shown
        try:
            resp = _opener(self.tls_ca, shown).open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(Exception):
                exc.close()
            if exc.code == 416 and offset > 0:
                return self._unsatisfiable(offset, exc.headers.get("Content-Range") if exc.headers else None)
            if exc.code in (404, 410):
                raise DownloadError("not_found", f"HTTP {exc.code} from {shown}") from None
            text = f" {exc.reason}" if isinstance(exc.reason, str) and exc.reason else ""
            raise DownloadError("http_status", f"HTTP {exc.code}{_show(text)} from {shown}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._connect_timeout() from None
            raise DownloadError("io", f"cannot reach {shown}: {_net_error(exc.reason)}") from None
        except TimeoutError:
            raise self._connect_timeout() from None
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError("io", f"cannot reach {shown}: {_net_error(exc)}") from None
        except ValueError as exc:
            raise DownloadError("scheme", f"malformed url {shown}: {exc}") from None
        try:
            return self._opened_http(resp, offset)
        except BaseException:
            resp.close()
            raise

    def _opened_http(self, resp: Any, offset: int) -> _Opened:
        status = resp.status
        length = _int_header(resp.headers.get("Content-Length"))
        read1 = resp.read1  # at most one recv: the cancel and the clock are checked while a slow link trickles

        def read() -> bytes:
            return bytes(read1(CHUNK_BYTES))

        if status == 206:
            crange = resp.headers.get("Content-Range") or ""
            m = _CONTENT_RANGE.match(crange)
            if m is None:
                raise _Restart(f"HTTP 206 without a usable Content-Range ({_show(crange)!r})")
            first, last = int(m.group(1)), int(m.group(2))
            total = None if m.group(3) == "*" else int(m.group(3))
            if first != offset or last < first:
                raise _Restart(f"asked for bytes {offset}- and got {_show(crange)!r}")
            return _Opened(start=offset, total=total, end=last + 1, read=read, close=resp.close)
        if status == 200:
            return _Opened(start=0, total=length, end=length, read=read, close=resp.close)
        # urllib raises HTTPError for everything outside 2xx; other 2xx have no body we can use.
        raise DownloadError("http_status", f"HTTP {status} from {self.source.shown}")

    def _unsatisfiable(self, offset: int, crange: str | None) -> _Opened:
        """416 for ``Range: bytes=offset-``: the .part is complete if the size matches (or is not said)."""
        m = _UNSATISFIED_RANGE.match(crange or "")
        total = int(m.group(1)) if m else None
        if total is not None and total != offset:
            raise _Restart(f"HTTP 416 for bytes {offset}-: the file is {total} bytes")
        return _Opened(start=offset, total=total, end=None, read=lambda: b"", close=lambda: None)

    def _connect_timeout(self) -> DownloadError:
        if time.monotonic() >= self.deadline:
            return self._timeout_error()
        return DownloadError("stalled", f"stalled: no answer for {self.stall_timeout_s:g} s from {self.source.shown}")


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (the stock handler also follows ftp://)."""

    max_redirections = 5

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(
                "scheme",
                f"{_show(req.full_url)} redirects to an unsupported url scheme {scheme!r} "
                f"(file:// and http(s):// only): {_show(newurl)}",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(tls_ca: Path | None, shown: str) -> urllib.request.OpenerDirector:
    try:
        context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise DownloadError("io", f"cannot load the TLS CA file {tls_ca} for {shown}: {_net_error(exc)}") from None
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=context),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


# --- small helpers -----------------------------------------------------------------------------------------------


def _int_header(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


def _os_error(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _net_error(exc: object) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message or exc.reason or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
