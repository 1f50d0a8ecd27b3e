"""Real MQTT for tests: Debian's Mosquitto on a free loopback port, and a recording subscriber.

Import it from a test module (``from tests.mqtt_broker import Broker, Subscriber``); it is not a conftest.
A missing mosquitto is an error with the install command, never a skip: CI installs it.

    with Broker(tmp_path / "mqtt") as broker:           # started, waits until the port accepts connections
        sub = Subscriber(broker.port, "inspect/#").start()   # subscribed (SUBACK received)
        ...
        sub.wait_for(lambda msgs: len(msgs) >= 3, what="three messages")
        broker.restart()                                   # same port; kill() is SIGKILL
        sub.stop()
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from private_broker import (  # noqa: E402
    HOST,
    Broker,
    BrokerError,
    EmbeddedBroker,
    TlsFiles,
    free_port,
    make_test_pki,
    mosquitto_path,
)

__all__ = [
    "Broker",
    "BrokerError",
    "EmbeddedBroker",
    "Received",
    "Subscriber",
    "TlsFiles",
    "broker",
    "free_port",
    "make_test_pki",
    "mosquitto_path",
    "publish",
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A started, non-persistent broker for one test (import this fixture into a test module to use it)."""
    with Broker(tmp_path / "mosquitto") as b:
        yield b


@dataclass(frozen=True)
class Received:
    """One message as the subscriber got it; ``t`` is time.monotonic() at arrival."""

    topic: str
    payload: bytes
    retain: bool
    t: float


class Subscriber:
    """A paho v2 client recording every message under ``topic_filters`` (QoS 1), thread-safe.

    It has a fixed client id and a persistent session (clean_session False), and subscribes again on every
    connect: with a persistent broker it gets what was queued while it was away; without one (sessions are
    lost on a broker restart) it at least keeps listening. It reconnects by itself (0.1 s to 1 s backoff).
    """

    def __init__(
        self,
        port: int,
        topic_filters: str | Sequence[str],
        *,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    ) -> None:
        self.port = port
        self.filters = [topic_filters] if isinstance(topic_filters, str) else list(topic_filters)
        self.client_id = client_id or f"test-sub-{uuid.uuid4().hex[:10]}"
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self.connects = 0
        clean = None if protocol == MQTTProtocolVersion.MQTTv5 else False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=clean, protocol=protocol
        )
        self._client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            return
        self.connects += 1
        client.subscribe([(f, 1) for f in self.filters])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: object, props: object) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received = Received(message.topic, bytes(message.payload), bool(message.retain), time.monotonic())
        with self._lock:
            self._messages.append(received)

    def start(self, timeout: float = 10.0) -> Subscriber:
        """Connect and wait for the first SUBACK."""
        self._client.connect(HOST, self.port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"subscriber {self.client_id} got no SUBACK from port {self.port} in {timeout} s")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def messages(self) -> list[Received]:
        """A copy of everything received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    def on(self, topic: str) -> list[Received]:
        """The messages received on exactly ``topic``."""
        return [m for m in self.messages if m.topic == topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0, what: str = "a condition"
    ) -> list[Received]:
        """Poll until ``predicate(messages)`` holds; returns the messages, or fails with what was received."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages
            if predicate(msgs):
                return msgs
            if time.monotonic() > deadline:
                tail = "\n".join(f"  {m.topic} retain={m.retain} {m.payload[:80]!r}" for m in msgs[-8:])
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; {len(msgs)} messages:\n{tail}")
            time.sleep(0.05)


def publish(port: int, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
    """Publish one message from a throw-away client and wait until the broker has it (QoS 1 PUBACK)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:10]}")
    client.connect(HOST, port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10.0)
        if not info.is_published():
            raise AssertionError(f"publish to {topic} was not acknowledged within 10 s")
    finally:
        client.disconnect()
        client.loop_stop()
