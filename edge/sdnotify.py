"""systemd notify protocol (Type=notify + WatchdogSec): READY=1 once, WATCHDOG=1 at least every WatchdogSec/2.

A datagram to the socket named by $NOTIFY_SOCKET ('@' = abstract namespace). Outside systemd it does nothing.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict | None = None, clock=time.monotonic) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        # Feed at a third of the period: comfortably inside systemd's WatchdogSec/2 advice.
        self.interval_s = int(usec) / 1e6 / 3 if usec.isdigit() and int(usec) > 0 else None
        self.clock = clock
        self._last_feed = float("-inf")

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, message: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(self.address)
            sock.sendall(message.encode())

    def ready(self, status: str = "running") -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Call from the main loop every iteration; sends at most once per interval."""
        if self.interval_s is None:
            return
        now = self.clock()
        if now - self._last_feed >= self.interval_s:
            self._last_feed = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
