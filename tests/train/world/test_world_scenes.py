"""The procedural world: torch-free, deterministic, every label reachable and legible."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tomllib

from retrofit_agent.train.world import (
    SCENE_ADAPTER,
    annotate,
    caption,
    load_label_space,
    render,
    sample_scene,
)
from retrofit_agent.train.world.annotate import MIN_HEIGHT, inside_tunnel
from retrofit_agent.train.world.labels import DEFAULT_PROMPTS, LabelSpaceError

REPO = Path(__file__).resolve().parents[3]
SPACE = load_label_space()


@pytest.fixture(scope="module")
def truths() -> list:
    """2000 sampled scenes at the teacher's 128 px, annotated (no rendering: fast)."""
    out = []
    for seed in range(2000):
        scene = sample_scene(seed, 128, 128, SPACE)
        out.append((scene, annotate(scene, SPACE)))
    return out


def test_importing_the_world_does_not_import_torch():
    code = (
        "import sys\n"
        "import retrofit_agent.train, retrofit_agent.train.world as w\n"
        "s = w.sample_scene(1, 96, 96, w.load_label_space())\n"
        "w.render(s); w.annotate(s, w.load_label_space())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'open_clip')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_same_seed_renders_the_same_bytes_and_another_seed_does_not():
    a, b = sample_scene(42, 160, 120, SPACE), sample_scene(42, 160, 120, SPACE)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    assert render(sample_scene(43, 160, 120, SPACE)).tobytes() != render(a).tobytes()


def test_a_scene_survives_json_and_renders_identically():
    scene = sample_scene(7, 128, 128, SPACE)
    again = SCENE_ADAPTER.validate_json(SCENE_ADAPTER.dump_json(scene))
    assert again == scene
    assert np.array_equal(render(again), render(scene))


def test_render_is_at_the_requested_size():
    for w, h in ((128, 128), (160, 96), (640, 360)):
        assert render(sample_scene(3, w, h, SPACE)).shape == (h, w, 3)


def test_the_world_covers_exactly_the_prompts_files_labels():
    doc = tomllib.loads(DEFAULT_PROMPTS.read_text())
    expected = {g["name"]: {l["name"] for l in g["labels"]} for g in doc["groups"]}
    assert {g: set(labels) for g, labels in SPACE.groups.items()} == expected


def test_every_label_is_frequent_over_2000_scenes(truths):
    counts: dict[str, Counter] = {g: Counter() for g in SPACE.groups}
    for _, truth in truths:
        for group, label in truth.labels.items():
            counts[group][label] += 1
    for group, labels in SPACE.groups.items():
        seen = sum(v for k, v in counts[group].items() if k is not None)
        for label in labels:
            share = counts[group][label] / seen
            assert share >= 0.10, f"{group}.{label} is only {share:.1%} of decided pictures"
        # null (undecidable) stays rare, except weather/time inside tunnels (a rule, not noise)
        if group not in ("weather", "time_of_day"):
            assert counts[group][None] / len(truths) < 0.02, (group, counts[group])


def test_weather_and_time_are_null_exactly_inside_tunnels_and_every_null_says_why(truths):
    for scene, truth in truths:
        hidden = inside_tunnel(scene)
        assert (truth.labels["weather"] is None) == hidden
        assert (truth.labels["time_of_day"] is None) == hidden
        assert set(truth.null_reasons) == {g for g, label in truth.labels.items() if label is None}
        if hidden:
            assert truth.null_reasons["weather"] == truth.null_reasons["time_of_day"] == "inside_tunnel"


def test_boxes_lie_inside_the_picture_and_back_the_labels(truths):
    for scene, truth in truths[:600]:
        for b in truth.boxes:
            x0, y0, x1, y1 = b.xyxy
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            assert b.xyxy_norm == pytest.approx(
                (x0 / scene.width, y0 / scene.height, x1 / scene.width, y1 / scene.height), abs=1e-4
            )
            if b.legible:
                assert y1 - y0 >= MIN_HEIGHT * scene.height - 1
                if b.group != "scene":
                    assert truth.labels[b.group] == b.label
        for group in ("pedestrians", "cyclists", "traffic_light", "signs", "vehicles"):
            label = truth.labels[group]
            if label not in (None, "absent", "none"):
                assert any(b.group == group and b.legible for b in truth.boxes)


def test_a_sampled_label_is_big_enough_to_read_at_128_pixels(truths):
    """The first instance of each present label covers >= 10% of the height (placement's target)."""
    tall = Counter()
    for scene, truth in truths[:500]:
        for group in ("pedestrians", "traffic_light", "signs", "vehicles", "cyclists"):
            heights = [b.xyxy[3] - b.xyxy[1] for b in truth.boxes if b.group == group and b.legible]
            if heights:
                tall[max(heights) >= 0.095 * scene.height] += 1
    assert tall[False] / max(1, sum(tall.values())) < 0.02


def test_captions_never_contain_template_text_and_say_only_what_is_true(truths):
    fixed = [t.lower() for t in SPACE.template_fixed_texts()]
    assert "a dashcam photo of " in fixed and "." in fixed
    said = Counter()
    for scene, truth in truths[:800]:
        text = caption(scene, truth.labels, truth.boxes, SPACE)
        low = text.lower()
        assert text.strip() and not any(f in low for f in fixed), text
        for colour in ("red", "yellow", "green"):
            if f"{colour} traffic light" in low:
                assert truth.labels["traffic_light"] == colour, text
        if "stop sign" in low:
            assert truth.labels["signs"] == "stop", text
        for word in (
            "rain",
            "snow",
            "fog",
            "night",
            "dusk",
            "tunnel",
            "bridge",
            "construction",
            "cyclist",
            "bicycle",
            "pedestrian",
            "truck",
            "bus",
            "motorcycle",
            "highway",
            "motorway",
            "parking",
            "country road",
            "city",
        ):
            said[word] += word in low
    assert all(said.values()), said  # the core vocabulary does reach the text tower


def test_a_label_the_world_cannot_draw_is_refused(tmp_path: Path):
    bad = tmp_path / "p.toml"
    bad.write_text(
        'templates = ["{}"]\n[[groups]]\nname = "weather"\nlabels = [{name = "clear", phrases = ["x"]}, '
        '{name = "hail", phrases = ["hail"]}]\n'
    )
    with pytest.raises(LabelSpaceError, match="hail"):
        load_label_space(bad)


def test_labels_dropped_from_the_prompts_file_are_no_longer_sampled(tmp_path: Path):
    text = DEFAULT_PROMPTS.read_text().replace(
        '  { name = "fog", phrases = ["fog", "a foggy road", "low visibility in mist"] },\n', ""
    )
    assert "foggy" not in text
    path = tmp_path / "nofog.toml"
    path.write_text(text)
    space = load_label_space(path)
    assert "fog" not in space.groups["weather"]
    weathers = {annotate(s, space).labels["weather"] for s in (sample_scene(i, 96, 96, space) for i in range(300))}
    assert "fog" not in weathers and "rain" in weathers
