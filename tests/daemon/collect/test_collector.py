import errno
import json
import time
from pathlib import Path

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from retrofit_agent.daemon.collect.collector import Collector, FrameRecord
from retrofit_agent.daemon.collect.store import CaptureStore
from retrofit_agent.daemon.config import CollectConfig
from retrofit_agent.daemon.metrics import AgentMetrics


def make(tmp_path: Path, campaigns: list[dict], write_file=None, **store):
    cfg = CollectConfig.model_validate(
        {"campaigns": campaigns, "store": {"directory": str(tmp_path / "store"), "disk_full_retry_s": 0.2, **store}}
    )
    metrics = AgentMetrics.create(CollectorRegistry())
    kw = {}
    if write_file is not None:
        kw["store"] = CaptureStore(cfg.store.directory, cfg.store.max_bytes, cfg.store.max_files, write_file=write_file)
    c = Collector(cfg, metrics, "front/cam:1", ("m@1", "1"), clock=time.monotonic, **kw)
    c.start()
    return c, metrics


def record(i: int, tags: dict[str, float]) -> FrameRecord:
    img = np.full((48, 64, 3), i % 256, np.uint8)
    return FrameRecord(img, i, i, 1_764_000_000.0 + i / 10, i / 10, tags, {"weather": ("rain", 0.9)})


def wait_saved(c: Collector, n: int, timeout: float = 5.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += c.drain_saved()
        time.sleep(0.02)
    return out


def value(m: AgentMetrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels)


RAIN = {"weather.rain": 0.9}


def test_trigger_keeps_frames_before_and_after(tmp_path: Path):
    c, m = make(
        tmp_path,
        [
            {
                "name": "rain",
                "rule": {"any_of": ["weather.rain"]},
                "min_interval_s": 100,
                "frames_before": 2,
                "frames_after": 3,
            }
        ],
    )
    for i in range(10):
        c.observe(record(i, RAIN if i == 5 else {}))
    saved = wait_saved(c, 6)
    c.stop()
    assert [(s.job.role, s.job.offset, s.job.record.frame_id) for s in saved] == [
        ("before", -2, 3),
        ("before", -1, 4),
        ("trigger", 0, 5),
        ("after", 1, 6),
        ("after", 2, 7),
        ("after", 3, 8),
    ]
    side = json.loads(saved[2].item.sidecar.read_text())
    assert side["campaign"] == "rain" and side["role"] == "trigger" and side["frame_id"] == 5 and side["seq"] == 5
    assert side["tags"] == [{"tag": "weather.rain", "score": 0.9}] and side["camera"] == "front/cam:1"
    assert side["model"] == "m@1" and side["captured_at"].endswith("Z")
    assert saved[2].item.image.parent.parent.name == "rain"
    assert value(m, "retrofit_captures_saved_total", campaign="rain") == 6
    assert value(m, "retrofit_store_files") == 6


def test_rate_limited_frames_are_counted(tmp_path: Path):
    c, m = make(tmp_path, [{"name": "rain", "rule": {"any_of": ["weather.rain"]}, "min_interval_s": 100}])
    for i in range(5):
        c.observe(record(i, RAIN))
    saved = wait_saved(c, 1)
    c.stop()
    assert len(saved) == 1
    assert value(m, "retrofit_captures_skipped_total", campaign="rain", reason="rate_limited") == 4


def test_downscale_and_quality(tmp_path: Path):
    c, _ = make(tmp_path, [{"name": "rain", "rule": {"any_of": ["weather.rain"]}, "max_width": 32, "jpeg_quality": 50}])
    c.observe(record(0, RAIN))
    (s,) = wait_saved(c, 1)
    c.stop()
    side = json.loads(s.item.sidecar.read_text())
    assert (side["width"], side["height"], side["jpeg_quality"]) == (32, 24, 50)


def test_disk_full_stops_capture_logs_once_and_resumes(tmp_path: Path):
    full = {"on": False}

    def write_file(path: Path, data: bytes) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(data)

    c, m = make(
        tmp_path,
        [{"name": "rain", "rule": {"any_of": ["weather.rain"]}, "min_interval_s": 0, "max_per_hour": 10000}],
        write_file=write_file,
    )
    with structlog.testing.capture_logs() as logs:
        c.observe(record(0, RAIN))
        assert len(wait_saved(c, 1)) == 1
        full["on"] = True
        for i in range(1, 6):
            c.observe(record(i, RAIN))
        time.sleep(0.5)
        assert c.disk_full
        full["on"] = False
        time.sleep(0.3)  # past disk_full_retry_s
        c.observe(record(6, RAIN))
        saved = wait_saved(c, 1)
    c.stop()
    assert [s.job.record.frame_id for s in saved] == [6]
    assert not c.disk_full
    assert value(m, "retrofit_captures_skipped_total", campaign="rain", reason="disk_full") == 5
    events = [l["event"] for l in logs]
    assert events.count("store_disk_full") == 1 and events.count("store_space_returned") == 1


def test_queue_full_skips_instead_of_blocking(tmp_path: Path):
    def slow_write(path: Path, data: bytes) -> None:
        time.sleep(0.2)
        path.write_bytes(data)

    c, m = make(
        tmp_path,
        [{"name": "rain", "rule": {"any_of": ["weather.rain"]}, "min_interval_s": 0, "max_per_hour": 10000}],
        write_file=slow_write,
        queue_size=2,
    )
    t0 = time.monotonic()
    for i in range(20):
        c.observe(record(i, RAIN))
    assert time.monotonic() - t0 < 0.5  # the frame loop never waits for the disk
    c.stop(timeout=3)
    assert value(m, "retrofit_captures_skipped_total", campaign="rain", reason="queue_full") >= 10


def test_campaigns_change_between_frames(tmp_path: Path):
    from retrofit_agent.daemon.config import CampaignConfig

    c, m = make(tmp_path, [{"name": "rain", "rule": {"any_of": ["weather.rain"]}}])
    c.set_campaigns([CampaignConfig(name="fog", rule={"any_of": ["weather.fog"]})])
    c.observe(record(0, RAIN))
    c.observe(record(1, {"weather.fog": 0.8}))
    saved = wait_saved(c, 1)
    c.stop()
    assert [s.job.campaign.name for s in saved] == ["fog"]
