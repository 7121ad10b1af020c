"""Collection in the running daemon: real files, real ZeroMQ, real kill -9."""

import hashlib
import json
import signal
import threading
import time
from pathlib import Path

import cv2
import pytest

from helpers import receive, run_cli
from retrofit_agent.daemon.collect.store import CaptureStore

pytestmark = pytest.mark.integration

# The seeded bundle (tests/fixtures/seeded-bundle) turns cyclists.present on for the sample clip's frames,
# so this campaign fires on every frame: heavy capture.
EVERY_FRAME = """
[[collect.campaigns]]
name = "cyclists"
min_interval_s = 0
max_per_hour = 100000
frames_before = 1
jpeg_quality = 80
rule = {{ any_of = ["cyclists.present"] }}

[collect.store]
directory = "{store}"
max_files = {max_files}
"""


def write_config(tmp_path: Path, max_files: int = 100000) -> tuple[Path, Path]:
    store = tmp_path / "store"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(EVERY_FRAME.format(store=store, max_files=max_files))
    return cfg, store


def pairs(store: Path) -> tuple[list[Path], list[Path]]:
    return sorted(store.rglob("*.jpg")), sorted(store.rglob("*.json"))


def test_captures_are_saved_and_announced(start_agent, subscriber, clip: Path, seeded_bundle: Path, tmp_path: Path):
    cfg, store = write_config(tmp_path)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--bundle", str(seeded_bundle), "--loop")
    sub = subscriber(agent.endpoint, ("captures",))
    agent.wait_ready()
    msgs = receive(sub, 3.0)
    text = agent.scrape()
    assert agent.stop() == 0
    assert len(msgs) >= 5
    for _, m in msgs[:5]:
        image, sidecar = Path(m["path"]), Path(m["sidecar"])
        assert image.is_file() and sidecar.is_file() and m["campaign"] == "cyclists"
        meta = json.loads(sidecar.read_text())
        assert meta["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        assert cv2.imread(str(image)).shape == (meta["height"], meta["width"], 3) == (360, 640, 3)
        assert m["bytes"] == image.stat().st_size + sidecar.stat().st_size
    assert [m["seq"] for _, m in msgs] == list(range(msgs[0][1]["seq"], msgs[0][1]["seq"] + len(msgs)))
    assert 'retrofit_captures_saved_total{campaign="cyclists"}' in text
    assert "retrofit_store_bytes" in text


def test_kill_9_during_heavy_capture_leaves_only_whole_pairs(
    start_agent, clip: Path, seeded_bundle: Path, tmp_path: Path
):
    cfg, store = write_config(tmp_path)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--bundle", str(seeded_bundle), "--loop")
    agent.wait_ready()
    deadline = time.monotonic() + 30
    while len(pairs(store)[1]) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(5)
    images, sidecars = pairs(store)
    assert len(sidecars) >= 25
    for s in sidecars:  # every committed item is whole and intact
        img = s.with_suffix(".jpg")
        assert img.exists(), f"sidecar without image: {s}"
        assert hashlib.sha256(img.read_bytes()).hexdigest() == json.loads(s.read_text())["image_sha256"]
    # Start-up recovery (what the next daemon run does) removes temp files and any image
    # caught between its rename and its sidecar's.
    CaptureStore(store, 10**12, 10**9).open()
    leftovers = [
        p for p in store.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix not in (".jpg", ".json"))
    ]
    assert leftovers == []
    images, sidecars = pairs(store)
    assert [p.with_suffix("") for p in images] == [p.with_suffix("") for p in sidecars]


def test_uploader_deleting_while_capture_runs(start_agent, clip: Path, seeded_bundle: Path, tmp_path: Path):
    cfg, store = write_config(tmp_path, max_files=15)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--bundle", str(seeded_bundle), "--loop")
    agent.wait_ready()
    uploaded = []
    stop = threading.Event()

    def uploader():  # takes committed items, deletes sidecar first, then image
        while not stop.is_set():
            for s in sorted(store.rglob("*.json"))[:3]:
                try:
                    s.unlink()
                    s.with_suffix(".jpg").unlink()
                    uploaded.append(s.name)
                except FileNotFoundError:
                    pass  # evicted by the daemon meanwhile
            time.sleep(0.05)

    t = threading.Thread(target=uploader)
    t.start()
    time.sleep(4)
    stop.set()
    t.join()
    before = float(
        [l for l in agent.scrape().splitlines() if l.startswith("retrofit_captures_saved_total{")][0].split()[-1]
    )
    time.sleep(1)
    text = agent.scrape()
    assert agent.stop() == 0
    after = float([l for l in text.splitlines() if l.startswith("retrofit_captures_saved_total{")][0].split()[-1])
    assert len(uploaded) >= 10
    assert after > before, "capture goes on after the uploader's deletions"
    assert "capture_write_failed" not in agent.logs()
    images, sidecars = pairs(store)
    assert len(sidecars) <= 15


def test_unknown_campaign_tag_exits_2(clip: Path, seeded_bundle: Path, tmp_path: Path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(
        '[[collect.campaigns]]\nname = "x"\nrule = { any_of = ["weather.hail"] }\n'
        f'[collect.store]\ndirectory = "{tmp_path}/s"\n'
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
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown tag 'weather.hail'" in r.stderr.strip().splitlines()[-1]
