"""The daemon on an emulated ARM64 Debian bookworm userland (QEMU user-mode), with the aarch64
wheels from deploy/arm64/runtime-requirements.txt: tags arrive over ZeroMQ and /metrics says
the host is aarch64. Emulated latency is recorded, never judged.

Run alone: bash scripts/test.sh tests/deploy/test_arm64_qemu.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from deploy_helpers import DEPLOY, REPO, need, report
from helpers import SEEDED, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOTFS_SH = DEPLOY / "arm64" / "rootfs.sh"
CLIP = REPO / "models" / "sample" / "drive.mp4"
FRAMES = 6  # emulation runs the int8 EfficientNet-B3 at about a frame per second: keep it short


@pytest.fixture(scope="module")
def rootfs(request: pytest.FixtureRequest) -> Path:
    need("qemu-aarch64-static")
    path = Path(
        subprocess.run(["bash", str(ROOTFS_SH), "path"], capture_output=True, text=True, check=True).stdout.strip()
    )
    if not (path / ".complete").exists():
        need("debootstrap")
        if os.geteuid() != 0:
            pytest.skip(f"no cached arm64 root filesystem at {path} and debootstrap needs root: sudo {ROOTFS_SH} build")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOTFS_SH), "build"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report(request, "arm64 rootfs build (s)", f"{time.monotonic() - t0:.1f} ({r.stdout.strip().splitlines()[-1]})")
    assert (path / ".complete").exists() and (path / "usr/bin/python3").exists()
    return path


def emulated(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(ROOTFS_SH), "python", *args], env={**os.environ, **(env or {})}, **kw)


def test_rootfs_python_is_aarch64_debian_with_the_runtime(rootfs: Path):
    probe = (
        "import platform, sys, onnxruntime, cv2, zmq, numpy, cryptography, retrofit_agent.daemon.agent; "
        "print(platform.machine(), '%d.%d' % sys.version_info[:2], onnxruntime.__version__, "
        "onnxruntime.get_available_providers())"
    )
    p = emulated("-c", probe, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    machine, version, ort, providers = out.split(" ", 3)
    assert machine == "aarch64" and version == "3.11" and "CPUExecutionProvider" in providers
    assert (rootfs / "etc/debian_version").read_text().startswith("12.")
    # Not the build host's libraries: the ELF files loaded are aarch64.
    assert (
        next((rootfs / "opt/retrofit-agent/site/onnxruntime/capi").glob("onnxruntime_pybind11_state*.so")).read_bytes()[
            18
        ]
        == 0xB7
    )


@pytest.fixture(scope="module")
def emulated_run(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The daemon in emulation on the sample clip for FRAMES frames; a host-side ZeroMQ subscriber
    and /metrics scrapes after every tags message (the daemon exits after the last frame)."""
    tmp = tmp_path_factory.mktemp("arm64")
    pub, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub)
    log = open(tmp / "agent.log", "wb")
    t0 = time.monotonic()
    proc = emulated(
        "-m",
        "retrofit_agent",
        "--camera",
        str(CLIP),
        "--bundle",
        str(SEEDED),
        "--max-frames",
        str(FRAMES),
        "--publish",
        pub,
        "--metrics-address",
        f"127.0.0.1:{port}",
        "--log-format",
        "json",
        env={"ARM64_ROOTFS_WORK": str(tmp / "work")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    run: dict = {"messages": [], "scrape": "", "ready_s": None}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if run["ready_s"] is None:
                try:
                    if "\nretrofit_ready 1.0" in scrape(port):
                        run["ready_s"] = time.monotonic() - t0
                except OSError:
                    pass
            if sub.poll(200):
                topic, payload = sub.recv_multipart()
                run["messages"].append((topic.decode(), json.loads(payload)))
                if topic == b"tags":
                    try:
                        run["scrape"] = scrape(port)
                    except OSError:
                        pass  # the last frame: the daemon may already be closing
        run["exit_code"] = proc.wait(60)
        while sub.poll(100):
            topic, payload = sub.recv_multipart()
            run["messages"].append((topic.decode(), json.loads(payload)))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        sub.close()
        ctx.term()
        log.close()
    run["wall_s"] = time.monotonic() - t0
    run["log"] = (tmp / "agent.log").read_text(errors="replace")
    yield run


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_daemon_in_emulation_publishes_tags_for_the_bounded_run(emulated_run: dict, request: pytest.FixtureRequest):
    run = emulated_run
    assert run["exit_code"] == 0, run["log"][-3000:]
    assert '"max_frames_reached"' in run["log"]
    tags = [m for t, m in run["messages"] if t == "tags"]
    assert len(tags) == FRAMES, (len(tags), run["log"][-2000:])
    assert [m["seq"] for m in tags] == list(range(FRAMES))
    assert tags[0]["model"] == "retrofit-reference-untrained@0.1.0-reference" and tags[0]["top"]
    inference = sorted(m["latency"]["inference_ms"] for m in tags)
    e2e = sorted(m["latency"]["end_to_end_ms"] for m in tags)
    report(
        request,
        "emulated aarch64 run (QEMU neoverse-n1, not the camera's speed)",
        {
            "ready_after_s": round(run["ready_s"] or -1, 1),
            "wall_s": round(run["wall_s"], 1),
            "frames": FRAMES,
            "inference_ms_median": inference[len(inference) // 2],
            "end_to_end_ms_median": e2e[len(e2e) // 2],
        },
    )


def test_daemon_in_emulation_reports_aarch64_in_status_and_metrics(emulated_run: dict):
    run = emulated_run
    status = [m for t, m in run["messages"] if t == "status"]
    assert status and {m["machine"] for m in status} == {"aarch64"}
    info = [l for l in run["scrape"].splitlines() if l.startswith("retrofit_model_info{")]
    assert info and 'machine="aarch64"' in info[0], run["scrape"][:500]
    processed = [l for l in run["scrape"].splitlines() if l.startswith("retrofit_frames_processed_total ")]
    assert processed and float(processed[0].split()[1]) >= 1
