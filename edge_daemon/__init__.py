"""The edge daemon: capture -> preprocess -> backend -> scoring -> events -> MQTT. Never imports torch."""

__version__ = "0.1.0"
