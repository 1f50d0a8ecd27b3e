"""systemd's notify protocol (sd_notify) without libsystemd: READY=1, WATCHDOG=1, STOPPING=1, STATUS=...

The service manager passes a datagram socket in $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace)
and, with WatchdogSec=, the interval in $WATCHDOG_USEC. Outside systemd both are absent and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("edge_daemon.notify")


class Notifier:
    """Sends sd_notify messages; never raises (a notify failure must not stop the daemon, it is logged once)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = int(usec) / 1e6 if watchdog else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (e.g. "READY=1", "STATUS=scoring 2 cameras") as one datagram. False if not sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode("utf-8"))
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")
