import threading
import time
from pathlib import Path

import cv2
import pytest
from prometheus_client import CollectorRegistry

from retrofit_agent.contract.errors import CaptureError
from retrofit_agent.daemon.capture import FrameGrabber
from retrofit_agent.daemon.config import CameraConfig
from retrofit_agent.daemon.metrics import AgentMetrics
from retrofit_agent.daemon.sources import camera_id, open_source, resolve_kind


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics.create(CollectorRegistry())


def drain(grabber: FrameGrabber, limit: float = 20.0) -> list:
    frames, deadline = [], time.monotonic() + limit
    while not grabber.finished and time.monotonic() < deadline:
        f = grabber.get(timeout=0.5)
        if f is not None:
            frames.append(f)
    return frames


@pytest.mark.parametrize(
    "source, kind",
    [
        ("/dev/video0", "v4l2"),
        ("2", "v4l2"),
        ("rtsp://cam/stream", "url"),
        ("clip.mp4", "file"),
        ("videotestsrc ! videoconvert ! appsink", "gstreamer"),
    ],
)
def test_kind_is_inferred(source, kind):
    assert resolve_kind(CameraConfig(source=source)) == kind


def test_camera_id_never_leaks_credentials():
    assert camera_id(CameraConfig(source="rtsp://user:secret@10.0.0.5:554/live?x=1")) == "10.0.0.5:554/live"


def test_file_source_delivers_every_frame_then_finishes(clip: Path, metrics: AgentMetrics):
    g = FrameGrabber(CameraConfig(source=str(clip)), metrics)
    g.start()
    frames = drain(g)
    g.stop()
    assert [f.frame_id for f in frames] == list(range(40))
    assert g.finished
    assert metrics.registry.get_sample_value("retrofit_frames_dropped_total") == 0


def test_looping_file_keeps_going(clip: Path, metrics: AgentMetrics):
    g = FrameGrabber(CameraConfig(source=str(clip), loop=True), metrics)
    g.start()
    ids = []
    while len(ids) < 90:
        f = g.get(timeout=2)
        assert f is not None
        ids.append(f.frame_id)
    g.stop()
    assert ids == list(range(90)) and not g.finished


def test_realtime_file_drops_frames_a_slow_consumer_misses(clip: Path, metrics: AgentMetrics):
    g = FrameGrabber(CameraConfig(source=str(clip), realtime=True), metrics)
    g.start()
    got = []
    while not g.finished:
        f = g.get(timeout=0.5)
        if f is not None:
            got.append(f.frame_id)
            time.sleep(0.15)  # a consumer at ~6 fps against a 15 fps source
    g.stop()
    dropped = metrics.registry.get_sample_value("retrofit_frames_dropped_total")
    assert dropped > 10
    assert got == sorted(got) and len(got) + dropped <= 40


def test_live_source_failing_mid_stream_is_reopened_and_counted(clip: Path, metrics: AgentMetrics):
    # The clip opened through the FFmpeg URL backend behaves as a live stream: its end is a
    # read failure, after which the grabber must reconnect (with back-off) and go on.
    cfg = CameraConfig(source=str(clip), kind="url", backoff_initial_s=0.05)
    g = FrameGrabber(cfg, metrics)
    g.start()
    ids = []
    deadline = time.monotonic() + 30
    while len(ids) < 60 and time.monotonic() < deadline:
        f = g.get(timeout=1)
        if f is not None:
            ids.append(f.frame_id)
    g.stop()
    assert len(ids) == 60 and ids == sorted(ids)
    assert metrics.registry.get_sample_value("retrofit_camera_reconnects_total") >= 1
    assert not g.finished


class _StallingSource:
    """A real capture that stops delivering after ``n`` frames without an error (V4L2 hang)."""

    def __init__(self, clip: Path, n: int, release_evt: threading.Event) -> None:
        self.cap = cv2.VideoCapture(str(clip))
        self.n = n
        self.release_evt = release_evt

    def read(self):
        if self.n == 0:
            self.release_evt.wait(30)
            return False, None
        self.n -= 1
        return self.cap.read()

    def release(self):
        self.cap.release()

    def get(self, prop):
        return self.cap.get(prop)


def test_stalled_source_is_detected_and_reopened(clip: Path, metrics: AgentMetrics):
    unblock = threading.Event()
    opened = []

    def opener(cfg):
        src = _StallingSource(clip, 5 if not opened else 1000, unblock)
        opened.append(src)
        return src

    cfg = CameraConfig(source="/dev/video9", kind="v4l2", stall_timeout_s=0.5, backoff_initial_s=0.05)
    g = FrameGrabber(cfg, metrics, opener=opener)
    g.start()
    t0 = time.monotonic()
    ids = []
    while len(ids) < 15 and time.monotonic() - t0 < 10:
        f = g.get(timeout=0.2)
        if f is not None:
            ids.append(f.frame_id)
    unblock.set()
    g.stop()
    assert len(opened) == 2, "the stall must reopen the source exactly once"
    assert len(ids) == 15 and ids == sorted(ids)
    assert metrics.registry.get_sample_value("retrofit_camera_reconnects_total") == 1


def test_reconnect_backoff_grows_and_is_capped(metrics: AgentMetrics):
    attempts = []

    def opener(cfg):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise_after = _StallingSource.__new__(_StallingSource)  # first open: a source that fails at once
            raise_after.read = lambda: (False, None)
            raise_after.release = lambda: None
            raise_after.get = lambda p: 0.0
            return raise_after
        raise CaptureError("camera.source: cannot open")

    cfg = CameraConfig(source="/dev/video9", kind="v4l2", backoff_initial_s=0.05, backoff_max_s=0.2)
    g = FrameGrabber(cfg, metrics, opener=opener)
    g.start()
    time.sleep(1.2)
    g.stop()
    gaps = [b - a for a, b in zip(attempts[1:], attempts[2:])]
    assert len(gaps) >= 3
    assert gaps[1] > gaps[0] * 1.5  # doubling
    assert max(gaps) < 0.35  # capped at backoff_max_s (plus scheduling slack)


def test_unopenable_sources_raise_capture_error(tmp_path: Path):
    with pytest.raises(CaptureError, match="video file not found"):
        open_source(CameraConfig(source=str(tmp_path / "none.mp4")))
    with pytest.raises(CaptureError, match="no such device /dev/video99"):
        open_source(CameraConfig(source="/dev/video99"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(CaptureError, match="cannot open file source"):
        open_source(CameraConfig(source=str(junk)))
