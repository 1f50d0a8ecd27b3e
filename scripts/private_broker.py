"""A private MQTT broker for the demo, the tests and the streaming benchmark, on a free loopback port, with its
config and log in a work folder: Debian's Mosquitto (``Broker``), or, for the demo on a machine without it, the
embedded pure-Python amqtt broker (``EmbeddedBroker``, MQTT 3.1.1 only; DESIGN.md, "Layout").

    with Broker(Path(".demo/line/broker")) as broker:   # started; waits until the port accepts connections
        ... broker.port ...
        broker.restart(kill=True, down_s=1.0)          # a crash and a restart on the same port
    broker = private_broker(Path(".demo/line/broker"))  # mosquitto when installed, else amqtt

A missing mosquitto is an error naming the install command (CI installs it): the tests need mosquitto's
persistence, TLS and restarts. ``make_test_pki`` makes a throw-away CA with server and client certificates for
TLS tests.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The broker is missing or would not start; the message says why (with its log)."""


def mosquitto_path() -> str:
    """The mosquitto binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "mosquitto is not installed (looked in /usr/sbin and on PATH; the tests need it): "
        "install Debian's package: apt-get install -y mosquitto"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away PKI: a CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_pki(directory: Path) -> TlsFiles:
    """Generate a CA and server/client certificates (EC P-256, valid for a day) with ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("edge-inspect test CA"))
        .issuer_name(name("edge-inspect test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, _ = write("ca", ca_cert, ca_key)

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
                critical=False,
            )
        return write(cn, builder.sign(ca_key, hashes.SHA256()), key)

    server_cert, server_key = leaf("server", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)
    return TlsFiles(ca_path, server_cert, server_key, client_cert, client_key)


_B = TypeVar("_B", bound="_BrokerProcess")


class _BrokerProcess:
    """A broker process on ``port`` (a free one when None) of 127.0.0.1, logging into ``workdir``.
    Subclasses say which command runs it (``_command``) and what it is called (``name``)."""

    name = "broker"
    protocol = "5"  # the newest MQTT version it speaks: "5" or "3.1.1"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / f"{self.name.split()[0]}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def start(self: _B, timeout: float = 10.0) -> _B:
        """Start the broker and wait until its port accepts connections; BrokerError with its log if not."""
        if self.running:
            return self
        command = self._command()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"{self.name} exited with {self._proc.returncode} at start:\n{self.log_text()[-2000:]}"
                )
            if _port_open(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"{self.name} did not open port {self.port} within {timeout} s:\n{self.log_text()[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (mosquitto saves its persistence file then)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL and wait: clients see the connection drop, nothing is saved."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop (or kill) and start again on the same port, after ``down_s`` seconds down."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self: _B) -> _B:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Broker(_BrokerProcess):
    """One mosquitto process on a free 127.0.0.1 port, with its config, log and data in ``workdir``.

    ``persistence``: keep sessions, queued QoS 1 messages and retained messages across :meth:`restart`
    (mosquitto writes them when it stops on SIGTERM; a SIGKILL loses what was not saved).
    ``allow_anonymous``: False refuses every client (no password file): a broker with bad credentials.
    ``tls``: serve TLS only, with these files; the client must present a certificate signed by the CA.
    ``acl``: the text of an ACL file (mosquitto's acl_file format); its leading ``topic`` lines apply to anonymous
    clients, and every topic they do not grant is denied.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        allow_anonymous: bool = True,
        tls: TlsFiles | None = None,
        acl: str | None = None,
    ) -> None:
        super().__init__(workdir, port=port)
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.tls = tls
        self.acl = acl

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.persistence:
            lines.append(f"persistence_location {self.workdir}/")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl)
            lines.append(f"acl_file {acl_file}")
        if os.geteuid() == 0:
            # As root mosquitto drops to the "mosquitto" user, which could not write our workdir.
            lines.append(f"user {getpass.getuser()}")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _command(self) -> list[str]:
        return [mosquitto_path(), "-c", str(self._write_config())]


class EmbeddedBroker(_BrokerProcess):
    """The amqtt broker (pure Python, MQTT 3.1.1 only, anonymous, no persistence) in a child process: the demo's
    broker on a machine without mosquitto. Needs the ``demo`` extra (``pip install -e ".[demo]"``)."""

    name = "amqtt (embedded)"
    protocol = "3.1.1"

    def _command(self) -> list[str]:
        try:
            import amqtt  # noqa: F401
        except ImportError as exc:
            raise BrokerError(
                "neither mosquitto nor the embedded broker is installed: apt-get install -y mosquitto, "
                'or pip install -e ".[demo]" (amqtt)'
            ) from exc
        conf = self.workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {HOST}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]


def private_broker(workdir: Path, kind: str = "auto") -> _BrokerProcess:
    """A started private broker: ``kind`` "mosquitto", "embedded" (amqtt), or "auto" (mosquitto when it is
    installed, else amqtt). BrokerError when the one asked for cannot start."""
    if kind not in ("auto", "mosquitto", "embedded"):
        raise ValueError(f"unknown broker kind {kind!r}: expected auto, mosquitto or embedded")
    if kind == "embedded":
        return EmbeddedBroker(workdir).start()
    try:
        mosquitto_path()
    except BrokerError:
        if kind == "mosquitto":
            raise
        return EmbeddedBroker(workdir).start()
    return Broker(workdir).start()
