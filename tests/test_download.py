"""edge_daemon.download.fetch against a real HTTP(S) server on loopback and real files.

The payload is a real bundle-like tar (deploy.bundle.pack_tar) of real MVTec bottle PNGs, about 3 MB. The
server (http.server in a thread) has one path per behaviour: honours Range, ignores Range, 404, 500, stalls,
lies about Content-Length, has no Content-Length, truncates, trickles slowly, redirects.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.bundle import pack_tar
from edge_daemon.download import DownloadError, DownloadResult, fetch

REPO = Path(__file__).resolve().parents[1]
STALL_AFTER = 300_000  # bytes the stalling handler sends before it goes silent
STALL_S = 0.5  # stall_timeout_s used by the tests (the stalling handler is silent for much longer)
MAX = 64 * 1024 * 1024


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; loopback must be reached directly."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def payload(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    bottle = shared_data / "mvtec_bottle"
    folder = tmp_path_factory.mktemp("bundle-src") / "bundle"
    (folder / "golden").mkdir(parents=True)
    images = sorted((bottle / "test" / "good").glob("*.png")) + sorted((bottle / "train" / "good").glob("*.png"))[:20]
    assert len(images) >= 30, images
    for i, src in enumerate(images):
        shutil.copyfile(src, folder / "golden" / f"{i:03d}.png")
    tar = folder.parent / "bundle.tar"
    pack_tar(folder, tar)
    data = tar.read_bytes()
    assert 2_000_000 < len(data) < 6_000_000, len(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    """What the server was asked: (path, Range header or None) per request."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, rng: str | None) -> None:
        with self.lock:
            self.requests.append((path, rng))

    def for_path(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    payload: bytes
    seen: Seen
    stop: threading.Event

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that go away (cancel, SIGKILL, stall) are part of the tests


class Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.payload
        rng = self.headers.get("Range")
        path = self.path.split("?")[0]
        self.server.seen.add(path, rng)
        kind = path.strip("/").split("/")[0]
        if kind == "range":
            self._ranged(data, rng)
        elif kind == "norange":
            self._send(200, data)
        elif kind == "missing":
            self._send(404, b"no such bundle\n")
        elif kind == "error":
            self._send(500, b"boom\n")
        elif kind == "stall":
            if rng:
                self._ranged(data, rng)
            else:
                self._head(200, len(data))
                self.wfile.write(data[:STALL_AFTER])
                self.wfile.flush()
                self.server.stop.wait(10 * STALL_S)  # silent, far longer than the client's stall timeout
        elif kind == "lie":
            self._head(200, 1000)  # says 1000 bytes, sends everything
            self.wfile.write(data)
        elif kind == "noclen":  # HTTP/1.0 style: no Content-Length, the end is the connection closing
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
        elif kind == "truncated":
            self._head(200, len(data))
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "slow":  # 32 KB every 20 ms (about 1.6 MB/s), honours Range
            start = self._range_start(rng, len(data))
            if start is None:
                return
            body = data[start:]
            if rng:
                self._head(206, len(body), f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self._head(200, len(body))
            for i in range(0, len(body), 32 * 1024):
                if self.server.stop.is_set():
                    return
                self.wfile.write(body[i : i + 32 * 1024])
                self.wfile.flush()
                time.sleep(0.02)
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", "/range/bundle.tar")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif kind == "redirect-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/bundle.tar")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"?\n")

    def _head(self, code: int, length: int, content_range: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(length))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()

    def _send(self, code: int, body: bytes) -> None:
        self._head(code, len(body))
        self.wfile.write(body)

    def _range_start(self, rng: str | None, size: int) -> int | None:
        if not rng:
            return 0
        assert rng.startswith("bytes=") and rng.endswith("-"), rng
        start = int(rng[len("bytes=") : -1])
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return start

    def _ranged(self, data: bytes, rng: str | None) -> None:
        start = self._range_start(rng, len(data))
        if start is None:
            return
        if rng:
            self._head(206, len(data) - start, f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self._head(200, len(data))
        self.wfile.write(data[start:])


@dataclass
class Served:
    base: str
    seen: Seen
    payload: bytes

    def url(self, path: str) -> str:
        return self.base + path


@contextlib.contextmanager
def _serve(payload: bytes, context: ssl.SSLContext | None = None) -> Iterator[Served]:
    server = _Server(("127.0.0.1", 0), Handler)
    server.payload = payload
    server.seen = Seen()
    server.stop = threading.Event()
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    scheme = "https" if context is not None else "http"
    try:
        yield Served(f"{scheme}://127.0.0.1:{server.server_address[1]}", server.seen, payload)
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def served(payload: bytes) -> Iterator[Served]:
    with _serve(payload) as srv:
        yield srv


def _fetch(url: str, dest: Path, data: bytes, **kw: object) -> DownloadResult:
    kw.setdefault("max_bytes", MAX)
    kw.setdefault("stall_timeout_s", 10.0)
    return fetch(url, dest, expected_sha256=sha(data), **kw)  # type: ignore[arg-type]


def _raises(reason: str, call: Callable[[], object]) -> DownloadError:
    with pytest.raises(DownloadError) as info:
        call()
    assert info.value.reason == reason, f"{info.value.reason}: {info.value}"
    assert "\n" not in str(info.value)
    return info.value


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# --- HTTP ----------------------------------------------------------------------------------------------------------


def test_full_download_hash_and_progress(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "new" / "folder" / "bundle.tar"  # the parent is created
    calls: list[tuple[int, int | None]] = []
    res = _fetch(served.url("/range/full.tar"), dest, data, progress=lambda n, t: calls.append((n, t)))
    assert res.path == dest and res.bytes == len(data) and res.sha256 == sha(data) and res.resumed_from == 0
    assert res.seconds >= 0
    assert dest.read_bytes() == data
    assert not _part(dest).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle.tar"]
    assert served.seen.for_path("/range/full.tar") == [None]
    # progress: starts at 0, never goes back, ends at the size; total known from Content-Length
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))
    assert len(calls) >= 3  # a 3 MB file crosses the 1 MiB reporting step at least twice
    assert all(b[0] > a[0] for a, b in zip(calls, calls[1:], strict=False))


def test_resume_after_a_stall(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    url = served.url("/stall/bundle.tar")
    err = _raises("stalled", lambda: _fetch(url, dest, data, stall_timeout_s=STALL_S))
    assert "stalled" in str(err) and url in str(err)
    assert _part(dest).stat().st_size == STALL_AFTER  # kept for the next try
    assert not dest.exists()
    res = _fetch(url, dest, data, stall_timeout_s=STALL_S)
    assert res.resumed_from == STALL_AFTER and res.bytes == len(data) and res.sha256 == sha(data)
    assert dest.read_bytes() == data and not _part(dest).exists()
    assert served.seen.for_path("/stall/bundle.tar") == [None, f"bytes={STALL_AFTER}-"]


def test_truncated_response_keeps_the_part_and_resumes_elsewhere(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    err = _raises("io", lambda: _fetch(served.url("/truncated/b.tar"), dest, data))
    assert f"closed after {len(data) // 2} of {len(data)} bytes" in str(err)
    assert _part(dest).read_bytes() == data[: len(data) // 2]
    res = _fetch(served.url("/range/after-truncated.tar"), dest, data)
    assert res.resumed_from == len(data) // 2 and dest.read_bytes() == data
    assert served.seen.for_path("/range/after-truncated.tar") == [f"bytes={len(data) // 2}-"]


def test_server_ignoring_range_restarts_from_zero(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    _part(dest).write_bytes(b"\xff" * 100_000)  # a wrong prefix: it must be thrown away, not hashed in
    res = _fetch(served.url("/norange/b.tar"), dest, data)
    assert res.resumed_from == 0 and res.bytes == len(data) and dest.read_bytes() == data
    assert served.seen.for_path("/norange/b.tar") == ["bytes=100000-"]


def test_corrupt_prefix_with_a_range_server_restarts_once(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    _part(dest).write_bytes(b"\x00" * 50_000)  # e.g. the file at the url was replaced since the first try
    res = _fetch(served.url("/range/corrupt-prefix.tar"), dest, data)
    assert res.resumed_from == 0 and dest.read_bytes() == data
    assert served.seen.for_path("/range/corrupt-prefix.tar") == ["bytes=50000-", None]


def test_416_with_a_complete_part_checks_the_hash(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    _part(dest).write_bytes(data)  # killed after the last byte, before the rename
    res = _fetch(served.url("/range/complete.tar"), dest, data)
    assert res.resumed_from == len(data) and res.bytes == len(data) and dest.read_bytes() == data
    assert served.seen.for_path("/range/complete.tar") == [f"bytes={len(data)}-"]


def test_a_part_longer_than_the_file_restarts(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    _part(dest).write_bytes(data + b"junk")  # 416 says the file is shorter: not ours
    res = _fetch(served.url("/range/longer.tar"), dest, data)
    assert res.resumed_from == 0 and dest.read_bytes() == data
    assert served.seen.for_path("/range/longer.tar") == [f"bytes={len(data) + 4}-", None]


def test_http_errors_name_the_url(served: Served, tmp_path: Path) -> None:
    data = served.payload
    url = served.url("/missing/x.tar")
    err = _raises("not_found", lambda: _fetch(url, tmp_path / "b.tar", data))
    assert str(err) == f"HTTP 404 from {url}"
    url = served.url("/error/x.tar")
    err = _raises("http_status", lambda: _fetch(url, tmp_path / "b.tar", data))
    assert str(err).startswith("HTTP 500") and url in str(err)
    assert list(tmp_path.iterdir()) == []  # no .part left for a url that never answered with bytes
    err = _raises("io", lambda: _fetch("http://127.0.0.1:9/x.tar", tmp_path / "b.tar", data))
    assert "cannot reach http://127.0.0.1:9/x.tar" in str(err)


def test_too_large_by_header_and_by_stream(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    err = _raises("too_large", lambda: _fetch(served.url("/range/big.tar"), dest, data, max_bytes=len(data) - 1))
    assert f"{len(data)} bytes, larger than the" in str(err)
    assert not _part(dest).exists() and not dest.exists()
    # a resumed download learns the size from Content-Range
    _part(dest).write_bytes(data[:1000])
    _raises("too_large", lambda: _fetch(served.url("/range/big.tar"), dest, data, max_bytes=len(data) - 1))
    assert not _part(dest).exists()
    # no Content-Length: stopped once the bytes pass the cap, and the .part goes
    err = _raises("too_large", lambda: _fetch(served.url("/noclen/b.tar"), dest, data, max_bytes=1_000_000))
    assert "sent more than 1000000 bytes" in str(err)
    assert not _part(dest).exists() and not dest.exists()
    # without a cap problem the same server works: the end of the body is the end of the connection
    res = _fetch(served.url("/noclen/b.tar"), dest, data)
    assert res.bytes == len(data) and dest.read_bytes() == data


def test_a_lying_content_length_is_not_accepted(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    err = _raises("sha256", lambda: _fetch(served.url("/lie/b.tar"), dest, data, max_bytes=100_000))
    assert "(1000 bytes from" in str(err)
    assert not _part(dest).exists() and not dest.exists()


def test_sha_mismatch_deletes_the_part(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    wrong = sha(b"something else")
    err = _raises(
        "sha256",
        lambda: fetch(served.url("/range/x.tar"), dest, expected_sha256=wrong, max_bytes=MAX),
    )
    assert str(err).startswith(f"sha256 mismatch: got {sha(data)[:12]}..., expected {wrong[:12]}...")
    assert list(tmp_path.iterdir()) == []


def test_redirects(served: Served, tmp_path: Path) -> None:
    data = served.payload
    res = _fetch(served.url("/redirect/b.tar"), tmp_path / "b.tar", data)
    assert res.bytes == len(data)
    err = _raises("scheme", lambda: _fetch(served.url("/redirect-ftp/b.tar"), tmp_path / "c.tar", data))
    assert "ftp" in str(err)


def test_cancel_from_another_thread(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    cancel = threading.Event()
    outcome: list[BaseException | DownloadResult] = []

    def run() -> None:
        try:
            outcome.append(_fetch(served.url("/slow/cancel.tar"), dest, data, cancel=cancel))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    _wait_for(lambda: _part(dest).exists() and _part(dest).stat().st_size > 100_000, "some bytes")
    # a second download into the same dest meanwhile is refused, not mixed in
    err = _raises("io", lambda: _fetch(served.url("/range/cancel.tar"), dest, data))
    assert "in progress" in str(err)
    cancel.set()
    t.join(timeout=20)
    assert len(outcome) == 1 and isinstance(outcome[0], DownloadError), outcome
    assert outcome[0].reason == "cancelled"
    kept = _part(dest).stat().st_size
    assert 0 < kept < len(data) and not dest.exists()
    res = _fetch(served.url("/range/cancel.tar"), dest, data)
    assert res.resumed_from == kept and dest.read_bytes() == data


def test_total_timeout_keeps_the_part(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    err = _raises("timeout", lambda: _fetch(served.url("/slow/t.tar"), dest, data, total_timeout_s=0.5))
    assert "longer than 0.5 s" in str(err)
    assert 0 < _part(dest).stat().st_size < len(data)


def test_dest_already_complete_needs_no_network(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    dest.write_bytes(data)
    res = _fetch("http://127.0.0.1:9/unreachable.tar", dest, data)  # nothing listens on port 9
    assert res.bytes == len(data) and res.resumed_from == len(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar"]
    # a stale dest with other bytes is replaced
    dest.write_bytes(b"old")
    res = _fetch(served.url("/range/replace.tar"), dest, data)
    assert res.resumed_from == 0 and dest.read_bytes() == data


def test_sigkilled_child_leaves_a_part_the_next_fetch_resumes(served: Served, tmp_path: Path) -> None:
    data = served.payload
    dest = tmp_path / "bundle.tar"
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from edge_daemon.download import fetch
        fetch({served.url("/slow/killed.tar")!r}, Path({str(dest)!r}), expected_sha256={sha(data)!r},
              max_bytes={MAX})
        raise SystemExit("the download should have been killed before it finished")
        """
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env)
    try:
        _wait_for(lambda: _part(dest).exists() and _part(dest).stat().st_size >= 200_000, "the child's first bytes")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=20) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    kept = _part(dest).stat().st_size
    assert 200_000 <= kept < len(data) and not dest.exists()
    assert _part(dest).read_bytes() == data[:kept]
    res = _fetch(served.url("/range/after-kill.tar"), dest, data)
    assert res.resumed_from == kept and res.sha256 == sha(data) and dest.read_bytes() == data
    assert served.seen.for_path("/range/after-kill.tar") == [f"bytes={kept}-"]


# --- HTTPS -----------------------------------------------------------------------------------------------------------


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-inspect test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem, cert_pem, key_pem


def test_https_verifies_against_tls_ca(payload: bytes, tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with _serve(payload, context) as srv:
        url = srv.url("/range/tls.tar")
        res = _fetch(url, tmp_path / "out" / "b.tar", payload, tls_ca=ca)
        assert res.bytes == len(payload) and (tmp_path / "out" / "b.tar").read_bytes() == payload
        # the system store does not know this CA
        err = _raises("io", lambda: _fetch(url, tmp_path / "out2" / "b.tar", payload))
        assert "certificate" in str(err).lower() and url in str(err)
        err = _raises("io", lambda: _fetch(url, tmp_path / "o3.tar", payload, tls_ca=tmp_path / "none.pem"))
        assert "TLS CA file" in str(err)


# --- file:// -----------------------------------------------------------------------------------------------------


def test_file_url_copies_resumes_and_checks(payload: bytes, tmp_path: Path) -> None:
    src = tmp_path / "src dir" / "bundle.tar"
    src.parent.mkdir()
    src.write_bytes(payload)
    url = src.as_uri()  # file:///.../src%20dir/bundle.tar
    dest = tmp_path / "state" / "bundle.tar"
    calls: list[tuple[int, int | None]] = []
    res = _fetch(url, dest, payload, progress=lambda n, t: calls.append((n, t)))
    assert res.bytes == len(payload) and res.resumed_from == 0 and dest.read_bytes() == payload
    assert calls[-1] == (len(payload), len(payload))
    dest.unlink()
    _part(dest).write_bytes(payload[:12345])
    res = _fetch(url, dest, payload)
    assert res.resumed_from == 12345 and dest.read_bytes() == payload
    # the same checks as HTTP
    dest.unlink()
    _raises("too_large", lambda: _fetch(url, dest, payload, max_bytes=1000))
    _raises("sha256", lambda: fetch(url, dest, expected_sha256="0" * 64, max_bytes=MAX))
    assert sorted(p.name for p in dest.parent.iterdir()) == []
    assert _fetch(f"file://localhost{src.as_posix()}".replace(" ", "%20"), dest, payload).bytes == len(payload)


def test_file_url_errors_are_clear(payload: bytes, tmp_path: Path) -> None:
    dest = tmp_path / "b.tar"
    err = _raises("not_found", lambda: _fetch("file:///nonexistent/x.tar", dest, payload))
    assert str(err) == "file not found: /nonexistent/x.tar"
    err = _raises("io", lambda: _fetch(tmp_path.as_uri(), dest, payload))
    assert "not a regular file" in str(err)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _raises("io", lambda: _fetch(fifo.as_uri(), dest, payload))
    assert not dest.exists() and not _part(dest).exists()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/b.tar", "unsupported url scheme 'ftp'"),
        ("data:application/x-tar;base64,AAAA", "unsupported url scheme 'data'"),
        ("bundle.tar", "not a url"),
        ("/abs/bundle.tar", "not a url"),
        ("file://relative/b.tar", "must be absolute"),
        ("file:relative/b.tar", "must be absolute"),
        ("http:///b.tar", "no host"),
        ("http://127.0.0.1:99999/b.tar", "malformed url"),
        ("http://127.0.0.1/b.tar\r\nX-Injected: 1", "control characters"),
        ("", "empty url"),
    ],
)
def test_bad_urls_are_refused(url: str, words: str, payload: bytes, tmp_path: Path) -> None:
    err = _raises("scheme", lambda: _fetch(url, tmp_path / "b.tar", payload))
    assert words in str(err)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(payload: bytes, tmp_path: Path) -> None:
    err = _raises("sha256", lambda: fetch("file:///x", tmp_path / "b.tar", expected_sha256="abc", max_bytes=MAX))
    assert "64 hex digits" in str(err)
    with pytest.raises(ValueError, match="max_bytes"):
        fetch("file:///x", tmp_path / "b.tar", expected_sha256="0" * 64, max_bytes=0)
    (tmp_path / "dir").mkdir()
    err = _raises("io", lambda: _fetch("file:///x", tmp_path / "dir", payload))
    assert "is a folder" in str(err)
