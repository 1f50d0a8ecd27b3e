"""The daemon's MQTT link against a real mosquitto on a free port: status and last will, ordered at-least-once
delivery through the spool across broker restarts, replay flags, retained state, commands, MQTT 3.1.1."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_daemon.mqtt import MqttLink, MqttSettings, add_replayed_flag, protocol_after_failure
from edge_daemon.spool import Spool
from tests.mqtt_broker import Broker, EmbeddedBroker, Received, Subscriber, free_port, make_test_pki, publish

REPO = Path(__file__).resolve().parents[1]
DEVICE = "line3-cam-a"
PREFIX = "inspect-test"
P = f"{PREFIX}/{DEVICE}"
EVENTS = f"{P}/cam0/events"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "mosquitto") as b:
        yield b


def make_link(port: int, spool: Spool, **kwargs: object) -> MqttLink:
    protocol = str(kwargs.pop("protocol", "auto"))
    username = kwargs.pop("username", None)
    settings = MqttSettings(
        port=port,
        topic_prefix=PREFIX,
        device_id=DEVICE,
        protocol=protocol,
        username=str(username) if username else None,
        password="secret" if username else None,
    )
    return MqttLink(settings, spool, reconnect_min_s=0.2, reconnect_max_s=1.0, **kwargs)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def event(n: int) -> bytes:
    """Event n of a stream: 4 messages (seq 0..3) per event id."""
    return json.dumps({"type": "update", "event_id": f"ev{n // 4}", "seq": n % 4, "n": n}).encode()


def events_of(messages: list[Received]) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in messages if m.topic == EVENTS]


def first_copies(events: list[dict[str, object]]) -> list[int]:
    """The stream as a subscriber sees it after de-duplicating QoS 1 redelivery by (event_id, seq)."""
    seen: set[tuple[object, object]] = set()
    order = []
    for e in events:
        key = (e["event_id"], e["seq"])
        if key not in seen:
            seen.add(key)
            order.append(int(e["n"]))  # type: ignore[call-overload]
    return order


def statuses(sub: Subscriber) -> list[bytes]:
    return [m.payload for m in sub.on(f"{P}/status")]


# ---- pure functions -------------------------------------------------------------------------------------


def test_protocol_fallback_decision() -> None:
    assert protocol_after_failure("auto", "5", 0x84) == "3.1.1"  # MQTT 5: unsupported protocol version
    assert protocol_after_failure("auto", "5", 0x01) == "3.1.1"  # a 3.1.1 broker's "unacceptable protocol"
    assert protocol_after_failure("auto", "5", None) == "3.1.1"  # hung up without CONNACK
    assert protocol_after_failure("auto", "3.1.1", None) == "5"  # maybe the network: try 5 again
    assert protocol_after_failure("auto", "5", 0x86) == "5"  # bad user name or password: not the protocol
    assert protocol_after_failure("auto", "3.1.1", 0x87) == "3.1.1"
    assert protocol_after_failure("5", "5", 0x84) == "5"  # forced: never changes
    assert protocol_after_failure("3.1.1", "3.1.1", None) == "3.1.1"


def test_replayed_flag_is_added_to_json_objects_only() -> None:
    assert json.loads(add_replayed_flag(b'{"event_id": "e1", "seq": 2}')) == {
        "event_id": "e1",
        "seq": 2,
        "replayed": True,
    }
    assert json.loads(add_replayed_flag('{"camera": "caméra"}'.encode())) == {"camera": "caméra", "replayed": True}
    for payload in (b"[1, 2]", b"not json", b"\xff\xfe\x00", b""):
        assert add_replayed_flag(payload) == payload


def test_settings_and_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device_id"):
        MqttSettings(device_id="a/b")
    with pytest.raises(ValueError, match="protocol"):
        MqttSettings(device_id="a", protocol="4")
    with pytest.raises(ValueError, match="topic_prefix"):
        MqttSettings(device_id="a", topic_prefix="x/#")
    spool = Spool(tmp_path / "s.db", 10_000)
    with pytest.raises(ValueError, match="command topic"):
        MqttLink(MqttSettings(device_id="a"), spool, command_topics=["#/x"])
    link = MqttLink(MqttSettings(device_id="a"), spool)
    with pytest.raises(ValueError, match="suffix"):
        link.send("cam0/+/events", b"{}", "event")
    with pytest.raises(ValueError, match="kind"):
        link.send("cam0/events", b"{}", "video")
    with pytest.raises(ValueError, match="status"):
        link.set_retained("status", b"online")
    assert link.publish_volatile("stats", b"{}") is False  # never started: offline
    spool.close()


# ---- against mosquitto --------------------------------------------------------------------------------


def test_status_online_then_stopped_and_events_in_order(broker: Broker, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 10_000_000)
    with Subscriber(broker.port, f"{P}/#") as sub:
        link = make_link(broker.port, spool)
        link.start()
        sub.wait_for(lambda m: b"online" in statuses(sub), what="status online")
        link.set_retained("info", b'{"model": "ae"}')
        for n in range(60):
            if n % 4 == 0:  # a crop before the event that names it
                link.send(f"cam0/crop/ev{n // 4}", b"\xff\xd8 jpeg " + bytes([n]), "crop")
            link.send("cam0/events", event(n), "event")
        assert link.publish_volatile("stats", b'{"fps": 1}') is True
        msgs = sub.wait_for(lambda m: len(events_of(m)) >= 60, what="60 events")
        events = events_of(msgs)
        assert [e["n"] for e in events] == list(range(60))  # in order, each once
        assert not any(e.get("replayed") for e in events)  # live: connected all along
        topics = [m.topic for m in msgs]
        for k in range(15):  # each crop arrives before its event
            assert topics.index(f"{P}/cam0/crop/ev{k}") < next(
                i for i, m in enumerate(msgs) if m.topic == EVENTS and json.loads(m.payload)["n"] == 4 * k
            )
        wait_until(lambda: spool.depth() == (0, 0), "the spool to drain")

        assert link.stop(drain_timeout_s=10) is True
        sub.wait_for(lambda m: statuses(sub)[-1:] == [b"stopped"], what="status stopped")
        stats = link.stats()
        assert stats["acked"] == 75 and stats["connects"] == 1 and stats["protocol"] is None
    with Subscriber(broker.port, f"{P}/#") as late:  # what a newcomer sees: retained values
        msgs = late.wait_for(lambda m: len(m) >= 2, what="retained status and info")
        assert {(m.topic, m.payload, m.retain) for m in msgs} == {
            (f"{P}/status", b"stopped", True),
            (f"{P}/info", b'{"model": "ae"}', True),
        }
    spool.close()


def test_last_will_offline_when_the_daemon_is_killed(broker: Broker, tmp_path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from edge_daemon.mqtt import MqttLink, MqttSettings
        from edge_daemon.spool import Spool
        settings = MqttSettings(port={broker.port}, topic_prefix={PREFIX!r}, device_id={DEVICE!r})
        link = MqttLink(settings, Spool(Path({str(tmp_path / "spool.db")!r}), 1_000_000))
        link.start()
        while not link.connected:
            time.sleep(0.02)
        print("connected", flush=True)
        time.sleep(120)
        """
    )
    with Subscriber(broker.port, f"{P}/status") as sub:
        proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"connected\n"
            sub.wait_for(lambda m: statuses(sub) == [b"online"], what="status online")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        sub.wait_for(lambda m: statuses(sub) == [b"online", b"offline"], what="the last will")
    with Subscriber(broker.port, f"{P}/status") as late:
        late.wait_for(lambda m: [(x.payload, x.retain) for x in m] == [(b"offline", True)], what="retained offline")


def test_broker_restarts_lose_nothing_and_keep_order(tmp_path: Path) -> None:
    """~200 events while the broker is stopped and restarted 3 times: the subscriber (persistent session on
    a persistent broker, so the broker keeps its queue across restarts) gets every (event_id, seq) at least
    once, in order after de-duplication; those stored while the link was down are flagged replayed."""
    broker = Broker(tmp_path / "mosquitto", persistence=True).start()
    sub = Subscriber(broker.port, f"{P}/#", client_id="test-restarts-sub").start()
    spool = Spool(tmp_path / "spool.db", 10_000_000)
    link = make_link(broker.port, spool)
    link.start()
    try:
        wait_until(lambda: link.connected, "the first connection")
        stored_offline: list[int] = []
        total = 200

        def produce() -> None:
            for n in range(total):
                before = link.connected, link.stats()["connects"]
                link.send("cam0/events", event(n), "event")
                after = link.connected, link.stats()["connects"]
                if before == after and not before[0]:  # certainly stored while disconnected
                    stored_offline.append(n)
                time.sleep(0.03)

        producer = threading.Thread(target=produce)
        producer.start()
        for _ in range(3):
            time.sleep(1.0)
            broker.restart(down_s=0.7)
        producer.join()

        msgs = sub.wait_for(
            lambda m: {e["n"] for e in events_of(m)} >= set(range(total)), timeout=30, what="every event"
        )
        events = events_of(msgs)
        assert first_copies(events) == list(range(total))
        replayed = {e["n"] for e in events if e.get("replayed") is True}
        assert stored_offline, "the producer never saw the link down: the test did not test outages"
        assert set(stored_offline) <= replayed
        wait_until(lambda: spool.depth() == (0, 0), "the spool to drain")
        wait_until(lambda: link.connected and link.stats()["connects"] >= 4, "the third reconnection")
        stats = link.stats()
        assert stats["disconnects"] >= 3 and stats["connects"] >= 4 and stats["replayed"] >= len(stored_offline)
        assert link.stop() is True
    finally:
        link.stop(drain_timeout_s=0)
        sub.stop()
        broker.stop()
        spool.close()


def test_backlog_stored_offline_is_replayed_in_order_and_a_full_spool_drops_crops(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "mosquitto", persistence=True).start()
    sub = Subscriber(broker.port, f"{P}/#", client_id="test-backlog-sub").start()
    broker.stop()  # the subscriber's session is saved; the link will start with the broker down
    spool = Spool(tmp_path / "spool.db", 20_000)
    link = make_link(broker.port, spool, max_payload_bytes=10_000)
    link.start()
    try:
        wait_until(lambda: "refused" in str(link.stats()["last_error"]), "a failed connection attempt")
        for n in range(40):
            if n % 4 == 0:
                link.send(f"cam0/crop/ev{n // 4}", bytes([n]) * 3000, "crop")
            link.send("cam0/events", event(n), "event")
        link.send("cam0/crop/huge", b"x" * 20_000, "crop")  # over max_payload_bytes: refused, counted
        link.send("cam0/events", b"\xff not json", "event")  # published as is, never crashes
        stats = link.stats()
        assert not stats["connected"] and stats["rejected"] == 1
        assert stats["dropped_crops"] > 0 and stats["dropped_events"] == 0  # 30 kB of crops in a 20 kB spool
        assert stats["spool_depth"] == 41 + 10 - stats["dropped_crops"]

        broker.start()
        msgs = sub.wait_for(lambda m: any(x.payload == b"\xff not json" for x in m), timeout=30, what="the backlog")
        events = events_of([m for m in msgs if m.payload != b"\xff not json"])
        assert [e["n"] for e in events] == list(range(40))
        assert all(e["replayed"] is True for e in events)
        crops = [m for m in msgs if "/crop/" in m.topic]
        assert len(crops) == 10 - stats["dropped_crops"] and all(len(c.payload) == 3000 for c in crops)
        assert [c.topic for c in crops] == [f"{P}/cam0/crop/ev{k}" for k in range(10 - len(crops), 10)]  # newest kept
        wait_until(lambda: spool.depth() == (0, 0), "the spool to drain")
        assert link.stop() is True
    finally:
        link.stop(drain_timeout_s=0)
        sub.stop()
        broker.stop()
        spool.close()


def test_spool_of_a_killed_daemon_is_replayed_by_the_next_one(tmp_path: Path) -> None:
    """A daemon stores events while its broker is down and is SIGKILLed; the next daemon on the same spool
    publishes every one of them, in order, flagged replayed."""
    broker = Broker(tmp_path / "mosquitto")  # its port is chosen; nothing listens there yet
    spool_path = tmp_path / "spool.db"
    child = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from edge_daemon.mqtt import MqttLink, MqttSettings
        from edge_daemon.spool import Spool
        settings = MqttSettings(port={broker.port}, topic_prefix={PREFIX!r}, device_id={DEVICE!r})
        link = MqttLink(settings, Spool(Path({str(spool_path)!r}), 1_000_000))
        link.start()
        for n in range(30):
            body = {{"event_id": "ev%d" % (n // 4), "seq": n % 4, "n": n}}
            link.send("cam0/events", json.dumps(body).encode(), "event")
        print("stored", flush=True)
        import time; time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"stored\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    with broker, Subscriber(broker.port, EVENTS) as sub:
        spool = Spool(spool_path, 1_000_000)
        assert spool.depth()[0] == 30
        link = make_link(broker.port, spool)
        link.start()
        msgs = sub.wait_for(lambda m: len(m) >= 30, what="the 30 stored events")
        events = events_of(msgs)
        assert [e["n"] for e in events] == list(range(30)) and all(e["replayed"] is True for e in events)
        assert link.stop() is True
        spool.close()


def test_stop_while_offline_keeps_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    link = make_link(free_port(), spool)  # nothing listens there
    link.start()
    link.send("cam0/events", event(0), "event")
    wait_until(lambda: link.stats()["connect_failures"] >= 1, "a failed attempt")
    started = time.monotonic()
    assert link.stop(drain_timeout_s=30) is False  # returns at once: nothing to drain to
    assert time.monotonic() - started < 15
    assert spool.depth()[0] == 1
    spool.close()


def test_retained_values_are_republished_after_a_reconnect(broker: Broker, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    link = make_link(broker.port, spool)
    link.set_retained("info", b'{"v": 1}')  # before start: published at the first connect
    link.start()
    wait_until(lambda: link.connected, "the connection")
    link.set_retained("cam0/status", b'{"status": "online"}')
    link.set_retained("info", b'{"v": 2}')  # replaces v1
    broker.restart(kill=True)  # non-persistent: the broker forgets every retained message
    wait_until(lambda: link.stats()["connects"] >= 2 and link.connected, "the reconnection")
    wanted = {(f"{P}/status", b"online"), (f"{P}/info", b'{"v": 2}'), (f"{P}/cam0/status", b'{"status": "online"}')}
    with Subscriber(broker.port, f"{P}/#") as watcher:  # live or retained: once seen, the broker holds them
        watcher.wait_for(lambda m: wanted <= {(x.topic, x.payload) for x in m}, what="the republished values")
    with Subscriber(broker.port, f"{P}/#") as late:
        msgs = late.wait_for(lambda m: len(m) >= 3, what="three retained values")
        assert {(m.topic, m.payload, m.retain) for m in msgs} == {(t, p, True) for t, p in wanted}
    link.stop()
    spool.close()


def test_commands_retained_ignored_live_delivered_bad_ones_survived(broker: Broker, tmp_path: Path) -> None:
    publish(broker.port, f"{P}/cam0/threshold/set", b'{"threshold": 0.1}', retain=True)  # stale
    got: list[tuple[str, bytes]] = []

    def handler(suffix: str, payload: bytes) -> None:
        got.append((suffix, payload))
        if payload == b"boom":
            raise RuntimeError("handler bug")

    spool = Spool(tmp_path / "spool.db", 1_000_000)
    link = make_link(broker.port, spool, command_topics=("+/threshold/set", "model/set"), on_command=handler)
    link.start()
    # The retained command arrives with the subscription: once it was ignored, the subscription is live.
    wait_until(lambda: link.stats()["commands_ignored_retained"] == 1, "the retained command to be ignored")
    publish(broker.port, f"{P}/cam1/threshold/set", b'{"threshold": 0.7}')
    publish(broker.port, f"{P}/model/set", b"\xff\xfe\x00 not utf-8")
    publish(broker.port, f"{P}/model/set", b"boom")
    publish(broker.port, f"{P}/model/set", b"after")
    publish(broker.port, f"{P}/other/set", b"not subscribed")
    wait_until(lambda: len(got) >= 4, "four live commands")
    assert got == [
        ("cam1/threshold/set", b'{"threshold": 0.7}'),
        ("model/set", b"\xff\xfe\x00 not utf-8"),
        ("model/set", b"boom"),
        ("model/set", b"after"),
    ]
    stats = link.stats()
    assert stats["command_errors"] == 1 and stats["commands"] == 4 and link.connected
    with Subscriber(broker.port, EVENTS) as sub:  # the link still works after the failing handler
        link.send("cam0/events", event(0), "event")
        sub.wait_for(lambda m: len(m) == 1, what="an event")
    link.stop()
    spool.close()


def test_mqtt_311_forced(broker: Broker, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    got: list[tuple[str, bytes]] = []
    with Subscriber(broker.port, f"{P}/#") as sub:
        link = make_link(
            broker.port,
            spool,
            protocol="3.1.1",
            command_topics=("model/set",),
            on_command=lambda s, p: got.append((s, p)),
        )
        link.start()
        wait_until(lambda: link.connected, "the connection")
        assert link.stats()["protocol"] == "3.1.1"
        for n in range(20):
            link.send("cam0/events", event(n), "event")
        sub.wait_for(lambda m: len(events_of(m)) >= 20, what="20 events")
        assert [e["n"] for e in events_of(sub.messages)] == list(range(20))
        publish(broker.port, f"{P}/model/set", b'{"request_id": "r1"}')
        wait_until(lambda: got == [("model/set", b'{"request_id": "r1"}')], "the command")
        assert link.stop() is True
        sub.wait_for(lambda m: statuses(sub) == [b"online", b"stopped"], what="online then stopped")
    spool.close()


class V311OnlyFront:
    """A TCP front for the real broker that acts like a broker without MQTT 5: a CONNECT with protocol level
    5 gets the 3.1.1 CONNACK "unacceptable protocol version" and is closed; other connections are relayed."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.refused_v5 = 0
        self.relayed = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = self._read(conn, 1)
            length, shift, raw_len = 0, 0, b""
            while True:
                byte = self._read(conn, 1)
                raw_len += byte
                length |= (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            body = self._read(conn, length)
            name_len = int.from_bytes(body[:2], "big")
            level = body[2 + name_len]
            if level == 5:
                self.refused_v5 += 1
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            self.relayed += 1
            backend = socket.create_connection(("127.0.0.1", self.backend_port))
            backend.sendall(head + raw_len + body)
            threading.Thread(target=self._pipe, args=(backend, conn), daemon=True).start()
            self._pipe(conn, backend)
        except (OSError, ConnectionError, IndexError):
            conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._server.close()


def test_auto_falls_back_to_311_when_the_broker_refuses_mqtt5(broker: Broker, tmp_path: Path) -> None:
    front = V311OnlyFront(broker.port)
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    with Subscriber(broker.port, EVENTS) as sub:
        link = make_link(front.port, spool)  # protocol "auto": MQTT 5 first
        link.start()
        wait_until(lambda: link.connected, "the connection through the 3.1.1-only front")
        assert front.refused_v5 >= 1 and front.relayed >= 1 and link.stats()["protocol"] == "3.1.1"
        link.send("cam0/events", event(0), "event")
        sub.wait_for(lambda m: len(m) == 1, what="the event")
        assert link.stop() is True
    front.close()
    spool.close()


def test_auto_finds_311_on_a_real_311_only_broker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """amqtt (the demo's embedded broker) speaks only MQTT 3.1.1 and hangs up on our MQTT 5 CONNECT (it cannot
    parse its will) instead of answering "unsupported protocol": the link still settles on 3.1.1 and delivers."""
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    with EmbeddedBroker(tmp_path / "amqtt") as broker, Subscriber(broker.port, EVENTS) as sub:
        link = make_link(broker.port, spool)  # protocol "auto": MQTT 5 first
        link.start()
        wait_until(lambda: link.connected, "the connection to the 3.1.1-only broker")
        assert link.stats()["protocol"] == "3.1.1"
        assert "MQTT 5 refused or hung up: the next attempt uses MQTT 3.1.1" in caplog.text
        for n in range(8):
            link.send("cam0/events", event(n), "event")
        sub.wait_for(lambda m: len(events_of(m)) == 8, what="8 events")
        assert [e["n"] for e in events_of(sub.messages)] == list(range(8))
        assert link.stop() is True
    spool.close()


def test_refused_credentials_are_reported_and_retried(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "mosquitto", allow_anonymous=False).start()  # no password file: refuses all
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    link = make_link(broker.port, spool, username="line3")
    link.start()
    try:
        wait_until(lambda: link.stats()["connect_failures"] >= 2, "two refused attempts")
        stats = link.stats()
        assert not stats["connected"] and "refused the connection" in str(stats["last_error"])
        assert "authori" in str(stats["last_error"]).lower() or "password" in str(stats["last_error"]).lower()
        link.send("cam0/events", event(0), "event")  # kept in the spool meanwhile
        broker.stop()
        broker.allow_anonymous = True
        broker.start()
        wait_until(lambda: link.connected and spool.depth()[0] == 0, "the reconnection and the delivery")
        assert link.stop() is True
    finally:
        link.stop(drain_timeout_s=0)
        broker.stop()
        spool.close()


def test_tls_with_client_certificate(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    broker = Broker(tmp_path / "mosquitto", tls=pki).start()
    spool = Spool(tmp_path / "spool.db", 1_000_000)
    settings = MqttSettings(
        port=broker.port,
        topic_prefix=PREFIX,
        device_id=DEVICE,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
    )
    link = MqttLink(settings, spool, reconnect_min_s=0.2, reconnect_max_s=1.0)
    # Without a client certificate the handshake fails: reported, retried, never raised.
    anonymous = MqttLink(
        MqttSettings(port=broker.port, topic_prefix=PREFIX, device_id="intruder", tls_ca=pki.ca),
        Spool(tmp_path / "other.db", 1_000_000),
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )
    try:
        link.start()
        anonymous.start()
        link.send("cam0/events", event(0), "event")
        wait_until(lambda: link.connected and spool.depth()[0] == 0, "the TLS connection and the PUBACK")
        wait_until(lambda: anonymous.stats()["connect_failures"] >= 2, "refused TLS attempts")
        assert not anonymous.connected and anonymous.stats()["last_error"]
        assert link.stop() is True
    finally:
        link.stop(drain_timeout_s=0)
        anonymous.stop(drain_timeout_s=0)
        broker.stop()
        spool.close()


def test_a_message_the_broker_refuses_is_dropped_and_the_link_says_why(tmp_path: Path) -> None:
    """MQTT 5: a broker whose ACL denies the events topic answers "Not authorized" in the PUBACK. Sending it again
    would be refused again, so it is dropped and counted, and the link's last_error (healthz) names the topic and
    the ACL (it was only a log line); what the ACL allows still goes out."""
    allowed = f"{P}/cam0/allowed"
    with (
        Broker(tmp_path / "acl", acl=f"topic readwrite {allowed}\n") as broker,
        Subscriber(broker.port, allowed) as sub,
    ):
        spool = Spool(tmp_path / "spool.db", 1_000_000)
        link = make_link(broker.port, spool)
        link.start()
        wait_until(lambda: link.connected, "the connection")
        link.send("cam0/events", event(0), "event")
        link.send("cam0/allowed", event(1), "event")
        sub.wait_for(lambda m: len(m) == 1, what="the allowed message")
        wait_until(lambda: link.stats()["spool_depth"] == 0, "both messages acknowledged")
        stats = link.stats()
        assert stats["protocol"] == "5" and stats["rejected"] == 1 and stats["acked"] == 2
        assert f"{P}/cam0/events" in stats["last_error"] and "Not authorized" in stats["last_error"]
        assert "ACL" in stats["last_error"]
        assert link.stop() is True
        spool.close()
