"""``retrofit-model world images|clip``: files a user gets, a drive that shows every label, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import cv2
import pytest

from retrofit_agent.train.cli import main
from retrofit_agent.train.world import DEFAULT_PLAN, annotate, frames, load_label_space, parse_plan, parse_segment
from retrofit_agent.train.world.drive import SegmentError
from retrofit_agent.train.world.records import FrameRecord, ImageRecord

REPO = Path(__file__).resolve().parents[3]
SPACE = load_label_space()


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_images_writes_jpegs_captions_and_shards(tmp_path: Path, capsys):
    out = tmp_path / "world"
    code, stdout, _ = _run(
        ["world", "images", "--count", "7", "--out", str(out), "--size", "96x80", "--shard-size", "3"], capsys
    )
    assert code == 0
    records = [ImageRecord.model_validate_json(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 7 and len({r.seed for r in records}) == 7
    for r in records:
        image = cv2.imread(str(out / r.file))
        assert image.shape == (80, 96, 3)
        assert set(r.labels) == set(SPACE.groups) and r.caption
    shards = sorted((out / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["world-000000.tar", "world-000001.tar", "world-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["world-00000000.jpg", "world-00000000.txt", "world-00000000.json"]
        assert tar.extractfile("world-00000000.txt").read().decode() == records[0].caption
        assert tar.extractfile("world-00000000.jpg").read() == (out / records[0].file).read_bytes()
    summary = json.loads(stdout.splitlines()[0])
    assert summary["shards"].endswith("world-{000000..000002}.tar") and summary["count"] == 7


def test_the_same_seed_writes_the_same_bytes(tmp_path: Path, capsys):
    for name in ("a", "b"):
        assert (
            _run(
                [
                    "world",
                    "images",
                    "--count",
                    "4",
                    "--out",
                    str(tmp_path / name),
                    "--size",
                    "64x64",
                    "--seed",
                    "5",
                    "--shards-only",
                ],
                capsys,
            )[0]
            == 0
        )
    for rel in ("captions.jsonl", "shards/world-000000.tar"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert not (tmp_path / "a" / "images").exists()


def test_images_cli_runs_with_torch_unimportable(tmp_path: Path):
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'timm', 'open_clip'): sys.modules[m] = None\n"
        "from retrofit_agent.train.cli import main\n"
        f"raise SystemExit(main(['world', 'images', '--count', '2', '--out', {str(tmp_path)!r}, '--size', '64x64']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 2


def test_a_short_clip_has_its_frames_and_a_ground_truth_line_each(tmp_path: Path, capsys):
    clip = tmp_path / "drive.mp4"
    code, stdout, _ = _run(
        [
            "world",
            "clip",
            "--out",
            str(clip),
            "--size",
            "160x96",
            "--segment-seconds",
            "0.4",
            "--segments",
            "highway-clear-day-car,tunnel-truck,urban-night-rain-pedestrians-red",
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(stdout)["frames"] == 18
    cap = cv2.VideoCapture(str(clip))
    decoded = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (96, 160, 3)
        decoded += 1
    assert decoded == 18 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(15.0)
    rows = [FrameRecord.model_validate_json(line) for line in clip.with_suffix(".jsonl").read_text().splitlines()]
    assert [r.frame for r in rows] == list(range(18))
    assert rows[6].time_s == pytest.approx(0.4)
    assert [r.segment_index for r in rows] == [0] * 6 + [1] * 6 + [2] * 6
    assert rows[-1].labels["time_of_day"] == "night" and rows[-1].labels["weather"] == "rain"


def test_the_default_drive_lasts_a_minute_and_shows_every_label():
    plan = parse_plan(list(DEFAULT_PLAN), SPACE)
    seen: dict[str, set] = defaultdict(set)
    n = 0
    for f in frames(plan, 0, 15.0, 8.0, (640, 360), SPACE):
        for group, label in annotate(f.scene, SPACE).labels.items():
            seen[group].add(label)
        n += 1
    assert n / 15.0 >= 60.0
    for group, labels in SPACE.groups.items():
        missing = set(labels) - seen[group]
        assert not missing, f"the default drive never shows {group}: {sorted(missing)}"


def test_a_segment_keeps_its_labels_while_the_camera_drives_on():
    plan = parse_plan(["urban-dusk-pedestrians-red-bus-stop"], SPACE)
    states = [annotate(f.scene, SPACE).labels for f in frames(plan, 3, 15.0, 8.0, (640, 360), SPACE)]
    assert {s["traffic_light"] for s in states} <= {"red", None}  # a light keeps its state
    assert sum(s["traffic_light"] == "red" for s in states) / len(states) > 0.8
    assert sum(s["pedestrians"] == "present" for s in states) / len(states) > 0.5


def test_segment_names_are_parsed_strictly():
    seg = parse_segment("City-Night-Amber-speed", SPACE)
    assert seg.fixed["road_type"] == "urban" and seg.fixed["traffic_light"] == "yellow"
    assert (
        seg.fixed["signs"] == "speed_limit"
        and seg.fixed["pedestrians"] == "absent"
        and seg.fixed["scene"] == "open_road"
    )
    for bad in ("highway-rainbow", "red-green", "parking-tunnel", "-"):
        with pytest.raises(SegmentError):
            parse_segment(bad, SPACE)


@pytest.mark.parametrize(
    "argv",
    [
        ["world", "images", "--count", "0", "--out", "OUT"],
        ["world", "images", "--count", "-3", "--out", "OUT"],
        ["world", "images", "--count", "2", "--out", "OUT", "--size", "10x10"],
        ["world", "images", "--count", "2", "--out", "OUT", "--size", "4000x300"],
        ["world", "images", "--count", "2", "--out", "OUT", "--size", "big"],
        ["world", "images", "--count", "2", "--out", "OUT", "--seed", "-1"],
        ["world", "images", "--count", "2", "--out", "OUT", "--prompts", "MISSING.toml"],
        ["world", "clip", "--out", "OUT.mp4", "--fps", "0"],
        ["world", "clip", "--out", "OUT.mp4", "--fps", "240"],
        ["world", "clip", "--out", "OUT.mp4", "--segments", "highway-clear,moonbase"],
        ["world", "clip", "--out", "OUT.mp4", "--segments", "parking-bridge"],
        ["world", "clip", "--out", "OUT.mp4", "--segments", ","],
        ["world", "clip", "--out", "OUT.mp4", "--segment-seconds", "0"],
        ["world", "clip", "--out", "OUT.avi"],
        ["world", "render"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], tmp_path: Path, capsys):
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrofit-model") and "error:" in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.mp4").exists()
