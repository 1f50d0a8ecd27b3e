"""Fleet push of a signed bundle to edge daemons over MQTT (issue 7; DESIGN.md "MQTT", "Security model").

    edge-deploy push bundles/ae-3-v2.tar --device line3-cam-a --broker mqtt.plant.local:1883 --wait
    edge-deploy push bundles/ae-3-v2.tar --devices 'line3-*' --broker mqtt.plant.local --wait

Transport (decided): the pushing host serves the bundle itself over HTTP, and the MQTT command carries only
its URL and sha256. The broker carries the plant's alarms: a 200 MB bundle pushed through it in chunks would
delay anomaly events and fill broker queues (and every device's session queue), for every device of a fleet.
HTTP is resumable (``Range`` requests: a device whose download broke continues where it stopped), cacheable
(the URL names the content: ``/<token>/<sha256>.tar`` never changes meaning), and lets a plant use its own artifact
server instead (``url=`` / ``--url``: an http(s):// or file:// URL where the same .tar already is). The device
checks the sha256 and the signature against its own trusted keys, so neither the broker, nor the HTTP server,
nor this tool decides what runs. ``<token>`` is 128 random bits drawn per server: the URL is a capability that
only the command's readers (the devices, through the broker's own access control) learn, so another host on
the plant network cannot copy the model while a push serves it, and a guessed ``/<sha256>.tar`` gets a 404.

What ``push`` does:

1. Checks the bundle locally (a .tar, or a folder packed to a temporary .tar with ``deploy.bundle.pack_tar``):
   every file against the manifest, and a signature must be present (devices refuse unsigned bundles); with
   ``trusted`` keys the signature must verify against one of them. Reads ``manifest.model["version"]`` and
   the sha256 of the tar.
2. Serves that one file (``serve_file``) on a daemon thread unless a ``url`` is given.
3. Devices: explicit ids, or a glob matched against the retained ``<prefix>/+/status`` messages (collected for
   ``settle_s`` after SUBACK); only devices whose status is ``online`` get the command, the others are
   reported as skipped.
4. Publishes ``<prefix>/<device>/model/set`` = {"request_id", "url", "sha256", "version"} (QoS 1, not retained,
   a fresh uuid4 hex request_id per device) and follows the retained ``<prefix>/<device>/model/state``; a
   state whose request_id is not ours (an older request, somebody else's push) is ignored. The connection is
   MQTT 5 where the broker speaks it (else 3.1.1): a command the broker refuses (an ACL without write access to
   model/set) is then reported at once as not sent, with the broker's reason, instead of a device that never
   answers.
5. Ends when every device has finished (``wait=True``: active, refused or rolled_back) or acknowledged
   (``wait=False``: any phase of our request; when this process serves the bundle, a phase past
   ``downloading``, since the server stops when push returns), or at ``timeout``.

Exit codes of the CLI (``PushReport.exit_code``, ``PushError.code``): 0 every device active (``wait``) or
acknowledged (no ``wait``); 1 some device failed, refused, rolled back or timed out, a device matching the glob
was skipped (not online: it still runs the old model), or the broker refused a command; 2 bad input, and then
nothing was sent to any device (missing/unsigned/broken bundle, bad or unreachable broker address, bad
credentials, no read access to the devices' topics, no matching online device, a device id with no status under
the prefix). A device that already serves the bundle answers ``active``.

paho-mqtt (the ``daemon`` extra) and rich (installed with typer) are imported only when needed, with a clear
error when missing. Python 3.10 compatible; never imports torch or edge_daemon.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import http.server
import ipaddress
import json
import logging
import re
import secrets
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deploy.bundle import SIGNATURE_NAME, BundleError, open_bundle, pack_tar, verify_bundle_details
from deploy.untrusted_json import parse_untrusted_json

__all__ = [
    "ACTIVE",
    "FAILED_PHASES",
    "PHASES",
    "BrokerSettings",
    "BundleInfo",
    "BundleServer",
    "DeviceResult",
    "Discovery",
    "PushError",
    "PushReport",
    "discover_devices",
    "parse_broker",
    "parse_range",
    "prepare_bundle",
    "progress_table",
    "push",
    "read_password_file",
    "serve_file",
    "summary_table",
]

DEFAULT_TOPIC_PREFIX = "inspect"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SETTLE_S = 2.0
PHASES = ("downloading", "verifying", "building", "validating", "probation", "active", "refused", "rolled_back")
ACTIVE = "active"
FAILED_PHASES = frozenset({"refused", "rolled_back"})
# Outcomes of one device (DeviceResult.outcome).
PENDING, ACKNOWLEDGED, SUCCEEDED, FAILED, TIMED_OUT, NOT_SENT = (
    "pending",
    "acknowledged",
    "active",
    "failed",
    "timed out",
    "not sent",
)
_CHUNK = 256 * 1024
log = logging.getLogger(__name__)
_MQTT_TIMEOUT_S = 10.0
# CONNACK reason codes that say "this broker does not speak MQTT 5": 0x84 in MQTT 5; a 3.1.1-only broker answers
# a v5 CONNECT with the 3.1.1 return code 1 (unacceptable protocol version). Same as the daemon's.
_UNSUPPORTED_PROTOCOL_CODES = frozenset({0x84, 0x01})
_DEVICE_ID = re.compile(r"^[^/+#\s\x00]{1,128}$")
# The pusher does not judge min_daemon_version: each device checks the bundle against its own version.
_ANY_DAEMON_VERSION = "999999"


class PushError(Exception):
    """Bad input found before anything was sent (exit code 2 by default); the message is one line."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class BundleInfo:
    """A checked bundle ready to push: ``tar`` is the file to serve (the input .tar, or a temporary pack of the
    input folder), ``sha256`` and ``size`` (bytes) are the tar's, ``version`` is manifest.model["version"]."""

    source: Path
    tar: Path
    sha256: str
    size: int
    name: str
    version: str
    key_id: str | None
    min_daemon_version: str


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1024**2):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def prepare_bundle(bundle: Path, work_dir: Path, *, trusted: Sequence[Path] = ()) -> BundleInfo:
    """Check ``bundle`` (folder or .tar) and return what to push; a folder is packed to ``work_dir``/bundle.tar.

    Checks: the manifest and every file (sha256, size, nothing extra), a signature file present (devices refuse
    unsigned bundles), with ``trusted`` the signature verifies against one of them, a model version in the
    manifest. PushError (code 2) naming the problem. min_daemon_version is left to the devices.
    """
    bundle = Path(bundle)
    if not bundle.exists():
        raise PushError(f"no bundle at {bundle}")
    try:
        with open_bundle(bundle) as root:
            if not (root / SIGNATURE_NAME).is_file():
                raise PushError(
                    f"bundle {bundle} is unsigned: devices refuse unsigned bundles; "
                    f"sign it first with edge-deploy sign {bundle} --key KEY"
                )
            checked = verify_bundle_details(
                root, list(trusted), daemon_version=_ANY_DAEMON_VERSION, require_signature=bool(trusted)
            )
            if bundle.is_dir():
                tar = Path(work_dir) / "bundle.tar"
                pack_tar(root, tar)
            else:
                tar = bundle
    except BundleError as exc:
        raise PushError(f"bundle {bundle}: {exc}") from None
    except OSError as exc:
        raise PushError(f"cannot read bundle {bundle}: {exc.strerror or exc}") from None
    model = checked.manifest.model
    version = model.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PushError(f"bundle {bundle}: manifest.model has no version string; re-export it")
    if len(version) > 128:
        raise PushError(f"bundle {bundle}: model version is {len(version)} characters; devices accept at most 128")
    try:
        digest, size = _sha256_file(tar)
    except OSError as exc:
        raise PushError(f"cannot read {tar}: {exc.strerror or exc}") from None
    return BundleInfo(
        source=bundle,
        tar=tar,
        sha256=digest,
        size=size,
        name=str(model.get("name", "?")),
        version=version,
        key_id=checked.key_id,
        min_daemon_version=checked.manifest.min_daemon_version,
    )


# --------------------------------------------------------------------------------------- HTTP server


def _split_hostport(text: str, what: str, default_port: int | None) -> tuple[str, int]:
    """'host:port', '[v6]:port', or 'host' (when ``default_port``) -> (host, port). PushError on anything else."""
    text = text.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\](?::(\d+))?", text) or re.fullmatch(r"([^:\s\[\]/]+)(?::(\d+))?", text)
    if m is None:
        raise PushError(f"{what} {text!r} is not HOST:PORT")
    host, port_text = m.group(1), m.group(2)
    if port_text is None:
        if default_port is None:
            raise PushError(f"{what} {text!r} has no port: give HOST:PORT")
        return host, default_port
    port = int(port_text)
    if port > 65535:
        raise PushError(f"{what} {text!r}: port {port} is out of range (0-65535)")
    return host, port


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One HTTP byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) of a ``size``-byte file -> (first, last)
    inclusive, clipped to the file; None when malformed, multiple, or unsatisfiable (the server answers 416)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else size - 1
        if first > last or first >= size:
            return None
        return first, min(last, size - 1)
    suffix = int(m.group(2))
    if suffix == 0 or size == 0:
        return None
    return max(0, size - suffix), size - 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    file_path: Path
    route: str
    size: int
    etag: str
    counts: dict[str, int]
    counts_lock: threading.Lock

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that vanished mid-transfer is normal; never a traceback on the console


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection ends after this many seconds
    server_version = "edge-deploy-push"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the push display owns the console

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _plain(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        srv = self.server
        if urllib.parse.urlsplit(self.path).path != srv.route:
            self._plain(404, "not found: this server serves one bundle")
            return
        size = srv.size
        range_header = self.headers.get("Range")
        if range_header is None:
            first, last, status = 0, size - 1, 200
        else:
            parsed = parse_range(range_header, size)
            if parsed is None:
                self._plain(
                    416, "range not satisfiable (one byte range within the file)", {"Content-Range": f"bytes */{size}"}
                )
                return
            (first, last), status = parsed, 206
        length = last - first + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", srv.etag)
        self.send_header("Cache-Control", "public, max-age=31536000, immutable")
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if head:
            return
        client = str(self.client_address[0])
        try:
            with open(srv.file_path, "rb") as f:
                f.seek(first)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:  # the file shrank under us: the client sees a short body and retries
                        self.close_connection = True
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    with srv.counts_lock:
                        srv.counts[client] = srv.counts.get(client, 0) + len(chunk)
        except OSError:  # client went away (broken pipe, reset): it may resume with Range
            self.close_connection = True


class BundleServer:
    """One file served over HTTP at ``/<token>/<sha256>.tar`` on a daemon thread (GET with one Range -> 206, HEAD,
    404 for any other path, 416 for a malformed, multiple or unsatisfiable range)."""

    def __init__(self, server: _Server, sha256: str) -> None:
        self._server = server
        self.sha256 = sha256
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="bundle-http", daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def host(self) -> str:
        """The address bound (may be 0.0.0.0 or ::, i.e. every interface)."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def path(self) -> str:
        return self._server.route

    def url(self, host: str | None = None) -> str:
        """The URL devices fetch: ``http://HOST:PORT/<token>/<sha256>.tar``; ``host`` None -> the bound address
        (127.0.0.1 when bound to every interface)."""
        if host is None:
            host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.path}"

    @property
    def bytes_served(self) -> dict[str, int]:
        """Body bytes sent so far, by client IP address (a resumed download adds to the same client)."""
        with self._server.counts_lock:
            return dict(self._server.counts)

    def stop(self) -> None:
        """Stop accepting requests and close the listening socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> BundleServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_file(path: Path, bind: str = "0.0.0.0:0", *, sha256: str | None = None) -> BundleServer:
    """Serve ``path`` at ``/<token>/<sha256>.tar`` (a fresh random token: module docstring) on ``bind``
    ("HOST:PORT"; port 0 = any free port), in a daemon thread, until ``.stop()``. ``sha256`` saves hashing the
    file again. PushError (code 2) for a missing file or a bind that fails."""
    path = Path(path)
    host, port = _split_hostport(bind, "--serve", None)
    try:
        if sha256 is None:
            sha256, size = _sha256_file(path)
        else:
            size = path.stat().st_size
    except OSError as exc:
        raise PushError(f"cannot read {path}: {exc.strerror or exc}") from None
    cls = _Server6 if ":" in host else _Server
    try:
        server = cls((host, port), _Handler)
    except OSError as exc:
        raise PushError(f"cannot serve the bundle on {bind}: {exc.strerror or exc}") from None
    server.file_path = path
    server.route = f"/{secrets.token_urlsafe(16)}/{sha256}.tar"
    server.size = size
    server.etag = f'"{sha256}"'
    server.counts = {}
    server.counts_lock = threading.Lock()
    return BundleServer(server, sha256)


# ----------------------------------------------------------------------------------------------- MQTT


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker. TLS is on when ``tls`` or any of ``cafile``/``certfile`` is given (no CA file:
    the system's CAs). ``password`` with ``username`` (read it from a file; never put it on a command line)."""

    host: str
    port: int = 1883
    tls: bool = False
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.cafile is not None or self.certfile is not None

    def __str__(self) -> str:
        return f"{'mqtts' if self.uses_tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(address: str, *, tls: bool = False) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or 'HOST' (port 1883, 8883 with TLS) -> (host, port); PushError (2) otherwise."""
    host, port = _split_hostport(address, "--broker", 8883 if tls else 1883)
    if port == 0:
        raise PushError(f"--broker {address!r}: port 0 is not a broker port")
    return host, port


def _import_paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise PushError(  # exit 3: a capability missing on this machine (DESIGN.md)
            "edge-deploy push needs paho-mqtt 2: pip install 'edge-inspect[push]' (or pip install 'paho-mqtt>=2.0')",
            3,
        ) from None
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise PushError("edge-deploy push needs paho-mqtt 2 (found 1.x): pip install -U 'paho-mqtt>=2.0'", 3)
    return mqtt


def _check_topic_part(value: str, what: str) -> str:
    if not value or any(c in value for c in "+#\x00") or value.startswith("/") or value.endswith("/"):
        raise PushError(f"{what} {value!r} is not a valid MQTT topic level (no +, #, empty or leading/trailing /)")
    return value


def _check_device_id(device: str) -> str:
    if _DEVICE_ID.fullmatch(device) is None:
        raise PushError(f"device id {device!r} is not valid: 1-128 characters, no '/', '+', '#' or spaces")
    return device


def _status_text(payload: bytes) -> str | None:
    """The device's status from its retained P/status payload ('online', 'stopped', 'offline'); None if empty."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "unreadable"
    if not text:
        return None
    if text.startswith("{"):
        with contextlib.suppress(ValueError):
            data = parse_untrusted_json(text)
            if isinstance(data, dict) and isinstance(data.get("status"), str):
                return str(data["status"])[:32]
    return text[:32]


class _Link:
    """One MQTT connection for a push: records devices' retained status and routes model/state messages.

    MQTT 5 first, so that a broker that refuses a command (an ACL without write access to model/set) says so in
    its PUBACK (``refusal``); a broker that does not speak MQTT 5 (it answers "unsupported protocol" or hangs up
    before its CONNACK) is asked again in MQTT 3.1.1, where a refused command is only a device that never
    answers.
    Callbacks run on paho's network thread and never raise (bad payloads from the network are dropped).
    """

    def __init__(self, settings: BrokerSettings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.cond = threading.Condition()
        self.statuses: dict[str, str] = {}
        self.on_state: Callable[[str, dict[str, Any], float], None] | None = None
        self._filters: list[str] = []
        self._pending_subs: dict[int, threading.Event] = {}
        self._refused_subs: dict[int, str] = {}  # mid -> the SUBACK's failure reason(s)
        self._connected = threading.Event()
        self._refused: str | None = None
        self._refused_code: int | None = None  # CONNACK reason code of a refusal; None when hung up on
        self._refused_publishes: dict[int, str] = {}  # mid -> the broker's PUBACK reason (MQTT 5 only)
        self._client: Any = None

    # -- connection
    def connect(self) -> None:
        """Connect (MQTT 5, else 3.1.1) and wait for CONNACK; PushError (2) naming why not (nothing has been sent
        yet)."""
        try:
            self._connect_as("5")
        except PushError:
            if self._refused is None or (self._refused_code not in _UNSUPPORTED_PROTOCOL_CODES | {None}):
                raise  # not about the protocol: unreachable, bad credentials, no CONNACK at all
            first = self._refused
            log.info("the broker refused or hung up on MQTT 5 (%s): trying MQTT 3.1.1", first)
            self._connected.clear()
            self._refused = self._refused_code = None
            try:
                self._connect_as("3.1.1")
            except PushError as exc:
                raise PushError(f"{exc} (and in MQTT 5: {first})") from None

    def _connect_as(self, protocol: str) -> None:
        mqtt = _import_paho()
        s = self.settings
        v5 = protocol == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edge-deploy-push-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.reconnect_delay_set(0.5, 5)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.uses_tls:
            for p in (s.cafile, s.certfile, s.keyfile):
                if p is not None and not Path(p).is_file():
                    raise PushError(f"TLS file {p} does not exist")
            try:
                client.tls_set(
                    ca_certs=str(s.cafile) if s.cafile else None,
                    certfile=str(s.certfile) if s.certfile else None,
                    keyfile=str(s.keyfile) if s.keyfile else None,
                )
            except Exception as exc:  # ssl.SSLError, ValueError: unreadable or mismatched PEM files
                raise PushError(f"TLS files refused: {type(exc).__name__}: {exc}") from None
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        try:
            if v5:
                client.connect(s.host, s.port, s.keepalive, clean_start=True)
            else:
                client.connect(s.host, s.port, s.keepalive)
        except socket.gaierror as exc:
            raise PushError(f"broker host {s.host!r} does not resolve: {exc.strerror or exc}") from None
        except Exception as exc:  # OSError (refused, unreachable, timeout), ssl errors
            raise PushError(f"cannot connect to the broker at {s}: {type(exc).__name__}: {exc}") from None
        client.loop_start()
        if not self._connected.wait(_MQTT_TIMEOUT_S) and self._refused is None:
            self.close()
            raise PushError(f"the broker at {s} did not answer (no CONNACK within {_MQTT_TIMEOUT_S:.0f} s)")
        if self._refused is not None:
            self.close()
            raise PushError(f"the broker at {s} refused the connection: {self._refused}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            self._refused_code = int(getattr(reason, "value", -1))
            if "authori" in self._refused.lower() or "password" in self._refused.lower():
                self._refused += " (check --username / --password-file)"
            self._connected.set()
            client.disconnect()
            return
        # after a reconnect (clean session) the subscriptions are gone: take them again
        if self._filters and self._connected.is_set():
            client.subscribe([(f, 1) for f in self._filters])
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._connected.is_set():  # hung up before CONNACK: a refused TLS client or a non-MQTT port
            hint = "; check --cafile/--cert/--key" if self.settings.uses_tls else ""
            self._refused = f"it hung up before accepting this client ({reason}){hint}"
            self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self.cond:
            event = self._pending_subs.pop(mid, None)
            if event is not None and any(getattr(r, "is_failure", False) for r in reasons):
                self._refused_subs[mid] = ", ".join(sorted({str(r) for r in reasons if r.is_failure}))
        if event is not None:
            event.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            with self.cond:
                self._refused_publishes[mid] = str(reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with contextlib.suppress(Exception):  # never let a payload from the network end paho's thread
            self._route(str(message.topic), bytes(message.payload))

    def _route(self, topic: str, payload: bytes) -> None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return
        rest = topic[len(head) :]
        device, _, suffix = rest.partition("/")
        if not device:
            return
        if suffix == "status":
            status = _status_text(payload)
            with self.cond:
                if status is None:
                    self.statuses.pop(device, None)
                else:
                    self.statuses[device] = status
                self.cond.notify_all()
        elif suffix == "model/state" and self.on_state is not None:
            try:
                data = parse_untrusted_json(payload)
            except ValueError:
                return
            if isinstance(data, dict):
                self.on_state(device, data, time.monotonic())

    def subscribe(self, filters: Sequence[str]) -> None:
        """Subscribe (QoS 1) and wait for the SUBACK; retained messages follow it."""
        event = threading.Event()
        with self.cond:
            result, mid = self._client.subscribe([(f, 1) for f in filters])
            self._filters.extend(filters)
            if result != 0:
                raise PushError(f"cannot subscribe to {', '.join(filters)}: paho error {result}", 1)
            self._pending_subs[mid] = event
        if not event.wait(_MQTT_TIMEOUT_S):
            raise PushError(f"the broker did not acknowledge the subscription to {', '.join(filters)}", 1)
        with self.cond:
            refused = self._refused_subs.pop(mid, None)
        if refused is not None:  # nothing has been sent yet
            raise PushError(
                f"the broker refused the subscription to {', '.join(filters)} ({refused}): this user needs read "
                "access to the devices' status and model/state topics"
            )

    def publish(self, topic: str, payload: bytes) -> Any:
        """QoS 1, not retained; returns paho's message info for ``acknowledged``. While the connection is down paho
        keeps the message and sends it after the reconnect."""
        return self._client.publish(topic, payload, qos=1, retain=False)

    @staticmethod
    def acknowledged(info: Any, deadline: float) -> bool:
        """Whether the broker acknowledged (PUBACK) the message of ``info`` by ``deadline`` (time.monotonic())."""
        with contextlib.suppress(RuntimeError, ValueError):  # paho raises these while the connection is down
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        try:
            return bool(info.is_published())
        except (RuntimeError, ValueError):
            return False

    def refusal(self, info: Any) -> str | None:
        """The broker's reason for refusing the acknowledged message of ``info`` (a PUBACK reason code of 0x80 or
        more, e.g. "Not authorized"), or None. MQTT 3.1.1 has no such answer: there a refused message looks sent.
        """
        with self.cond:
            return self._refused_publishes.get(info.mid)

    def local_address(self) -> str | None:
        """This machine's address on the socket that reaches the broker (what devices most likely reach too)."""
        sock = self._client.socket() if self._client is not None else None
        if sock is None:
            return None
        try:
            return str(sock.getsockname()[0])
        except OSError:
            return None

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        with contextlib.suppress(Exception):
            client.disconnect()
        with contextlib.suppress(Exception):
            client.loop_stop()


@dataclass(frozen=True)
class Discovery:
    """Devices whose retained status matched the glob: ``online`` (sorted ids) get the command; ``skipped``
    maps the others to their status (offline, stopped, ...)."""

    pattern: str
    online: list[str]
    skipped: dict[str, str]
    seen: int  # devices with a retained status under the prefix, matching or not


def _discover(link: _Link, pattern: str, settle_s: float) -> Discovery:
    link.subscribe([f"{link.prefix}/+/status"])
    time.sleep(settle_s)  # retained messages arrive after the SUBACK; there is no "that was all" marker
    with link.cond:
        statuses = dict(link.statuses)
    matching = {d: s for d, s in statuses.items() if fnmatch.fnmatchcase(d, pattern)}
    online = sorted(d for d, s in matching.items() if s == "online")
    skipped = {d: s for d, s in sorted(matching.items()) if s != "online"}
    return Discovery(pattern, online, skipped, len(statuses))


def discover_devices(
    broker: BrokerSettings,
    pattern: str,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    settle_s: float = DEFAULT_SETTLE_S,
) -> Discovery:
    """Devices under ``<topic_prefix>/+/status`` (retained, collected for ``settle_s`` seconds after SUBACK)
    whose id matches the glob ``pattern`` (fnmatch, case-sensitive); online ones vs. skipped. PushError (2)
    when the broker cannot be reached."""
    _check_topic_part(topic_prefix, "topic prefix")
    link = _Link(broker, topic_prefix)
    try:
        link.connect()
        return _discover(link, pattern, settle_s)
    finally:
        link.close()


# ----------------------------------------------------------------------------------------------- push


@dataclass
class DeviceResult:
    """One device's part of a push. ``phase``/``reason``/``model`` are from the last model/state carrying our
    ``request_id``; ``phases`` lists the phases seen in order; ``elapsed_s`` runs from our publish to the last
    state (to now while pending). ``outcome``: pending, acknowledged, active, failed, timed out, not sent."""

    device: str
    request_id: str
    outcome: str = PENDING
    phase: str | None = None
    reason: str | None = None
    model: dict[str, Any] | None = None
    phases: list[str] = field(default_factory=list)
    status: str | None = None
    sent_at: float | None = None
    updated_at: float | None = None
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "request_id": self.request_id,
            "outcome": self.outcome,
            "phase": self.phase,
            "reason": self.reason,
            "phases": list(self.phases),
            "model": self.model,
            "status": self.status,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class PushReport:
    """What a push did: per-device results (in push order), the skipped devices (glob: not online), the
    command's url/sha256/version, and the HTTP bytes served by client address (empty with ``url``)."""

    bundle: Path
    version: str
    sha256: str
    size: int
    url: str
    wait: bool
    timeout_s: float
    devices: list[DeviceResult]
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_served: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    elapsed_s: float = 0.0

    def device_ok(self, result: DeviceResult) -> bool:
        return result.outcome == SUCCEEDED or (not self.wait and result.outcome == ACKNOWLEDGED)

    @property
    def ok(self) -> bool:
        """Every targeted device active (``wait``) or acknowledged (no ``wait``), and no matching device skipped."""
        return bool(self.devices) and all(self.device_ok(r) for r in self.devices) and not self.skipped

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bundle": str(self.bundle),
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "url": self.url,
            "wait": self.wait,
            "timeout_s": self.timeout_s,
            "devices": [r.to_json() for r in self.devices],
            "skipped": dict(self.skipped),
            "bytes_served": dict(self.bytes_served),
            "elapsed_s": round(self.elapsed_s, 3),
        }


class _Tracker:
    """The devices' results, updated from paho's thread and read by the push loop (under ``cond``)."""

    def __init__(self, cond: threading.Condition, results: list[DeviceResult], wait: bool, served: bool) -> None:
        self.cond = cond
        self.by_device = {r.device: r for r in results}
        self.wait = wait
        self.served = served
        self.changes = 0  # state updates taken, so that the push loop reports each change

    def on_state(self, device: str, data: dict[str, Any], now: float) -> None:
        with self.cond:
            r = self.by_device.get(device)
            if r is None or r.sent_at is None or data.get("request_id") != r.request_id:
                return  # not ours: an older request's retained state, somebody else's push
            if r.outcome not in (PENDING, ACKNOWLEDGED):
                return  # already final
            phase = data.get("phase")
            if not isinstance(phase, str) or not phase:
                return
            reason = data.get("reason")
            model = data.get("model")
            r.phase = phase[:64]
            r.reason = str(reason)[:500] if reason is not None else None
            r.model = model if isinstance(model, dict) else r.model
            if not r.phases or r.phases[-1] != r.phase:
                r.phases.append(r.phase)
            self.changes += 1
            r.updated_at = now
            r.elapsed_s = now - r.sent_at
            if phase == ACTIVE:
                r.outcome = SUCCEEDED
            elif phase in FAILED_PHASES:
                r.outcome = FAILED
                if not r.reason:
                    r.reason = f"{phase} (the device gave no reason)"
            else:
                r.outcome = ACKNOWLEDGED
            self.cond.notify_all()

    def done(self, r: DeviceResult) -> bool:
        if r.outcome in (SUCCEEDED, FAILED, TIMED_OUT, NOT_SENT):
            return True
        if self.wait or r.outcome != ACKNOWLEDGED:
            return False
        # Without --wait a device that is still downloading from us needs the server: keep it up until then.
        return not (self.served and r.phase == "downloading")


def _snapshot(report: PushReport, now: float) -> PushReport:
    devices = []
    for r in report.devices:
        c = replace(r, phases=list(r.phases))
        if c.outcome in (PENDING, ACKNOWLEDGED) and c.sent_at is not None:
            c.elapsed_s = now - c.sent_at
        devices.append(c)
    return replace(report, devices=devices, skipped=dict(report.skipped), bytes_served=dict(report.bytes_served))


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _reachable_address(to_broker: str | None) -> str:
    """The address devices most likely reach this machine at, for a server bound to every interface: this end of
    the connection to the broker, unless that is loopback (the broker runs here), then the source address of the
    default route, found without sending anything. With neither (a machine with no network route: the broker and
    the devices are all here), 127.0.0.1, with a warning: --advertise says otherwise."""
    candidates = [to_broker]
    if to_broker is None or ipaddress.ip_address(to_broker.split("%")[0]).is_loopback:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # a UDP connect only picks the route: no packet is sent
            candidates.append(str(probe.getsockname()[0]))
    for address in candidates:
        if address and not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            return address
    log.warning(
        "the broker connection is local and there is no default route: advertising 127.0.0.1, which only devices on "
        "this machine reach; pass --advertise HOST for others"
    )
    return "127.0.0.1"


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc):
        raise PushError(f"--url {url!r}: devices accept only http://, https:// or file:// URLs")
    if len(url) > 2048:
        raise PushError(f"--url is {len(url)} characters; devices accept at most 2048")
    return url


@contextlib.contextmanager
def _served(info: BundleInfo, bind: str) -> Iterator[BundleServer]:
    server = serve_file(info.tar, bind, sha256=info.sha256)
    try:
        yield server
    finally:
        server.stop()


def push(
    bundle: Path,
    devices: str | Sequence[str],
    broker: BrokerSettings,
    *,
    topic_prefix: str = DEFAULT_TOPIC_PREFIX,
    wait: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    serve: str = "0.0.0.0:0",
    advertise: str | None = None,
    url: str | None = None,
    trusted: Sequence[Path] = (),
    settle_s: float = DEFAULT_SETTLE_S,
    on_progress: Callable[[PushReport], None] | None = None,
    on_start: Callable[[BundleInfo, str, list[str], dict[str, str]], None] | None = None,
) -> PushReport:
    """Push ``bundle`` (folder or .tar) to devices and follow their model/state; see the module docstring.

    ``devices``: a str is a glob matched against the online devices' retained status (``'line3-*'``; a plain id
    matches only itself); a list is explicit ids, sent to without discovery (one whose retained status says
    offline or stopped is not sent to: it would never get a non-retained command). ``timeout`` (seconds, from
    the publish) bounds the wait. ``serve``: bind of the HTTP server ("HOST:PORT"); ``advertise``: the host the
    devices use to reach it (default: the bound address if specific, else this machine's address on the
    socket that reaches the broker); ``url``: do not serve, the same .tar is already there (BUNDLE must then
    be that .tar). ``on_start(info, url, targets, skipped)`` is called once before publishing;
    ``on_progress(snapshot)`` on every change and about every 0.5 s, on the calling thread.

    Returns the report (``exit_code`` 0 or 1). PushError (code 2) for bad input; then nothing was sent.
    """
    _check_topic_part(topic_prefix, "topic prefix")
    if not timeout > 0:
        raise PushError(f"--timeout must be positive seconds, got {timeout}")
    explicit = not isinstance(devices, str)
    if isinstance(devices, str):
        pattern = devices.strip()
        if not pattern or any(c in pattern for c in "/+#"):
            raise PushError(f"--devices {devices!r} is not a device-id glob (e.g. 'line3-*'; no '/', '+', '#')")
        ids: list[str] = []
    else:
        pattern = ""
        ids = list(dict.fromkeys(_check_device_id(d) for d in devices))
        if not ids:
            raise PushError("no device given: use --device ID or --devices GLOB")
    if url is not None:
        _check_url(url)
        if Path(bundle).is_dir():
            raise PushError(
                "with --url, BUNDLE must be the very .tar that the URL serves (its sha256 goes in the command), "
                "not a folder"
            )
    if advertise is not None and (not advertise.strip() or any(c in advertise for c in "/ ")):
        raise PushError(f"--advertise {advertise!r} is not a host name or address")
    if advertise is not None and ":" in advertise and not _is_ipv6(advertise.strip("[]")):
        raise PushError(
            f"--advertise {advertise!r} is not a host name or address (the port is the server's: set it with --serve)"
        )

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-push-")))
        info = prepare_bundle(Path(bundle), work, trusted=trusted)
        link = _Link(broker, topic_prefix)
        stack.callback(link.close)
        link.connect()

        skipped: dict[str, str] = {}
        if explicit:
            targets = ids
            link.subscribe([f"{topic_prefix}/{d}/status" for d in targets])
            deadline = time.monotonic() + settle_s
            with link.cond:  # retained statuses follow the SUBACK; do not wait longer than needed
                while not all(d in link.statuses for d in targets) and time.monotonic() < deadline:
                    link.cond.wait(max(0.0, deadline - time.monotonic()))
                unknown = [d for d in targets if d not in link.statuses]
            if unknown:  # every daemon that ever connected has a retained status: the command would go nowhere
                raise PushError(
                    f"no status seen for {', '.join(unknown)} under {topic_prefix}/<device>/status within "
                    f"{settle_s:g} s: a wrong device id or --topic-prefix, a device that never connected, or no read "
                    "access to its topics; nothing was sent"
                )
        else:
            found = _discover(link, pattern, settle_s)
            if not found.online:
                offline = (
                    f"; not online: {', '.join(f'{d} ({s})' for d, s in found.skipped.items())}"
                    if found.skipped
                    else ""
                )
                raise PushError(
                    f"no online device matches {pattern!r} under {topic_prefix}/+/status "
                    f"({found.seen} device(s) seen{offline})"
                )
            targets, skipped = found.online, found.skipped

        if url is None:
            server: BundleServer | None = stack.enter_context(_served(info, serve))
            assert server is not None
            host = advertise or (server.host if server.host not in ("0.0.0.0", "::", "") else None)
            host = host or _reachable_address(link.local_address())
            the_url = server.url(host)
        else:
            server, the_url = None, url

        results = [DeviceResult(device=d, request_id=uuid.uuid4().hex) for d in targets]
        report = PushReport(
            bundle=Path(bundle),
            version=info.version,
            sha256=info.sha256,
            size=info.size,
            url=the_url,
            wait=wait,
            timeout_s=float(timeout),
            devices=results,
            skipped=skipped,
        )
        tracker = _Tracker(link.cond, results, wait, served=server is not None)
        link.on_state = tracker.on_state
        link.subscribe([f"{topic_prefix}/{d}/model/state" for d in targets])
        if on_start is not None:
            on_start(info, the_url, list(targets), dict(skipped))

        published = []  # every command goes out first, then the PUBACKs are awaited together: one slow broker
        for r in results:  # round trip, not one per device
            with link.cond:
                r.status = link.statuses.get(r.device)
            if r.status in ("offline", "stopped"):
                r.outcome, r.reason = NOT_SENT, f"device status is {r.status}: a command would never reach it"
                continue
            command = {"request_id": r.request_id, "url": the_url, "sha256": info.sha256, "version": info.version}
            with link.cond:
                r.sent_at = time.monotonic()
            published.append((r, link.publish(f"{topic_prefix}/{r.device}/model/set", json.dumps(command).encode())))
        puback_deadline = time.monotonic() + _MQTT_TIMEOUT_S
        for r, message in published:
            if not link.acknowledged(message, puback_deadline):  # lost connection, stalled broker: paho resends it,
                with link.cond:  # and the device may still answer, so it is followed until the timeout
                    r.reason = r.reason or "the broker has not acknowledged the command (no PUBACK)"
            elif (refused := link.refusal(message)) is not None:  # it never reaches the device
                with link.cond:
                    r.outcome = NOT_SENT
                    r.elapsed_s = time.monotonic() - (r.sent_at or started)
                    r.reason = (
                        f"the broker refused the command ({refused}): this user needs write access to "
                        f"{topic_prefix}/{r.device}/model/set"
                    )

        next_progress, reported = 0.0, -1
        while True:
            now = time.monotonic()
            with link.cond:
                for r in results:
                    r.status = link.statuses.get(r.device, r.status)
                    if not tracker.done(r) and r.sent_at is not None and now - r.sent_at >= timeout:
                        r.outcome = TIMED_OUT
                        r.elapsed_s = now - r.sent_at
                        r.reason = (
                            f"no answer within {timeout:g} s" + (f"; {r.reason}" if r.reason else "")
                            if r.phase is None
                            else f"still {r.phase} after {timeout:g} s" + (f"; {r.reason}" if r.reason else "")
                        )
                all_done = all(tracker.done(r) for r in results)
                if server is not None:
                    report.bytes_served = server.bytes_served
                report.elapsed_s = now - started
                snap = _snapshot(report, now)
                changed, reported = tracker.changes != reported, tracker.changes
            if on_progress is not None and (all_done or changed or now >= next_progress):
                on_progress(snap)
                next_progress = now + 0.5
            if all_done:
                break
            with link.cond:
                link.cond.wait(0.25)

        with link.cond:
            if server is not None:
                report.bytes_served = server.bytes_served
            report.finished = True
            report.elapsed_s = time.monotonic() - started
            return _snapshot(report, time.monotonic())
    raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow exceptions)


# ------------------------------------------------------------------------------------------ display


def _rich() -> Any:
    try:
        import rich.table
    except ImportError:
        raise PushError("edge-deploy push needs rich for its display: pip install 'rich>=13'") from None
    return rich.table


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


_STYLE = {SUCCEEDED: "green", FAILED: "red", TIMED_OUT: "red", NOT_SENT: "red", ACKNOWLEDGED: "cyan"}


def progress_table(report: PushReport) -> Any:
    """A rich Table of the push in progress: device, phase, reason, elapsed."""
    table = _rich().Table(
        title=f"push {report.version} ({report.sha256[:12]})",
        caption=_caption(report),
        title_justify="left",
        caption_justify="left",
    )
    for col in ("device", "phase", "reason", "elapsed"):
        table.add_column(col, no_wrap=col != "reason", overflow="fold")
    for r in report.devices:
        phase = r.phase or ("(not sent)" if r.outcome == NOT_SENT else "waiting")
        style = _STYLE.get(r.outcome, "")
        table.add_row(r.device, f"[{style}]{phase}[/]" if style else phase, r.reason or "", f"{r.elapsed_s:.1f} s")
    return table


def _caption(report: PushReport) -> str:
    served = sum(report.bytes_served.values())
    parts = []
    if served:
        parts.append(f"served {_mb(served)} to {len(report.bytes_served)} client(s)")
    if report.skipped:
        parts.append(f"{len(report.skipped)} device(s) skipped (not online)")
    return "; ".join(parts)


def summary_table(report: PushReport) -> Any:
    """A rich Table with every device's final result (skipped devices included) for the end of a push."""
    table = _rich().Table(
        title=f"push of {report.bundle.name} (version {report.version}): " + ("ok" if report.ok else "FAILED"),
        caption=_caption(report),
        title_justify="left",
        caption_justify="left",
    )
    for col in ("device", "result", "phases", "reason", "elapsed"):
        table.add_column(col, no_wrap=col not in ("reason", "phases"), overflow="fold")
    for r in report.devices:
        style = "green" if report.device_ok(r) else "red"
        result = r.outcome if r.outcome != ACKNOWLEDGED else f"acknowledged ({r.phase})"
        table.add_row(
            r.device, f"[{style}]{result}[/]", " > ".join(r.phases) or "-", r.reason or "", f"{r.elapsed_s:.1f} s"
        )
    for device, status in report.skipped.items():
        table.add_row(device, "[yellow]skipped[/]", "-", f"status {status}", "")
    return table


def read_password_file(path: Path) -> str:
    """The first line of a password file (like the daemon's mqtt.password_file). PushError (2) if unreadable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PushError(f"cannot read the password file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not lines or not lines[0]:
        raise PushError(f"the password file {path} is empty")
    return lines[0]
