"""A region-gated campaign in the running daemon: it keeps a frame only where the box is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dense_model import EDGE, MIDDLE, patch_clip

pytestmark = pytest.mark.integration

CONFIG = """
[[collect.campaigns]]
name = "centre"
min_interval_s = 0
max_per_hour = 100000
rule = {{ region = {{ label = "pedestrians.present", centre_x = [0.33, 0.67], centre_y = [0, 1] }} }}

[[collect.campaigns]]
name = "anywhere"
min_interval_s = 0
max_per_hour = 100000
rule = {{ any_of = ["pedestrians.present"] }}

[collect.store]
directory = "{store}"
"""


def sidecars(store: Path, campaign: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / campaign).rglob("*.json"))]


def test_a_region_campaign_captures_only_frames_whose_box_is_in_the_middle(
    start_agent, make_dense_bundle, tmp_path: Path
):
    store, cfg = tmp_path / "store", tmp_path / "agent.toml"
    cfg.write_text(CONFIG.format(store=store))
    # The pedestrian stands at the left edge, steps into the middle third, and back to the edge.
    clip = patch_clip(tmp_path / "walk.mp4", (320, 160), [EDGE] * 8 + [MIDDLE] * 6 + [EDGE] * 8)
    agent = start_agent("--config", str(cfg), "--camera", str(clip), "--bundle", str(make_dense_bundle()))
    assert agent.proc.wait(60) == 0, agent.logs()[-2000:]

    centre, anywhere = sidecars(store, "centre"), sidecars(store, "anywhere")
    # The tag alone is on for every frame, so the tag-only campaign keeps the edge frames too.
    assert len(anywhere) == 22
    at_edge = [s for s in anywhere if s["regions"][0]["box"][2] <= 0.2]
    assert len(at_edge) == 16
    # The region-gated one keeps exactly the six middle frames, each with its box in the sidecar.
    assert len(centre) == 6, [s["regions"] for s in centre]
    assert {s["frame_id"] for s in centre}.isdisjoint({s["frame_id"] for s in at_edge})
    for s in centre:
        (region,) = s["regions"]
        assert region["tag"] == "pedestrians.present"
        assert region["box"] == pytest.approx(list(MIDDLE), abs=0.03)
