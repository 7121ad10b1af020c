"""Regions from the running daemon: boxes where the object is, on a real video file through a real
ZeroMQ subscriber, validated against the committed schema; a bundle without cells says so once.

The model (tests/daemon/conftest.py) is a tiny real ONNX graph whose cells point at
``pedestrians.present`` where the frame is bright, so the test knows where the box must be.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import structlog
from dense_model import EDGE, MIDDLE, patch_clip
from prometheus_client import CollectorRegistry

from helpers import REPO, receive, run_cli
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.daemon.config import AgentConfig
from retrofit_agent.daemon.pipeline import build_pipeline

SCHEMA = json.loads((REPO / "deploy" / "messages.schema.json").read_text())
TAGS_SCHEMA = {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/TagsMessage"}


def iou(a: list[float], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def on(msg: dict, key: str) -> bool:
    return any(f"{t['group']}.{t['label']}" == key for t in msg["tags"])


@pytest.mark.integration
@pytest.mark.parametrize(
    "size, resize",
    [((320, 160), "letterbox"), ((160, 160), "stretch")],
    ids=["non-square-letterbox", "square-stretch"],
)
def test_daemon_publishes_schema_valid_regions_where_the_patch_is(
    size, resize, start_agent, subscriber, make_dense_bundle, tmp_path: Path
):
    bundle = make_dense_bundle(resize=resize)
    clip = patch_clip(tmp_path / "patch.mp4", size, [None] * 5 + [MIDDLE] * 10)
    agent = start_agent("--camera", str(clip), "--loop", "--realtime", "--bundle", str(bundle), "--threads", "1")
    sub = subscriber(agent.endpoint, ("tags",))
    agent.wait_ready()
    msgs = [m for _, m in receive(sub, 3.0)]
    text = agent.scrape()
    assert agent.stop() == 0

    with_patch = [m for m in msgs if on(m, "pedestrians.present")]
    without = [m for m in msgs if not on(m, "pedestrians.present")]
    assert len(with_patch) >= 5 and len(without) >= 2, [m["tags"] for m in msgs]
    for m in msgs:
        jsonschema.validate(m, TAGS_SCHEMA)
        assert m["schema_version"] == 3
    for m in with_patch:
        (region,) = m["regions"]  # scene.road is on too, but it is not localized
        assert (region["group"], region["label"]) == ("pedestrians", "present")
        assert region["score"] > 0.9
        assert iou(region["box"], MIDDLE) > 0.8, region["box"]
        assert m["latency"]["regions_ms"] > 0
    assert all(m["regions"] == [] for m in without)  # no tag, no box
    assert 'retrofit_stage_duration_seconds_count{stage="regions"}' in text
    regions_count = [
        l for l in text.splitlines() if l.startswith('retrofit_stage_duration_seconds_count{stage="regions"}')
    ]
    assert float(regions_count[0].split()[-1]) > 0
    enabled = [e for e in agent.events() if e["event"] == "regions_enabled"]
    assert enabled and enabled[0]["labels"] == ["pedestrians.present"] and enabled[0]["grid"] == [10, 10]


@pytest.mark.integration
def test_a_bundle_without_cells_says_so_once_and_publishes_no_regions(
    start_agent, subscriber, make_dense_bundle, tmp_path: Path
):
    bundle = make_dense_bundle(cells=False)
    clip = patch_clip(tmp_path / "patch.mp4", (320, 160), [MIDDLE] * 10)
    agent = start_agent("--camera", str(clip), "--loop", "--realtime", "--bundle", str(bundle))
    sub = subscriber(agent.endpoint, ("tags",))
    agent.wait_ready()
    msgs = [m for _, m in receive(sub, 2.0)]
    assert agent.stop() == 0

    assert len(msgs) >= 5
    for m in msgs:
        jsonschema.validate(m, TAGS_SCHEMA)
        assert on(m, "pedestrians.present"), "the tag still works without cells"
        assert m["regions"] == [] and m["latency"]["regions_ms"] == 0
    said = [e for e in agent.events() if e["event"] == "regions_unavailable"]
    assert len(said) == 1 and "no cell output" in said[0]["reason"], said


@pytest.mark.integration
def test_sighup_rebuilds_the_region_finder_and_refuses_bad_labels(
    start_agent, subscriber, make_dense_bundle, tmp_path: Path
):
    bundle = make_dense_bundle()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[model]\nbundle = "{bundle}"\n[regions]\nenabled = false\n')
    clip = patch_clip(tmp_path / "patch.mp4", (320, 160), [MIDDLE] * 10)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--loop", "--realtime")
    sub = subscriber(agent.endpoint, ("tags", "events"))
    agent.wait_ready()
    before = [m for t, m in receive(sub, 1.0) if t == "tags"]
    cfg.write_text(f'[model]\nbundle = "{bundle}"\n[regions]\nenabled = true\n')
    agent.proc.send_signal(signal.SIGHUP)
    after = receive(sub, 2.5)
    cfg.write_text(f'[model]\nbundle = "{bundle}"\n[regions]\nlabels = ["pedestrians.walking"]\n')
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    last = [m for t, m in receive(sub, 1.0) if t == "tags"]
    assert agent.stop() == 0

    assert before and all(m["regions"] == [] for m in before)
    tags = [m for t, m in after if t == "tags"]
    assert tags and tags[-1]["regions"] and tags[-1]["regions"][0]["label"] == "present"
    # Only the regions changed: the running model and its tags stay, nothing turns off and on.
    assert not [m for t, m in after if t == "events" and m["event"] == "tag_off"]
    assert last and all(m["regions"] for m in last), "a refused reload keeps the running finder"
    failed = [e for e in agent.events() if e["event"] == "reload_failed"]
    assert len(failed) == 1 and "regions.labels: unknown label 'pedestrians.walking'" in failed[0]["error"]


def test_every_variant_of_a_dense_bundle_gives_regions(make_dense_bundle):
    """The int8 and fp32 encoders share the manifest's dense spec; whichever runs, regions run."""
    bundle = make_dense_bundle(variants=True)
    frame = np.zeros((160, 320, 3), np.uint8)
    frame[48:112, 128:192] = 255  # MIDDLE
    for variant in ("int8", "fp32"):
        cfg = AgentConfig.model_validate({"model": {"bundle": str(bundle), "variant": variant, "tune_budget_s": 0}})
        p = build_pipeline(cfg, structlog.get_logger())
        assert p.running is not None and p.running.variant == variant and p.regions is not None
        embedding, cells = p.infer(p.prepare(frame))
        (region,) = p.find_regions(cells, p.labeler(embedding), (160, 320))
        assert region.box == pytest.approx(MIDDLE, abs=1e-6)


def test_regions_disabled_in_config_leave_the_model_alone(make_dense_bundle):
    bundle = make_dense_bundle()
    cfg = AgentConfig.model_validate(
        {"model": {"bundle": str(bundle), "tune_budget_s": 0}, "regions": {"enabled": False}}
    )
    with structlog.testing.capture_logs() as logs:
        p = build_pipeline(cfg, structlog.get_logger())
    assert p.regions is None and p.infer(np.zeros((1, 3, 40, 40), np.float32))[1] is None
    assert [e["reason"] for e in logs if e["event"] == "regions_unavailable"] == ["regions.enabled is false"]


def test_regions_labels_override_the_bundles_marks(make_dense_bundle):
    bundle = make_dense_bundle(localize=())  # nothing marked in the bundle
    cfg = AgentConfig.model_validate({"model": {"bundle": str(bundle), "tune_budget_s": 0}})
    with structlog.testing.capture_logs() as logs:
        assert build_pipeline(cfg, structlog.get_logger()).regions is None
    assert "no label is localized" in [e for e in logs if e["event"] == "regions_unavailable"][0]["reason"]
    cfg = cfg.model_copy(update={"regions": cfg.regions.model_copy(update={"labels": ["scene.road"]})})
    p = build_pipeline(cfg, structlog.get_logger())
    assert p.regions is not None and p.regions.localized == ("scene.road",)


# --------------------------------------------------------------------------- bad config: one line, exit 2


@pytest.mark.parametrize(
    "labels, needle",
    [
        (["people.present"], "names group 'people', which the bundle does not have"),
        (["pedestrians.running"], "unknown label 'pedestrians.running'"),
    ],
)
def test_bad_regions_labels_are_config_errors(labels, needle, make_dense_bundle):
    cfg = AgentConfig.model_validate({"model": {"bundle": str(make_dense_bundle()), "tune_budget_s": 0}})
    cfg = cfg.model_copy(update={"regions": cfg.regions.model_copy(update={"labels": labels})})
    with pytest.raises(ConfigError, match=needle):
        build_pipeline(cfg, structlog.get_logger())


CAMPAIGN = """
[[collect.campaigns]]
name = "centre"
rule = {{ region = {region} }}
[collect.store]
directory = "{store}"
"""

BAD = {
    "regions.labels unknown": (
        '[regions]\nlabels = ["pedestrians.walking"]\n',
        "regions.labels: unknown label 'pedestrians.walking'",
    ),
    "regions.labels not group.label": ('[regions]\nlabels = ["pedestrians"]\n', "must be 'group.label'"),
    "regions.threshold 0": ("[regions]\nthreshold = 0\n", "regions.threshold"),
    "region on an unknown tag": (
        CAMPAIGN.format(region='{ label = "cyclists.present" }', store="{store}"),
        "unknown tag 'cyclists.present'",
    ),
    "region range reversed": (
        CAMPAIGN.format(region='{ label = "pedestrians.present", centre_x = [0.67, 0.33] }', store="{store}"),
        "centre_x: Value error, must be [low, high] with 0 <= low <= high <= 1 (got [0.67, 0.33])",
    ),
    "region range beyond the frame": (
        CAMPAIGN.format(region='{ label = "pedestrians.present", centre_y = [0, 1.5] }', store="{store}"),
        "centre_y",
    ),
    "region on a label without regions": (
        CAMPAIGN.format(region='{ label = "scene.road" }', store="{store}"),
        "rule.region.label 'scene.road' gets no regions",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD))
def test_bad_regions_config_exits_2_with_one_line(case, make_dense_bundle, tmp_path: Path):
    toml, needle = BAD[case]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml.replace("{store}", str(tmp_path / "store")))
    clip = patch_clip(tmp_path / "patch.mp4", (320, 160), [MIDDLE, EDGE])
    r = run_cli(
        "--config", str(cfg), "--camera", str(clip), "--bundle", str(make_dense_bundle()), "--no-metrics",
        "--publish", f"ipc://{tmp_path}/x.sock",
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("retrofit-agent: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


@pytest.mark.integration
def test_a_region_campaign_on_a_bundle_without_cells_exits_2(make_dense_bundle, tmp_path: Path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(CAMPAIGN.format(region='{ label = "pedestrians.present" }', store=tmp_path / "store"))
    clip = patch_clip(tmp_path / "patch.mp4", (320, 160), [MIDDLE])
    r = run_cli(
        "--config", str(cfg), "--camera", str(clip), "--bundle", str(make_dense_bundle(cells=False)),
        "--no-metrics", "--publish", f"ipc://{tmp_path}/x.sock",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("retrofit-agent: error:")]
    assert "rule.region needs regions, but the bundle's model has no cell output" in line


def test_stage_metric_exports_the_regions_stage_from_the_first_scrape():
    from retrofit_agent.daemon.metrics import AgentMetrics

    reg = CollectorRegistry()
    AgentMetrics.create(reg)
    assert reg.get_sample_value("retrofit_stage_duration_seconds_count", {"stage": "regions"}) == 0
