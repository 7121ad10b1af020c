"""Helpers shared by the tests: paths, free ports, a daemon runner, ZeroMQ receive, CLI runs.

Imported by test modules as ``helpers`` (tests/ is on sys.path through conftest); fixtures
stay in conftest.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
# The shipped reference bundle: trained on the procedural world (models/build_reference.sh).
REFERENCE = REPO / "models" / "reference"
# A bundle with the reference's architecture, bank and prompts but seeded, untrained weights
# (python -m retrofit_agent.train.reference): the tests of the daemon's mechanics use it, because
# what it publishes does not depend on a training run (its cyclists.present is on for every frame
# of the generated clips, which the capture tests rely on).
SEEDED = REPO / "tests" / "fixtures" / "seeded-bundle"

# Every daemon the tests start runs with torch, timm and open_clip made unimportable, so
# each end-to-end test also proves the runtime is torch-free.
_NO_TORCH = (
    "import sys\n"
    "for m in ('torch', 'torchvision', 'timm', 'open_clip'): sys.modules[m] = None\n"
    "from retrofit_agent.daemon.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-c", _NO_TORCH, *args]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Tests stop servers and start them again on the same port (a broker, a store, a central
    Prometheus). A port from the ephemeral range can meanwhile be handed to any outgoing
    connection on the machine as its local port, or to a client reconnecting to that very port,
    which then connects to itself; the restart then fails with EADDRINUSE (seen in CI). Ports
    below the range are only ever taken by a bind.
    """
    low = _ephemeral_low()
    for port in random.sample(range(max(1024, low - 12000), low), 400):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range below is crowded: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningAgent:
    def __init__(self, proc: subprocess.Popen, endpoint: str, metrics_port: int, log_path: Path) -> None:
        self.proc = proc
        self.endpoint = endpoint
        self.metrics_port = metrics_port
        self.log_path = log_path

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early ({self.proc.returncode}): {self.logs()[-2000:]}")
            try:
                if "retrofit_ready 1.0" in self.scrape():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready within {timeout}s: {self.logs()[-2000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        return [json.loads(l) for l in self.logs().splitlines() if l.startswith("{")]

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def receive(sock: zmq.Socket, timeout: float) -> list[tuple[str, dict]]:
    """Everything that arrives within ``timeout`` seconds."""
    out = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if sock.poll(int(remaining * 1000)):
            topic, payload = sock.recv_multipart()
            out.append((topic.decode(), json.loads(payload)))
    return out


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        agent_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


FFMPEG = shutil.which("ffmpeg")


def serve_http_stream(clip: Path, port: int, loop: bool = True) -> subprocess.Popen:
    """Debian's ffmpeg serving ``clip`` as a live MPEG-TS stream over HTTP on loopback (one client).

    (ffmpeg cannot serve RTSP to pulling clients; the daemon opens http:// and rtsp:// URLs
    through the same FFmpeg backend with the same timeouts and reconnect logic.)
    """
    assert FFMPEG, "needs Debian's ffmpeg (scripts/test.sh installs it)"
    return subprocess.Popen(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            *(["-stream_loop", "-1"] if loop else []),
            "-i",
            str(clip),
            "-c:v",
            "mpeg4",
            "-q:v",
            "5",
            "-f",
            "mpegts",
            "-listen",
            "1",
            f"http://127.0.0.1:{port}/live.ts",
        ],
        stdin=subprocess.DEVNULL,
    )


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in a /metrics scrape."""
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name) and not l.startswith("#"))
