"""A camera's life on a car: late at boot, gone for a while, frozen, too big, damaged files.

Real components: Debian's ffmpeg serving live MPEG-TS over HTTP (started late, killed,
frozen with SIGSTOP), real video files, the real daemon in a subprocess. The systemd side
of the same scenarios (READY while waiting, no restart, the watchdog) is in
tests/deploy/test_systemd_nspawn.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry

from helpers import FFMPEG, free_port, metric, receive, run_cli, serve_http_stream
from retrofit_agent.daemon.capture import FrameGrabber
from retrofit_agent.daemon.config import CameraConfig
from retrofit_agent.daemon.frame_time import StreamClock
from retrofit_agent.daemon.metrics import AgentMetrics

needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs Debian's ffmpeg (scripts/test.sh installs it)")
LIVE = (
    "[camera]\nbackoff_initial_s = 0.2\nbackoff_max_s = 1.0\nstall_timeout_s = 2.0\nmax_frame_age_s = 1.0\n"
    "read_timeout_s = 5.0\nopen_timeout_s = 2.0\n"
)


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _wait_metric(agent, name: str, pred, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = metric(agent.scrape(), name)
        if pred(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name} never satisfied the condition (last {value})")


# --------------------------------------------------------------------------- waiting


@pytest.mark.integration
def test_a_missing_camera_is_waited_for_ready_and_a_stop_is_clean(start_agent, subscriber, seeded_bundle, tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(LIVE)
    agent = start_agent("--config", str(cfg), "--camera", "/dev/video97", "--bundle", str(seeded_bundle))
    sub = subscriber(agent.endpoint, ("status",))
    agent.wait_ready()
    status = receive(sub, 2.5)
    assert status and {m["health"] for _, m in status} == {"waiting_for_camera"}
    text = agent.scrape()
    assert metric(text, "retrofit_camera_connected") == 0
    assert metric(text, "retrofit_seconds_since_frame") > 0
    assert metric(text, "retrofit_fps") == 0
    assert agent.proc.poll() is None, "waiting for a camera is not a failure"
    t0 = time.monotonic()
    assert agent.stop(timeout=10) == 0
    print(f"SIGTERM while waiting for a camera: exited 0 in {time.monotonic() - t0:.2f} s")
    events = [e["event"] for e in agent.events()]
    assert "camera_waiting" in events


@pytest.mark.integration
def test_sigterm_during_a_hanging_open_is_prompt_and_clean(start_agent, seeded_bundle, tmp_path):
    import socket

    # A server that accepts and never answers: FFmpeg's HTTP open hangs until its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        cfg.write_text(LIVE.replace("open_timeout_s = 2.0", "open_timeout_s = 30.0"))
        agent = start_agent(
            "--config", str(cfg), "--camera", f"http://127.0.0.1:{port}/live.ts", "--bundle", str(seeded_bundle)
        )
        agent.wait_ready()
        time.sleep(1.0)  # the open is now hanging on the grabber thread
        t0 = time.monotonic()
        code = agent.stop(timeout=10)
        took = time.monotonic() - t0
    print(f"SIGTERM during a hanging open: exit {code} in {took:.2f} s (open timeout 30 s)")
    assert code == 0
    assert took < 15, "the stop did not wait for the 30 s open"


@pytest.mark.integration
@pytest.mark.slow
@needs_ffmpeg
def test_a_camera_that_appears_later_is_picked_up(start_agent, subscriber, clip, seeded_bundle, tmp_path):
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(LIVE)
    agent = start_agent(
        "--config", str(cfg), "--camera", f"http://127.0.0.1:{port}/live.ts", "--bundle", str(seeded_bundle)
    )
    sub = subscriber(agent.endpoint, ("tags", "status"))
    agent.wait_ready()
    before = receive(sub, 3.0)
    assert [m["health"] for t, m in before if t == "status"][-1] == "waiting_for_camera"
    assert not [m for t, m in before if t == "tags"]
    server = serve_http_stream(clip, port)
    try:
        after = receive(sub, 12.0)
    finally:
        server.kill()
        server.wait()
    tags = [m for t, m in after if t == "tags"]
    assert tags, "tags once the camera appeared"
    assert [m["seq"] for m in tags] == list(range(len(tags)))
    assert "ok" in [m["health"] for t, m in after if t == "status"]
    assert agent.proc.poll() is None
    assert agent.stop() == 0


# --------------------------------------------------------------------------- frozen


@pytest.mark.integration
@pytest.mark.slow
@needs_ffmpeg
def test_a_frozen_stream_is_a_stall_and_its_buffer_is_never_published_as_new(
    start_agent, subscriber, clip, seeded_bundle, tmp_path
):
    """SIGSTOP the server: the socket stays open and FFmpeg hands out its buffer after the
    read timeout. Those frames are stale: dropped and counted, never published with a fresh
    time; the freeze is a stall within stall_timeout_s + 1 s."""
    port = free_port()
    server = serve_http_stream(clip, port)
    try:
        time.sleep(0.5)
        cfg = tmp_path / "agent.toml"
        cfg.write_text(LIVE)
        agent = start_agent(
            "--config", str(cfg), "--camera", f"http://127.0.0.1:{port}/live.ts", "--bundle", str(seeded_bundle)
        )
        sub = subscriber(agent.endpoint, ("tags", "status"))
        agent.wait_ready()
        assert [m for t, m in receive(sub, 3.0) if t == "tags"], "frames flow before the freeze"
        server.send_signal(signal.SIGSTOP)
        frozen_at = time.time()
        during = receive(sub, 9.0)
        server.send_signal(signal.SIGCONT)
    finally:
        server.kill()
        server.wait()
    text = agent.scrape()
    assert agent.stop() == 0
    late = [m for t, m in during if t == "tags" and _iso(m["captured_at"]) > frozen_at + 0.25]
    assert not late, f"frames from before the freeze published as new: {[m['captured_at'] for m in late]}"
    stalls = [e for e in agent.events() if e["event"] == "camera_stalled"]
    assert stalls, "the freeze was never called a stall"
    detected = _iso(stalls[0]["timestamp"]) - frozen_at
    print(
        f"frozen stream detected as a stall after {detected:.2f} s (stall_timeout_s 2.0); "
        f"stale frames dropped: {metric(text, 'retrofit_frames_stale_total'):.0f}"
    )
    # The daemon's own reading of how long the stream had been frozen when it called the stall
    # (the wall-clock figure above depends on how busy this machine is).
    assert stalls[0]["seconds"] <= 2.0 + 1.0
    assert "degraded" in [m["health"] for t, m in during if t == "status"]


def test_stream_clock_drops_redeliveries_and_late_buffers_and_dates_frames_by_source():
    clock = StreamClock(max_age_s=1.0)
    img = np.zeros((8, 8, 3), np.uint8)
    assert clock.observe(0.0667, 10.0, img) == pytest.approx(10.0)
    assert clock.observe(0.1333, 10.07, img) == pytest.approx(10.0666, abs=1e-3)  # dated by its pts
    assert clock.observe(0.1333, 10.2, img) is None  # the same timestamp again: a re-delivery
    assert clock.observe(0.2000, 12.1, img) is None  # buffered before a freeze, handed out 2 s late
    assert clock.observe(0.2667, 10.0 + 0.2667 + 0.3, img) == pytest.approx(10.2, abs=5e-3)  # 0.3 s late: kept
    assert clock.observe(3.0, 13.0, img) == pytest.approx(12.94, abs=0.01)
    assert clock.observe(0.05, 20.0, img) == 20.0  # a timeline restart re-anchors instead of stalling
    assert clock.observe(0.1167, 20.07, img) == pytest.approx(20.0667, abs=1e-3)
    # Timestamps made up at 25 fps for a 15 fps camera (raw MJPEG) are not trusted: frames are
    # judged by their content instead, and none is called late.
    made_up = StreamClock(max_age_s=1.0)
    frames = [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(60)]
    kept = [made_up.observe(i / 25, 100 + i / 15, f) for i, f in enumerate(frames)]
    assert made_up.trusted is False and all(k is not None for k in kept)
    no_pts = StreamClock(max_age_s=1.0)
    noisy = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert no_pts.observe(None, 1.0, noisy) == 1.0
    assert no_pts.observe(None, 1.1, noisy.copy()) is None  # byte-identical without timestamps: re-delivered


# --------------------------------------------------------------------------- files


class ScriptedSource:
    """A file-like source: ``script`` is a list of frames and ``None`` for unreadable ones."""

    def __init__(self, script):
        self.script = list(script)

    def read(self):
        if not self.script:
            return False, None
        item = self.script.pop(0)
        return (False, None) if item is None else (True, item)

    def release(self):
        pass

    def get(self, prop):
        return 0.0


def _drain(grabber: FrameGrabber, limit: float = 20.0) -> list:
    frames, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline and not grabber.finished:
        f = grabber.get(timeout=0.25)
        if f is not None:
            frames.append(f)
    return frames


def test_a_damaged_stretch_in_a_file_is_skipped_not_the_end(tmp_path):
    good = [np.full((4, 4, 3), i, np.uint8) for i in range(12)]
    script = good[:5] + [None] * 3 + good[5:] + [None] * 100
    metrics = AgentMetrics.create(CollectorRegistry())
    g = FrameGrabber(
        CameraConfig(source=str(tmp_path / "x.mp4"), kind="file", max_read_failures=10),
        metrics,
        opener=lambda c: ScriptedSource(script),
    )
    g.start()
    try:
        frames = _drain(g)
    finally:
        g.stop()
    assert [int(f.image[0, 0, 0]) for f in frames] == list(range(12))
    assert metrics.registry.get_sample_value("retrofit_frames_failed_total", {"reason": "read_error"}) == 3


def test_oversized_frames_are_downscaled_at_capture(tmp_path):
    big = np.zeros((4320, 7680, 3), np.uint8)
    metrics = AgentMetrics.create(CollectorRegistry())
    g = FrameGrabber(CameraConfig(source="x", kind="file"), metrics, opener=lambda c: ScriptedSource([big]))
    g.start()
    try:
        (frame,) = _drain(g)
    finally:
        g.stop()
    assert frame.image.shape == (1080, 1920, 3)
    assert metrics.registry.get_sample_value("retrofit_frames_downscaled_total") == 1


def _vfr_clip(path: Path) -> None:
    """A variable-frame-rate file: 3 s at 15 fps, then every third frame (5 fps) for 1 s."""
    subprocess.run(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=160x90:rate=15:d=4",
            "-vf",
            "select='lt(t,3)+not(mod(n,3))',setpts='N/TB/15*lt(N,45)+(3+(N-45)/5)/TB*gte(N,45)'",
            "-fps_mode",
            "vfr",
            "-c:v",
            "mpeg4",
            "-q:v",
            "5",
            str(path),
        ],
        check=True,
    )


@pytest.mark.slow
@needs_ffmpeg
@pytest.mark.parametrize("kind", ["constant", "variable"])
def test_realtime_pacing_follows_the_files_timestamps_without_drift(tmp_path, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "constant":
        subprocess.run(
            [
                FFMPEG,
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=160x90:rate=15:d=6",
                "-c:v",
                "mpeg4",
                "-q:v",
                "5",
                str(path),
            ],
            check=True,
        )
    else:
        _vfr_clip(path)
    cap = cv2.VideoCapture(str(path))
    stamps = []
    while cap.read()[0]:
        stamps.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000)
    cap.release()
    gaps = np.diff(stamps)
    assert (gaps.max() / gaps.min() > 2) == (kind == "variable")
    metrics = AgentMetrics.create(CollectorRegistry())
    g = FrameGrabber(CameraConfig(source=str(path), realtime=True), metrics)
    t0 = time.monotonic()
    g.start()
    try:
        frames = _drain(g, limit=30)
    finally:
        g.stop()
    played = frames[-1].captured_mono - t0
    timeline = stamps[-1] - stamps[0]
    error = abs(played - timeline) / timeline
    print(f"{kind} frame rate: timeline {timeline:.3f} s, played {played:.3f} s, error {error * 100:.2f} %")
    assert len(frames) + metrics.registry.get_sample_value("retrofit_frames_dropped_total") == len(stamps)
    assert error < 0.01


# --------------------------------------------------------------------------- native noise


def test_native_stderr_lines_become_rate_limited_structured_events():
    from retrofit_agent.daemon.native_logs import NativeStderr

    native = NativeStderr(burst=5, window_s=0.2)
    with structlog.testing.capture_logs() as logs:
        native.start()
        try:
            os.write(2, b"[h264 @ 0x55d0c0] error while decoding MB 3 4\n" * 50)
            time.sleep(0.3)
            os.write(2, b"[ WARN:0@1.0] global cap_ffmpeg_impl.hpp:453 Stream timeout\n")
            time.sleep(0.2)
        finally:
            native.stop()
    native_lines = [l for l in logs if l["event"] == "native_log"]
    assert 2 <= len(native_lines) <= 5 + 1
    assert native_lines[0]["library"] == "ffmpeg:h264"
    assert native_lines[-1]["library"] == "opencv"
    suppressed = [l["count"] for l in logs if l["event"] == "native_log_suppressed"]
    assert suppressed == [45]


@pytest.mark.integration
@needs_ffmpeg
def test_a_corrupt_stream_writes_only_structured_lines(tmp_path, seeded_bundle, clip):
    corrupt = tmp_path / "corrupt.mp4"
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(1)
    for at in rng.integers(len(data) // 4, len(data), 200):
        data[at] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    r = run_cli(
        "--camera",
        str(corrupt),
        "--bundle",
        str(seeded_bundle),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
        "--log-format",
        "json",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    bad = [l for l in lines if not l.startswith("{")]
    assert not bad, bad[:5]
    assert all(isinstance(json.loads(l), dict) for l in lines)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "endpoint,expect",
    [
        ("tcp://127.0.0.1:-1", "1-65535"),
        ("tcp://127.0.0.1:70000", "1-65535"),
        ("tcp://127.0.0.1:0", "1-65535"),
        ("inproc://tags", "inproc://"),
    ],
)
def test_unusable_endpoints_are_refused(endpoint, expect, tmp_path, clip):
    r = run_cli("--camera", str(clip), "--no-metrics", "--publish", endpoint)
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_invalid_value_is_an_error_even_when_a_flag_overrides_it(tmp_path, clip):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('camera = "/dev/video0"\n')
    r = run_cli("--config", str(cfg), "--camera", str(clip), "--no-metrics")
    assert r.returncode == 2 and "camera" in r.stderr and "overridden" in r.stderr, r.stderr
    r = run_cli(
        "--camera",
        str(clip),
        "--no-metrics",
        env={"RETROFIT_CAMERA__FPS": "-3"},
    )
    assert r.returncode == 2 and "camera.fps" in r.stderr, r.stderr


# --------------------------------------------------------------------------- memory


def test_a_config_that_cannot_fit_the_memory_budget_is_refused(tmp_path, clip, seeded_bundle):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "[limits]\nmemory_mb = 256\n[camera]\nmax_frame_width = 7680\nmax_frame_height = 4320\n"
        "[[collect.campaigns]]\nname = 'all'\nframes_before = 30\nrule = { any_of = ['cyclists.present'] }\n"
        f"[collect.store]\ndirectory = '{tmp_path / 'captures'}'\n"
    )
    r = run_cli(
        "--config",
        str(cfg),
        "--camera",
        str(clip),
        "--bundle",
        str(seeded_bundle),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
    )
    assert r.returncode == 2, r.stderr
    (line,) = [l for l in r.stderr.splitlines() if "error" in l and not l.startswith("{")]
    assert "limits.memory_mb is 256 MB" in line and "frames" in line


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the peak resident set so far (0 once the process has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
@pytest.mark.integration
@needs_ffmpeg
@pytest.mark.parametrize("size", ["3840x2160", "7680x4320"])
def test_4k_and_8k_with_a_30_frame_pre_trigger_campaign_stay_under_the_budget(size, tmp_path, seeded_bundle):
    video = tmp_path / f"{size}.mp4"
    subprocess.run(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={size}:rate=15:d=3",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(video),
        ],
        check=True,
    )
    # The unit's MemoryMax (512 MB) holds 4K; decoding 8K alone needs ~480 MB, so an 8K source
    # needs a bigger budget (refused under 512 MB: the test below).
    budget_mb = 512 if size == "3840x2160" else 1024
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"[limits]\nmemory_mb = {budget_mb}\n"
        "[[collect.campaigns]]\nname = 'all'\nframes_before = 30\nframes_after = 5\nmin_interval_s = 0\n"
        "jpeg_quality = 95\nrule = { any_of = ['cyclists.present'] }\n"
        f"[collect.store]\ndirectory = '{tmp_path / 'captures'}'\n"
    )
    from helpers import agent_command

    proc = subprocess.Popen(
        agent_command(
            "--config",
            str(cfg),
            "--camera",
            str(video),
            "--bundle",
            str(seeded_bundle),
            "--no-metrics",
            "--publish",
            f"ipc://{tmp_path}/x.sock",
            "--log-format",
            "json",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0.0
    try:
        while proc.poll() is None:
            peak = max(peak, _peak_rss_mb(proc.pid))
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-2000:]
    saved = list((tmp_path / "captures").rglob("*.jpg"))
    print(f"{size}: peak RSS {peak:.0f} MB (budget {budget_mb} MB), {len(saved)} frames captured")
    assert saved, "the campaign captured frames"
    assert peak < budget_mb


@pytest.mark.integration
@needs_ffmpeg
def test_an_8k_source_over_the_default_budget_is_refused_with_one_line(tmp_path, seeded_bundle):
    video = tmp_path / "8k.mp4"
    subprocess.run(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=7680x4320:rate=15:d=0.2",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            str(video),
        ],
        check=True,
    )
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[limits]\nmemory_mb = 512\n")
    r = run_cli(
        "--config",
        str(cfg),
        "--camera",
        str(video),
        "--bundle",
        str(seeded_bundle),
        "--no-metrics",
        "--publish",
        f"ipc://{tmp_path}/x.sock",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = [l for l in r.stderr.splitlines() if not l.startswith("{")]
    assert "7680x4320 source" in line and "512 MB" in line
