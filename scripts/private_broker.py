"""A private MQTT broker on a free loopback port, for the demo, the tests and the streaming benchmark.

Debian's ``mosquitto`` is used when it is installed (CI installs it); without it, ``amqtt`` (a pure-Python broker
from PyPI) when it is importable; otherwise ``BrokerUnavailable`` says what to install. The broker can be stopped,
killed and restarted on the same port, which is how the tests simulate a plant broker going down.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


class BrokerUnavailable(RuntimeError):
    """Neither mosquitto nor amqtt is available on this machine."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateBroker:
    """``with PrivateBroker() as b: ... b.port``; ``stop()``, ``kill()`` and ``restart()`` keep the port."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edge-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.kind = self._command_kind()

    @staticmethod
    def _command_kind() -> str:
        if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
            return "mosquitto"
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise BrokerUnavailable(
                "no MQTT broker here: install Debian's mosquitto (sudo apt-get install mosquitto) "
                "or the pure-Python amqtt (pip install amqtt)"
            ) from None
        return "amqtt"

    def _command(self) -> list[str]:
        log = self.workdir / "broker.log"
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                f"log_dest file {log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            )
            return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]

    def start(self, timeout_s: float = 10.0) -> PrivateBroker:
        """Start the broker and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.workdir / "stderr.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} on port {self.port}: {err}")
            if _accepts(self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not accept connections on port {self.port} within {timeout_s} s")

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 5
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: a clean broker shutdown."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything (a crash, a pulled cable)."""
        self._end(signal.SIGKILL)

    def restart(self) -> PrivateBroker:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivateBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
