"""``retrofit-model teacher-train``: a CLIP trained from scratch on the world, resumable, loadable by open_clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from helpers import REPO  # noqa: E402
from retrofit_agent.contract.errors import ConfigError  # noqa: E402
from retrofit_agent.train.cli import main  # noqa: E402
from retrofit_agent.train.teacher import (  # noqa: E402
    CONFIG_DIR,
    Teacher,
    teacher_view,  # noqa: E402
)
from retrofit_agent.train.teacher_train.config import MODEL_CONFIG_DIR, load_teacher_train_config  # noqa: E402
from retrofit_agent.train.teacher_train.stream import WorldBatches  # noqa: E402
from retrofit_agent.train.teacher_train.trainer import TeacherTrainer, build_model  # noqa: E402

pytestmark = [pytest.mark.train]

MICRO = "retrofit-micro-clip"  # 32 px, two 64-wide blocks: a step takes milliseconds


def micro_config(out: Path, steps: int, **sections: dict):
    tree = {
        "model": {"name": MICRO},
        "data": {"render_size": [64, 64], "workers": 0},
        "optim": {"batch_size": 16, "steps": steps, "warmup_steps": 2, "lr": 3e-3, "precision": "fp32"},
        "eval": {"every": 0, "scenes": 40, "quick_scenes": 16, "render_size": 64},
        "run": {"out_dir": str(out), "log_every": 1, "threads": 1},
    }
    for name, values in sections.items():
        tree[name] = {**tree[name], **values}
    return load_teacher_train_config(None, tree)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A micro teacher trained for 40 steps on 32 scenes through the command line (final evaluation included)."""
    out = tmp_path_factory.mktemp("teacher")
    args = [
        "teacher-train",
        "--out",
        str(out),
        "--steps",
        "40",
        "--set",
        f"model.name={MICRO}",
        "--set",
        "data.render_size=[64,64]",
        "--set",
        "data.workers=1",
        "--set",
        "data.cycle_scenes=32",
        "--set",
        "optim.batch_size=16",
        "--set",
        "optim.warmup_steps=4",
        "--set",
        "optim.lr=3e-3",
        "--set",
        "eval.every=20",
        "--set",
        "eval.quick_scenes=16",
        "--set",
        "eval.scenes=48",
        "--set",
        "eval.render_size=64",
        "--set",
        "run.log_every=1",
    ]
    assert main(args) == 0
    return out


def test_training_lowers_the_contrastive_loss(trained: Path):
    loss = losses(trained)
    assert len(loss) == 40
    assert np.mean(loss[:4]) > np.log(16) - 0.2  # chance: each image has 16 captions to choose from
    assert np.mean(loss[-8:]) < np.log(16) - 0.5, loss


def test_run_directory_holds_checkpoint_state_log_and_a_per_group_report(trained: Path):
    assert {p.name for p in trained.iterdir()} >= {
        "checkpoint.pt",
        "train_state.pt",
        "log.jsonl",
        "config.json",
        "eval.json",
    }
    report = json.loads((trained / "eval.json").read_text())
    assert list(report["groups"]) == [
        "weather",
        "time_of_day",
        "road_type",
        "scene",
        "pedestrians",
        "cyclists",
        "traffic_light",
        "signs",
        "vehicles",
    ]
    weather = report["groups"]["weather"]
    assert weather["scored"] + weather["skipped_null"] == 48  # tunnels hide the weather: those are skipped
    assert 0 <= weather["top1"] <= 1 and set(weather["classes"]) == {"clear", "cloudy", "rain", "snow", "fog"}
    curve = [r for r in map(json.loads, (trained / "log.jsonl").read_text().splitlines()) if "top1" in r]
    assert [r["step"] for r in curve] == [20] and set(curve[0]["top1"]) == set(report["groups"])


def test_checkpoint_loads_through_open_clips_own_pretrained_path(trained: Path):
    model, _, preprocess = open_clip.create_model_and_transforms(MICRO, pretrained=str(trained / "checkpoint.pt"))
    saved = torch.load(trained / "train_state.pt", weights_only=False)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    teacher = Teacher(MICRO, pretrained=str(trained / "checkpoint.pt"))  # what distill and prompts load
    assert teacher.logit_scale == pytest.approx(float(saved["logit_scale"].exp()))


def test_training_sees_pictures_as_the_distillation_teacher_does():
    assert MODEL_CONFIG_DIR == CONFIG_DIR
    model = build_model(MICRO, 0)
    assert teacher_view(model) == Teacher(MICRO, seed=0).input_spec()


def test_eval_only_prints_top1_per_group(trained: Path, capsys):
    assert (
        main(
            [
                "teacher-train",
                "--eval-only",
                "--out",
                str(trained),
                "--set",
                f"model.name={MICRO}",
                "--set",
                "eval.render_size=64",
                "--scenes",
                "24",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    for group in ("weather", "traffic_light", "vehicles"):
        assert group in table
    assert json.loads((trained / "eval.json").read_text())["scenes"] == 24


def test_a_killed_run_resumes_exactly_where_it_left_off(tmp_path: Path, monkeypatch):
    straight = micro_config(tmp_path / "straight", 6, data={"workers": 1, "twins": 0.25})
    with structlog.testing.capture_logs():
        TeacherTrainer(straight).fit()

    crashed = micro_config(
        tmp_path / "crashed", 6, data={"workers": 1, "twins": 0.25}, run={"checkpoint_every_s": 1e-9}
    )
    real_step = TeacherTrainer.step

    def dies_at_step_4(self, *a, **kw):
        if self.totals.step == 3:
            raise KeyboardInterrupt  # as a kill after the step-3 checkpoint
        return real_step(self, *a, **kw)

    monkeypatch.setattr(TeacherTrainer, "step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt), structlog.testing.capture_logs():
        TeacherTrainer(crashed).fit()
    monkeypatch.setattr(TeacherTrainer, "step", real_step)
    with pytest.raises(ConfigError, match="--resume"):
        TeacherTrainer(crashed)  # an existing run is never overwritten silently
    with structlog.testing.capture_logs() as logs:
        TeacherTrainer(crashed, resume=True).fit()
    assert [e["step"] for e in logs if e["event"] == "teacher_train_resumed"] == [3]

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")


def test_batches_are_a_function_of_the_step_and_twins_differ_in_one_group():
    cfg = micro_config(Path("unused"), 4, data={"twins": 0.5})
    from retrofit_agent.train.world import load_label_space

    model = build_model(MICRO, 0)
    batches = WorldBatches(cfg.data, load_label_space(), teacher_view(model), open_clip.get_tokenizer(MICRO), 4, (0, 4))
    first, again = batches.batch(2), batches.batch(2)
    assert torch.equal(first["images"], again["images"]) and torch.equal(first["tokens"], again["tokens"])
    assert not torch.equal(first["images"], batches.batch(3)["images"])
    changed = []
    for b in range(4):
        labels = batches.batch(b)["labels"]
        for base, twin in zip(labels[:2], labels[2:]):
            seen = [g for g in base if base[g] is not None and twin[g] is not None]
            changed.append(sum(base[g] != twin[g] for g in seen))
    assert max(changed) <= 1 and sum(changed) >= 4, changed


def _model_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys\nfrom retrofit_agent.train.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--set", "model.name=retrofit-no-such-clip"], "model.name: no open_clip config 'retrofit-no-such-clip'"),
        (["--set", "optim.batch_size=1"], "optim.batch_size: Input should be greater than or equal to 2"),
        (["--steps", "0"], "optim.steps: Input should be greater than or equal to 1"),
        (["--set", "data.render_size=[16,64]"], "data.render_size must be [min, max]"),
        (["--set", "eval.world_seed=1"], "eval.world_seed must differ from data.world_seed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expect: str):
    r = _model_cli("teacher-train", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrofit-model: error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
