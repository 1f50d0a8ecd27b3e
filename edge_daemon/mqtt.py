"""The daemon's MQTT link (paho-mqtt 2, CallbackAPIVersion.VERSION2): status and retained state, events and
crops through the on-disk outbox, periodic stats, commands. Topics and payloads: DESIGN.md, "MQTT".

Prefix ``P = <topic_prefix>/<device_id>``.

- ``P/status`` is retained: ``online`` after every connect, ``stopped`` at a clean stop, ``offline`` as the
  last will (QoS 1) when the daemon vanishes. After every (re)connect the link republishes status first,
  then every value given to :meth:`MqttLink.set_retained`.
- Events and crops (:meth:`MqttLink.send`) go into the :class:`~edge_daemon.spool.Spool` first, connected or
  not, and a sender thread publishes the rows in id order, QoS 1, at most ``inflight`` unacknowledged at a
  time; a row is deleted when its PUBACK arrives. Whatever was not acknowledged when a connection ends is
  sent again, in order, on the next one. An event published from the backlog (stored while disconnected,
  or handed to an earlier connection without its PUBACK) gets ``"replayed": true`` added to its JSON.
  Subscribers see every message at least once and, after de-duplicating by (event_id, seq), in order.
- Commands: subscriptions to ``P/<command topic>``; a retained command is ignored (a stale retained command
  must not re-apply at start-up) and handlers run on their own thread, so a slow or failing handler never
  stalls or kills the network.
- MQTT 5 first; when the broker refuses it (CONNACK "unsupported protocol version", or it hangs up before
  any CONNACK), the next attempt uses 3.1.1 (:func:`protocol_after_failure`).

Why one paho client per connection (our thread connects with backoff, paho's loop_start thread does the I/O
of that one connection) instead of one client with paho's automatic reconnect: paho re-sends its own
unacknowledged QoS 1 messages after a reconnect, byte for byte. Combined with our resending from the spool
that would make rows travel twice per outage, and the copies paho re-sends could not carry
``replayed: true``. paho 2.2 (installed here) has ``Client.drop_out_messages()`` to clear that queue, but
the pyproject admits any paho 2.x, and the protocol fallback needs a new client anyway (paho fixes the
protocol when a client is made). So each connection attempt gets a fresh client with a clean session
(clean_start / clean_session), nothing survives it but the spool, and the spool is the one source of
truth: after a reconnect the sender starts again from the oldest unacknowledged row. A
subscriber may then see a row twice (once on the old connection without the PUBACK reaching us, once
replayed) but never a newer row before an older one's first copy, since each connection carries a
contiguous run of rows, in id order, starting at the oldest unacknowledged one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_daemon.spool import KINDS, Spool, SpoolError

__all__ = [
    "CommandHandler",
    "MqttLink",
    "MqttSettings",
    "PROTOCOLS",
    "add_replayed_flag",
    "first_protocol",
    "protocol_after_failure",
]

log = logging.getLogger(__name__)


class _PahoNoise(logging.Filter):
    """paho's network loop logs "Client is not connected" at ERROR once after every disconnect we asked for
    (its thread runs one more iteration without a socket); the link reports real connection problems itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(__name__ + ".paho")
_PAHO_LOG.addFilter(_PahoNoise())

PROTOCOLS = ("auto", "5", "3.1.1")
# CONNACK reason codes that say "this broker does not speak MQTT 5": 0x84 in MQTT 5; a 3.1.1-only broker
# answers a v5 CONNECT with the 3.1.1 return code 1 (unacceptable protocol version).
UNSUPPORTED_PROTOCOL_CODES = frozenset({0x84, 0x01})
# Largest payload send() accepts: a crop is a JPEG of at most crop.max_side px (well under 1 MiB).
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
CONNACK_TIMEOUT_S = 10.0
COMMAND_QUEUE = 256

CommandHandler = Callable[[str, bytes], None]
"""(topic suffix relative to P, e.g. "cam0/threshold/set" or "model/set", raw payload bytes)."""


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """Where and how to connect. ``keepalive`` in seconds; ``protocol``: auto | 5 | 3.1.1."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "inspect"
    device_id: str
    client_id: str | None = None
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    protocol: str = "auto"

    def __post_init__(self) -> None:
        if not self.device_id or any(c in self.device_id for c in "/+#\0"):
            raise ValueError(f"MQTT device_id must be non-empty without '/', '+', '#': {self.device_id!r}")
        prefix = self.topic_prefix
        if not prefix or any(c in prefix for c in "+#\0") or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"MQTT topic_prefix must be non-empty, without '+', '#' or edge '/': {prefix!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"MQTT port must be in 1..65535, got {self.port}")
        if self.keepalive < 1:
            raise ValueError(f"MQTT keepalive must be >= 1 s, got {self.keepalive}")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("MQTT tls_key needs tls_cert")

    @property
    def prefix(self) -> str:
        """``<topic_prefix>/<device_id>``."""
        return f"{self.topic_prefix}/{self.device_id}"

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


def first_protocol(setting: str) -> str:
    """The protocol of the first attempt for a ``protocol`` setting: "3.1.1" when forced, else "5"."""
    return "3.1.1" if setting == "3.1.1" else "5"


def protocol_after_failure(setting: str, tried: str, connack_reason: int | None) -> str:
    """The protocol for the next attempt after a connection attempt that got no successful CONNACK.

    ``connack_reason``: the CONNACK reason code, or None when the broker hung up after our CONNECT without
    any CONNACK (some brokers do that to a protocol they do not know). A transport failure (refused TCP
    connection, TLS handshake) says nothing about the protocol: do not call this then.
    With ``setting`` "auto": MQTT 5 refused as unsupported, or hung up on, falls back to 3.1.1; a 3.1.1
    attempt that was hung up on tries 5 again (the hang-up may have been the network, not the protocol).
    Refusals for other reasons (credentials, authorisation) keep the protocol. A forced setting never changes.
    """
    if setting != "auto":
        return first_protocol(setting)
    if tried == "5" and (connack_reason is None or connack_reason in UNSUPPORTED_PROTOCOL_CODES):
        return "3.1.1"
    if tried == "3.1.1" and connack_reason is None:
        return "5"
    return tried


def add_replayed_flag(payload: bytes) -> bytes:
    """``payload`` (a JSON object) with ``"replayed": true`` added; anything else is returned unchanged."""
    try:
        obj = json.loads(payload)
    except ValueError:  # includes UnicodeDecodeError
        return payload
    if not isinstance(obj, dict):
        return payload
    obj["replayed"] = True
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _check_suffix(suffix: str) -> None:
    if not suffix or suffix.startswith("/") or any(c in suffix for c in "+#\0"):
        raise ValueError(f"bad MQTT topic suffix {suffix!r}: non-empty, no leading '/', no '+', '#' or NUL")


def _check_filter(topic: str) -> None:
    levels = topic.split("/")
    bad = not topic or "\0" in topic or topic.startswith("/")
    bad = bad or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels)
    if bad or ("#" in levels and levels.index("#") != len(levels) - 1):
        raise ValueError(
            f"bad MQTT command topic {topic!r} (relative to the device prefix; '+' and a final '#' allowed)"
        )


@dataclass(eq=False)
class _Session:
    """One paho client and one connection attempt; discarded when the connection ends."""

    protocol: str
    client: mqtt.Client | None = None
    connack: int | None = None  # CONNACK reason code once received
    connected: bool = False  # successful CONNACK, not yet disconnected
    ended: bool = False
    backlog_upto: int = 0  # rows with id <= this were stored before this connection was up: replayed
    sent_upto: int = 0  # highest row id handed to this client
    inflight: dict[int, tuple[int, str]] = field(default_factory=dict)  # paho mid -> (row id, topic); sender only
    max_packet: int | None = None  # the broker's Maximum Packet Size (MQTT 5), bytes
    dropped_why: str | None = None  # why we dropped the connection ourselves


class MqttLink:
    """The daemon's connection to its broker. Construct, :meth:`start`, use from any thread, :meth:`stop`.

    The spool is the caller's: the link reads and deletes rows but neither opens nor closes it.
    """

    def __init__(
        self,
        settings: MqttSettings,
        spool: Spool,
        *,
        command_topics: Sequence[str] = (),
        on_command: CommandHandler | None = None,
        inflight: int = 20,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        """``command_topics``: filters relative to P ("+/threshold/set", "model/set"); ``on_command`` is
        called on the link's command thread for each live (non-retained) command. ``inflight``: the most
        spooled messages published and not yet acknowledged. Reconnect attempts back off from
        ``reconnect_min_s`` doubling to ``reconnect_max_s`` seconds. ``max_payload_bytes``: larger events
        or crops are refused by :meth:`send` (logged and counted as rejected)."""
        for t in command_topics:
            _check_filter(t)
        if inflight < 1:
            raise ValueError(f"inflight must be >= 1, got {inflight}")
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(f"need 0 < reconnect_min_s <= reconnect_max_s, got {reconnect_min_s}, {reconnect_max_s}")
        self.settings = settings
        self._spool = spool
        self._prefix = settings.prefix
        self._client_id = settings.client_id or f"edge-inspect-{settings.device_id}"
        self._command_topics = tuple(command_topics)
        self._on_command = on_command
        self._window = int(inflight)
        self._min_delay = float(reconnect_min_s)
        self._max_delay = float(reconnect_max_s)
        self._max_payload = int(max_payload_bytes)
        self._protocol = first_protocol(settings.protocol)

        # Lock order: _retained_lock -> _put_lock -> _cond (-> the spool's own lock). No paho call is made
        # while holding _put_lock or _cond: paho holds its own mutexes while it runs our callbacks.
        self._cond = threading.Condition()
        self._retained_lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._session: _Session | None = None
        self._acks: list[tuple[_Session, int, int, str]] = []
        self._more = True  # the spool may hold rows the current connection has not been handed
        self._sender_exit = False
        self._stopping = threading.Event()
        self._commands: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=COMMAND_QUEUE)
        self._threads: list[threading.Thread] = []
        self._last_error: str | None = None
        self._counters = dict.fromkeys(
            (
                "connects",
                "disconnects",
                "connect_failures",
                "published",
                "acked",
                "replayed",
                "rejected",
                "spool_errors",
                "lost",
                "commands",
                "command_errors",
                "commands_ignored_retained",
                "commands_dropped",
            ),
            0,
        )

    # ---- public API -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the connection, sender and command threads; returns at once. Never raises because the
        broker is unreachable: the link keeps retrying with backoff and reports why in :meth:`stats`."""
        if self._threads:
            raise RuntimeError("MqttLink.start() called twice")
        targets: list[tuple[str, Callable[[], None]]] = [
            ("mqtt-link", self._supervise),
            ("mqtt-sender", self._send_loop),
        ]
        if self._on_command is not None:
            targets.append(("mqtt-commands", self._command_loop))
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    @property
    def connected(self) -> bool:
        """True while a connection is up (CONNACK received, not yet lost)."""
        with self._cond:
            s = self._session
            return s is not None and s.connected and not s.ended

    def set_retained(self, suffix: str, payload: bytes) -> None:
        """Remember ``payload`` as the retained value of ``P/<suffix>``: published now (QoS 1, retained) when
        connected, and again after every reconnect. ``status`` belongs to the link and is refused."""
        _check_suffix(suffix)
        if suffix == "status":
            raise ValueError("P/status is published by the link itself (online, stopped, offline)")
        data = bytes(payload)
        with self._retained_lock:
            self._retained[suffix] = data
            client = self._live_client()
            if client is not None:
                self._publish_retained(client, f"{self._prefix}/{suffix}", data)

    def send(self, suffix: str, payload: bytes, kind: str) -> None:
        """Queue an event (``kind`` "event", a JSON object) or a crop ("crop", bytes) for ``P/<suffix>``.

        Stored in the spool first, then published in order by the sender thread. Never raises for the
        state of the network or the spool: a payload over ``max_payload_bytes`` is refused, a full spool
        drops (oldest crops first), a failing spool falls back to a direct publish; all logged and counted.
        Raises ``ValueError`` for a bad suffix or kind (a caller's bug).
        """
        _check_suffix(suffix)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        topic = f"{self._prefix}/{suffix}"
        data = bytes(payload)
        if len(data) > self._max_payload:
            log.error(
                "refusing a %s of %d bytes for %s (max_payload_bytes %d)", kind, len(data), topic, self._max_payload
            )
            self._count("rejected")
            return
        try:
            with self._put_lock:
                row = self._spool.put(topic, data, kind, qos=1)
        except SpoolError as e:
            self._count("spool_errors")
            self._publish_unspooled(topic, data, kind, e)
            return
        if row:
            with self._cond:
                self._more = True
                self._cond.notify_all()

    def publish_volatile(self, suffix: str, payload: bytes) -> bool:
        """Publish ``P/<suffix>`` at QoS 0, not retained, not spooled (periodic stats). False when offline
        or when paho refuses the message."""
        _check_suffix(suffix)
        client = self._live_client()
        if client is None:
            return False
        try:
            info = client.publish(f"{self._prefix}/{suffix}", bytes(payload), qos=0, retain=False)
        except (ValueError, TypeError) as e:
            log.error("cannot publish %s: %s", suffix, e)
            return False
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def stop(self, drain_timeout_s: float = 5.0) -> bool:
        """Stop the link: wait up to ``drain_timeout_s`` seconds for the spool to empty (at once when not
        connected: everything unsent stays in the spool for the next start), publish retained
        ``P/status`` "stopped", disconnect cleanly (no last will) and end the threads. Returns True when
        the spool was empty. Idempotent."""
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        drained = False
        while True:
            try:
                drained = self._spool.depth()[0] == 0
            except SpoolError:
                drained = False
            if drained or not self.connected or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        with self._retained_lock:
            client = self._live_client()
            info = None
            if client is not None:
                try:
                    info = client.publish(f"{self._prefix}/status", b"stopped", qos=1, retain=True)
                except ValueError as e:
                    log.warning("cannot publish status stopped: %s", e)
        if client is not None:
            try:
                if info is not None:
                    info.wait_for_publish(timeout=2.0)
            except (ValueError, RuntimeError) as e:
                log.warning("status stopped not acknowledged: %s", e)
            client.disconnect()
        for thread in self._threads:
            if thread.name == "mqtt-link":
                thread.join(timeout=CONNACK_TIMEOUT_S)
        with self._cond:
            self._sender_exit = True
            self._cond.notify_all()
        with contextlib.suppress(queue.Full):
            self._commands.put_nowait(None)
        for thread in self._threads:
            if thread.name != "mqtt-link":
                thread.join(timeout=5.0)
        return drained

    def stats(self) -> dict[str, Any]:
        """Counters since start plus current state: connected, protocol, last_error (why the last attempt
        failed, e.g. the broker's CONNACK reason), inflight, spool_depth/spool_bytes, dropped_crops/events."""
        with self._stats_lock:
            out: dict[str, Any] = dict(self._counters)
            out["last_error"] = self._last_error
        with self._cond:
            s = self._session
            out["connected"] = s is not None and s.connected and not s.ended
            out["protocol"] = s.protocol if s is not None and s.connected else None
            out["inflight"] = len(s.inflight) if s is not None else 0
        try:
            out["spool_depth"], out["spool_bytes"] = self._spool.depth()
            dropped = self._spool.dropped
            out["dropped_crops"], out["dropped_events"] = dropped["crops"], dropped["events"]
        except SpoolError as e:
            out["spool_error"] = str(e)
        return out

    # ---- helpers ----------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[name] += n

    def _set_error(self, message: str | None) -> None:
        with self._stats_lock:
            self._last_error = message

    def _live_client(self) -> mqtt.Client | None:
        """The paho client of the connection that is up, or None."""
        with self._cond:
            s = self._session
            return s.client if s is not None and s.connected and not s.ended else None

    def _publish_retained(self, client: mqtt.Client, topic: str, data: bytes) -> None:
        try:
            client.publish(topic, data, qos=1, retain=True)
        except ValueError as e:
            log.error("cannot publish retained %s: %s", topic, e)

    def _publish_unspooled(self, topic: str, data: bytes, kind: str, error: SpoolError) -> None:
        """The spool failed (disk full, I/O error): publish directly when connected, without the outbox's
        guarantee; when offline the message is lost. Either way it is logged and counted."""
        client = self._live_client()
        if client is not None:
            log.error(
                "spool write failed (%s): publishing the %s on %s directly, without the outbox", error, kind, topic
            )
            try:
                client.publish(topic, data, qos=1, retain=False)
                return
            except ValueError as e:
                log.error("direct publish failed too: %s", e)
        log.error("spool write failed (%s) and no connection to publish on: the %s on %s is lost", error, kind, topic)
        self._count("lost")

    # ---- connection thread ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        delay = self._min_delay
        while not self._stopping.is_set():
            session = _Session(protocol=self._protocol)
            try:
                reached_broker = self._run_session(session)
            except Exception:  # never let the connection thread die
                log.exception("MQTT connection thread: unexpected error")
                reached_broker = False
            with self._cond:
                was_connected = session.connack == 0
                session.connected = False
                session.ended = True
                self._cond.notify_all()
            if was_connected:
                self._count("disconnects")
            if self._stopping.is_set():
                break
            if was_connected:
                delay = self._min_delay
            else:
                self._count("connect_failures")
                if reached_broker and session.connack is None and session.dropped_why is None:
                    why = "the broker closed the connection before its CONNACK"
                    hint = "TLS client certificate refused? MQTT version refused? see the paho log"
                    self._set_error(f"{why} ({hint})")
                    log.warning("%s (MQTT %s)", why, session.protocol)
                if reached_broker:
                    nxt = protocol_after_failure(self.settings.protocol, session.protocol, session.connack)
                    if nxt != session.protocol:
                        log.warning("MQTT %s refused or hung up: the next attempt uses MQTT %s", session.protocol, nxt)
                        self._protocol = nxt
                        if session.connack in UNSUPPORTED_PROTOCOL_CODES:
                            continue  # an explicit "no MQTT 5 here": retry at once
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self._max_delay)

    def _make_client(self, session: _Session) -> mqtt.Client:
        s = self.settings
        v5 = session.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=None if v5 else True,
            userdata=session,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.enable_logger(_PAHO_LOG)
        client.max_inflight_messages_set(self._window + 8)  # room for status and retained values
        client.will_set(f"{self._prefix}/status", b"offline", qos=1, retain=True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.uses_tls:
            client.tls_set(
                ca_certs=str(s.tls_ca) if s.tls_ca else None,
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
            )
            if s.tls_insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _run_session(self, session: _Session) -> bool:
        """Connect and serve one connection until it ends; True if the broker was reached (TCP and, with
        TLS, the handshake), whether or not it accepted us.

        paho's own thread (loop_start) does the network I/O: publishing from other threads is only safe
        with it, since without it paho writes to the socket from the publishing thread.
        """
        s = self.settings
        try:
            session.client = client = self._make_client(session)
            if session.protocol == "5":
                client.connect(s.host, s.port, s.keepalive, clean_start=True)
            else:
                client.connect(s.host, s.port, s.keepalive)
        except Exception as e:  # OSError, ssl.SSLError, socket.timeout, ValueError (bad TLS files)
            message = f"cannot connect to {s.host}:{s.port} (MQTT {session.protocol}): {type(e).__name__}: {e}"
            self._set_error(message)
            log.warning("%s; retrying", message)
            return False
        with self._cond:
            self._session = session
            self._cond.notify_all()
        client.loop_start()
        # Safety net: if paho's thread died of an unexpected exception, nobody would read the socket again.
        paho_thread = getattr(client, "_thread", None)
        started = time.monotonic()
        stop_seen: float | None = None
        why = ""
        with self._cond:
            while not session.ended:
                now = time.monotonic()
                if session.connack is None and now - started > CONNACK_TIMEOUT_S:
                    why = f"no CONNACK from {s.host}:{s.port} within {CONNACK_TIMEOUT_S:.0f} s"
                    break
                if isinstance(paho_thread, threading.Thread) and not paho_thread.is_alive():
                    why = "paho's network thread ended unexpectedly"
                    break
                if self._stopping.is_set():
                    stop_seen = stop_seen or now
                    if not session.connected or now - stop_seen > 5.0:
                        why = "stopping"
                        break
                self._cond.wait(0.5)
        if why:
            session.dropped_why = why
            if why != "stopping":
                self._set_error(why)
                log.warning("%s: dropping the connection", why)
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()  # abrupt on purpose: the broker publishes our last will
        client.loop_stop()
        session.client = None  # breaks the client <-> session cycle: paho's sockets close now, not at a GC
        return True

    # ---- paho callbacks (network thread; they must never raise) ---------------------------------------

    def _on_connect(self, client: mqtt.Client, session: _Session, flags: Any, reason: Any, properties: Any) -> None:
        try:
            session.connack = int(reason.value)
            if reason.is_failure:
                message = f"broker {self.settings.host}:{self.settings.port} refused the connection: {reason}"
                self._set_error(f"{message} (reason code {reason.value})")
                log.error("%s (reason code %s, MQTT %s)", message, reason.value, session.protocol)
                return
            max_packet = getattr(properties, "MaximumPacketSize", None)
            session.max_packet = int(max_packet) if max_packet else None
            if self._command_topics:
                if session.protocol == "5":
                    client.subscribe([(f"{self._prefix}/{t}", SubscribeOptions(qos=1)) for t in self._command_topics])
                else:
                    client.subscribe([(f"{self._prefix}/{t}", 1) for t in self._command_topics])
            with self._retained_lock:
                client.publish(f"{self._prefix}/status", b"online", qos=1, retain=True)
                for suffix, data in self._retained.items():
                    self._publish_retained(client, f"{self._prefix}/{suffix}", data)
                # Under _put_lock: a row stored before this point is backlog (replayed), a row stored after
                # it is live, and `connected` flips at the same instant for anyone watching.
                with self._put_lock:
                    try:
                        backlog = self._spool.last_id()
                    except SpoolError as e:
                        log.error("spool unreadable at connect: %s", e)
                        backlog = 0
                    with self._cond:
                        session.backlog_upto = backlog
                        session.connected = True
                        self._more = True
                        self._cond.notify_all()
            self._count("connects")
            self._set_error(None)
            log.info(
                "connected to %s:%s (MQTT %s) as %s; %d message(s) waiting in the spool",
                self.settings.host,
                self.settings.port,
                session.protocol,
                self._client_id,
                self._spool.depth()[0],
            )
        except Exception:
            log.exception("MQTT on_connect failed")

    def _on_disconnect(self, client: mqtt.Client, session: _Session, flags: Any, reason: Any, properties: Any) -> None:
        try:
            with self._cond:
                was_connected = session.connected
                session.connected = False
                session.ended = True
                self._cond.notify_all()
            if was_connected and not self._stopping.is_set():
                self._set_error(f"connection lost: {reason}")
                log.warning("MQTT connection lost (%s); unacknowledged messages stay in the spool", reason)
        except Exception:
            log.exception("MQTT on_disconnect failed")

    def _on_publish(self, client: mqtt.Client, session: _Session, mid: int, reason: Any, properties: Any) -> None:
        try:
            value = int(getattr(reason, "value", 0))
            with self._cond:
                self._acks.append((session, mid, value, str(reason)))
                self._cond.notify_all()
        except Exception:
            log.exception("MQTT on_publish failed")

    def _on_subscribe(self, client: mqtt.Client, session: _Session, mid: int, reasons: Any, properties: Any) -> None:
        for topic, reason in zip(self._command_topics, reasons, strict=False):
            if getattr(reason, "is_failure", False):
                log.error("subscription to %s/%s refused: %s", self._prefix, topic, reason)

    def _on_message(self, client: mqtt.Client, session: _Session, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
            if message.retain:
                self._count("commands_ignored_retained")
                log.warning("ignoring a retained command on %s: a stale retained command never re-applies", topic)
                return
            suffix = topic[len(self._prefix) + 1 :] if topic.startswith(self._prefix + "/") else topic
            try:
                self._commands.put_nowait((suffix, bytes(message.payload)))
            except queue.Full:
                self._count("commands_dropped")
                log.error("command queue full (%d): dropping a command on %s", COMMAND_QUEUE, topic)
        except Exception:
            log.exception("MQTT on_message failed")

    # ---- command thread ----------------------------------------------------------------------------

    def _command_loop(self) -> None:
        handler = self._on_command
        assert handler is not None
        while True:
            item = self._commands.get()
            if item is None:
                return
            suffix, payload = item
            self._count("commands")
            try:
                handler(suffix, payload)
            except Exception:
                self._count("command_errors")
                log.exception("command handler failed on %s (%d bytes)", suffix, len(payload))

    # ---- sender thread ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        current: _Session | None = None
        while True:
            try:
                with self._cond:
                    while True:
                        acks, self._acks = self._acks, []
                        session = self._session
                        exiting = self._sender_exit
                        ready = (
                            session is not None
                            and session.connected
                            and not session.ended
                            and self._more
                            and len(session.inflight) < self._window
                        )
                        if acks or exiting or ready or session is not current:
                            break
                        self._cond.wait(0.5)
                    if ready:
                        self._more = False
                if acks:
                    self._apply_acks(acks)
                if session is not current:
                    if current is not None:
                        self._retire(current)
                    current = session
                if exiting:
                    if current is not None and current.ended:
                        self._retire(current)
                    return
                if ready and session is not None:
                    self._send_batch(session)
            except Exception:  # e.g. the spool failing to read: try again, never die
                log.exception("MQTT sender: unexpected error; retrying in 1 s")
                with self._cond:
                    self._more = True
                time.sleep(1.0)

    def _apply_acks(self, acks: list[tuple[_Session, int, int, str]]) -> None:
        done: list[int] = []
        for session, mid, value, text in acks:
            sent = session.inflight.pop(mid, None)
            if sent is None:
                continue  # status, retained values, stats
            row_id, topic = sent
            if value >= 0x80:  # MQTT 5 only: a 3.1.1 broker drops what it refuses without a word
                # The broker's decision (an ACL, a quota), not an outage: sending it again would be refused again.
                self._count("rejected")
                why = f"the broker refused a message on {topic}: {text} (reason code {value:#x}); it is dropped"
                if value == 0x87:
                    why += " (check the broker's ACL: this device's user needs write access to its topics)"
                self._set_error(why)
                log.error("spooled message %d: %s", row_id, why)
            done.append(row_id)
        if done:
            try:
                self._spool.ack_many(done)
            except SpoolError as e:
                log.error("cannot delete acknowledged messages from the spool (they will be sent again): %s", e)
                return
            self._count("acked", len(done))

    def _retire(self, session: _Session) -> None:
        """A connection ended: its unacknowledged rows stay in the spool, with one more attempt."""
        left = [row_id for row_id, _ in session.inflight.values()]
        session.inflight.clear()
        if left:
            try:
                self._spool.mark_attempted(left)
            except SpoolError as e:
                log.error("spool: %s", e)

    def _send_batch(self, session: _Session) -> None:
        client = session.client
        if client is None:
            return
        rows = self._spool.pending(after_id=session.sent_upto, limit=self._window - len(session.inflight))
        if rows:
            with self._cond:
                self._more = True  # maybe more behind these; the next fetch will tell
        for row in rows:
            if session.ended:
                return
            replayed = row.id <= session.backlog_upto or row.attempts > 0
            payload = add_replayed_flag(row.payload) if replayed and row.kind == "event" else row.payload
            session.sent_upto = row.id
            if session.max_packet is not None and len(payload) + len(row.topic.encode()) + 16 > session.max_packet:
                self._reject(
                    row.id, f"{len(payload)} bytes exceed the broker's maximum packet size {session.max_packet}"
                )
                continue
            try:
                info = client.publish(row.topic, payload, qos=row.qos, retain=False)
            except (ValueError, TypeError) as e:
                self._reject(row.id, str(e))
                continue
            session.inflight[info.mid] = (row.id, row.topic)
            self._count("published")
            if replayed:
                self._count("replayed")

    def _reject(self, row_id: int, why: str) -> None:
        log.error("spooled message %d cannot be published (%s); it is dropped", row_id, why)
        self._count("rejected")
        try:
            self._spool.ack(row_id)
        except SpoolError as e:
            log.error("spool: %s", e)
