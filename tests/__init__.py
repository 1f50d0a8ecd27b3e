"""Tests; a package so that test modules can share helpers (from tests.mqtt_broker import Broker)."""
