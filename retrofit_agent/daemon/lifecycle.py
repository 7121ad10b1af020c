"""Process lifecycle: the systemd notify protocol and stop signals.

The notify protocol is written directly to ``$NOTIFY_SOCKET`` (a unix datagram socket,
``@`` meaning the abstract namespace), so no libsystemd binding is needed and nothing
happens when the daemon runs outside systemd.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("retrofit_agent.daemon.lifecycle")


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._clock = clock
        self._addr: str | bytes | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wd = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())) else 0.0
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval = wd / 2 if wd else 0.0
        self._last_ping = float("-inf")

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> None:
        if self._sock is None or self._addr is None:
            return
        try:
            self._sock.sendto(state.encode(), self._addr)
        except OSError as e:  # systemd gone or socket full: never fatal
            log.warning("systemd_notify_failed", state=state.split("=")[0], error=str(e))

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Called by the frame loop after a processed frame; rate-limited to the ping interval.

        Only frame progress pings, so a daemon whose source or model is stuck is
        restarted by systemd.
        """
        if not self.watchdog_interval:
            return
        now = self._clock()
        if now - self._last_ping >= self.watchdog_interval:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StopSignal:
    """SIGTERM/SIGINT set an event the frame loop polls; SIGHUP sets a reload request."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reload = threading.Event()
        self.reason = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload.set())

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self, reason: str) -> None:
        self.reason = reason
        self.event.set()
