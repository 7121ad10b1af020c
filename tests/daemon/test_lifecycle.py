import os
import socket
from pathlib import Path

import pytest
import structlog

from retrofit_agent.daemon.lifecycle import SystemdNotifier


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def systemd_socket(tmp_path: Path):
    """A real unix datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    yield path, s
    s.close()


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


def test_ready_watchdog_stopping(systemd_socket):
    path, s = systemd_socket
    clock = FakeClock()
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    n = SystemdNotifier(env, clock=clock)
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("labelling cam")
    for _ in range(10):  # ten frames within 0.5 s: one ping
        n.watchdog()
        clock.t += 0.05
    clock.t += 1.0
    n.watchdog()
    n.stopping()
    assert received(s) == ["READY=1\nSTATUS=labelling cam", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_namespace_socket():
    name = f"retrofit-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(1)
    try:
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_watchdog_for_another_pid_is_ignored(systemd_socket):
    path, _ = systemd_socket
    n = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval == 0.0


def test_harmless_without_systemd():
    n = SystemdNotifier({})
    assert not n.enabled
    n.ready()
    n.watchdog()
    n.stopping()
    n.close()


def test_vanished_socket_is_not_fatal(tmp_path: Path):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with structlog.testing.capture_logs() as logs:
        n.ready()  # does not raise
    (warning,) = [l for l in logs if l["event"] == "systemd_notify_failed"]
    assert warning["log_level"] == "warning" and warning["state"] == "READY" and warning["error"]
