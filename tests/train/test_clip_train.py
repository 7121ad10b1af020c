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
        tree[name] = {**tree.get(name, {}), **values}
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


def test_minimal_pairs_share_the_scene_and_name_the_group_they_differ_in():
    from retrofit_agent.train.teacher_train.stream import minimal_pair
    from retrofit_agent.train.world import load_label_space, sample_scene, scene_seed

    space = load_label_space()
    objects = ("pedestrians", "cyclists", "vehicles")
    differed = 0
    for i in range(12):
        seed = scene_seed(4, i)
        a, b = minimal_pair(seed, 96, space, objects)
        known = [g for g in a.labels if a.labels[g] is not None and b.labels[g] is not None]
        changed = [g for g in known if a.labels[g] != b.labels[g]]
        # Things are placed again from the changed group on, so now and then another object
        # group's truth moves too (a cyclist newly hidden behind a bus); the conditions never do.
        assert set(changed) <= set(objects + ("signs", "traffic_light")), (a.labels, b.labels)
        for g in ("weather", "time_of_day", "road_type", "scene"):
            assert a.labels[g] == b.labels[g]
        if len(changed) == 1:
            differed += 1
            g = changed[0]
            for p in (a, b):  # both captions say the group, each with its own label
                from retrofit_agent.train.world.captions import phrases

                words = phrases(space, g, p.labels[g], False) + phrases(space, g, p.labels[g], True)
                assert any(w.split("{")[0].strip().lower() in p.caption.lower() for w in words), (
                    g,
                    p.labels[g],
                    p.caption,
                )
        # one scene drawn twice: same camera and light, so most pixels agree
        assert a.image.shape == b.image.shape
        same = np.mean(np.abs(a.image.astype(int) - b.image.astype(int)) < 12)
        assert same > 0.5, same
    assert differed >= 8, differed
    # an ordinary scene of the same seed is not the pair's first picture: labels are pinned
    assert sample_scene(scene_seed(4, 0), 96, 96, space) is not None


def test_same_scene_twins_fill_the_batch_in_pairs():
    cfg = micro_config(
        Path("unused"), 4, data={"twins": 0.5, "twin_scene": "same", "twin_groups": ["pedestrians", "vehicles"]}
    )
    from retrofit_agent.train.world import load_label_space

    model = build_model(MICRO, 0)
    batches = WorldBatches(cfg.data, load_label_space(), teacher_view(model), open_clip.get_tokenizer(MICRO), 8, (0, 4))
    first = batches.batch(1)
    assert torch.equal(first["images"], batches.batch(1)["images"])
    pairs = 0
    for b in range(3):
        labels = batches.batch(b)["labels"]
        for base, twin in zip(labels[:4], labels[4:]):
            changed = [g for g in base if base[g] is not None and twin[g] is not None and base[g] != twin[g]]
            assert all(base[g] == twin[g] for g in ("weather", "time_of_day", "road_type", "scene"))
            pairs += changed in (["pedestrians"], ["vehicles"])
    assert pairs >= 8, pairs


def test_schedule_steps_sets_the_cosine_and_a_cut_run_follows_it():
    from retrofit_agent.train.teacher_train.trainer import lr_at

    long = micro_config(Path("unused"), 100, optim={"warmup_steps": 10})
    cut = micro_config(Path("unused"), 30, optim={"warmup_steps": 10, "schedule_steps": 100})
    assert [lr_at(s, cut) for s in range(30)] == [lr_at(s, long) for s in range(30)]
    short = micro_config(Path("unused"), 30, optim={"warmup_steps": 10})
    assert lr_at(29, short) < 0.01 * lr_at(29, cut)


def test_init_from_starts_a_new_run_from_another_runs_weights(trained: Path, tmp_path: Path):
    cfg = micro_config(tmp_path / "second", 3, model={"init_from": str(trained / "checkpoint.pt")})
    with structlog.testing.capture_logs() as logs:
        second = TeacherTrainer(cfg)
    assert any(e["event"] == "teacher_init_from" for e in logs)
    loaded = torch.load(trained / "checkpoint.pt", weights_only=True)["state_dict"]
    mine = second.model.state_dict()
    assert all(torch.equal(loaded[k], mine[k]) for k in loaded)
    assert second.totals.step == 0  # a new run: its own optimiser, schedule and steps
    fresh = TeacherTrainer(micro_config(tmp_path / "fresh", 3)).model.state_dict()
    assert not all(torch.equal(fresh[k], mine[k]) for k in fresh)


def test_a_run_started_before_a_setting_existed_still_resumes(tmp_path: Path):
    cfg = micro_config(tmp_path / "old", 3)
    with structlog.testing.capture_logs():
        TeacherTrainer(cfg).fit()
    state = torch.load(tmp_path / "old" / "train_state.pt", weights_only=False)
    for section, key in (
        ("model", "init_from"),
        ("data", "twin_scene"),
        ("data", "twin_groups"),
        ("optim", "schedule_steps"),
    ):
        del state["fingerprint"][section][key]  # as written before these settings were added
    torch.save(state, tmp_path / "old" / "train_state.pt")
    with structlog.testing.capture_logs() as logs:
        TeacherTrainer(micro_config(tmp_path / "old", 5), resume=True).fit()  # extended: steps may change
    assert [e["step"] for e in logs if e["event"] == "teacher_train_resumed"] == [3]
    # pinning the schedule to what the run trained on (its 3 steps) is the same run; another is not
    with structlog.testing.capture_logs():
        TeacherTrainer(micro_config(tmp_path / "old", 6, optim={"schedule_steps": 5}), resume=True)
    with pytest.raises(ConfigError, match="optim.schedule_steps"):
        TeacherTrainer(micro_config(tmp_path / "old", 6, optim={"schedule_steps": 50}), resume=True)
    with pytest.raises(ConfigError, match="data.twin_scene"):
        TeacherTrainer(micro_config(tmp_path / "old", 6, data={"twin_scene": "same"}), resume=True)


def test_the_label_head_reads_the_embedding_skips_unknown_truth_and_stays_out_of_the_checkpoint(tmp_path: Path):
    from retrofit_agent.train.teacher_train.trainer import LabelHead

    head = LabelHead(4, {"pedestrians": ("present", "absent"), "vehicles": ("car", "bus", "none")})
    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    with torch.no_grad():
        logits = head.linear(feats * head.scale)
    truth = [{"pedestrians": "present", "vehicles": None}, {"pedestrians": None, "vehicles": "bus"}, {}]
    want = (
        torch.nn.functional.cross_entropy(logits[:1, :2], torch.tensor([0]))
        + torch.nn.functional.cross_entropy(logits[1:2, 2:], torch.tensor([1]))
    ) / 2
    assert float(head.loss(feats, truth).detach()) == pytest.approx(float(want), rel=1e-6)
    assert float(head.loss(feats, [{}, {}, {}])) == 0.0

    cfg = micro_config(
        tmp_path / "run",
        12,
        data={"cycle_scenes": 16},
        labels={"weight": 1.0, "groups": ["pedestrians", "vehicles"]},
        run={"log_every": 4},
    )
    with structlog.testing.capture_logs():
        trainer = TeacherTrainer(cfg)
        trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    parts = [r["loss_labels"] for r in lines if "loss_labels" in r]
    assert len(parts) == 3 and parts[-1] < parts[0], parts
    assert set(trainer.label_head.groups) == {"pedestrians", "vehicles"}
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert not any("linear" in k for k in saved)  # open_clip's format: the model alone
    Teacher(MICRO, pretrained=str(tmp_path / "run" / "checkpoint.pt"))  # and it loads as one
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert torch.equal(state["label_head"]["linear.weight"], trainer.label_head.linear.weight.detach())


def test_a_finished_run_resumed_again_keeps_its_report_unless_the_held_out_set_changes(tmp_path: Path):
    out = tmp_path / "run"
    args = ["teacher-train", "--out", str(out), "--steps", "3", "--resume", "--set", f"model.name={MICRO}"]
    for kv in ("data.render_size=[64,64]", "data.workers=0", "optim.batch_size=8", "optim.warmup_steps=1"):
        args += ["--set", kv]
    args += ["--set", "eval.every=0", "--set", "eval.render_size=64", "--set", "run.threads=1"]
    torch.set_num_threads(2)
    assert main([*args, "--set", "eval.scenes=8"]) == 0
    assert torch.get_num_threads() == 2  # run.threads was the run's: the chain's next stage gets the process's
    report = out / "eval.json"
    first, stamp = json.loads(report.read_text()), report.stat().st_mtime_ns
    assert first["step"] == 3 and first["scenes"] == 8
    assert main([*args, "--set", "eval.scenes=8"]) == 0  # the chain's rerun: nothing to train, nothing to score
    assert report.stat().st_mtime_ns == stamp
    assert main([*args, "--set", "eval.scenes=10"]) == 0
    assert json.loads(report.read_text())["scenes"] == 10
    assert torch.get_num_threads() == 2
    assert main([*args, "--set", "eval.scenes=8", "--eval-only"]) == 0  # scoring alone sets run.threads too
    assert torch.get_num_threads() == 2
    assert json.loads(report.read_text())["scenes"] == 8


def test_the_chain_trains_a_pretrain_phase_and_starts_the_teacher_from_it(tmp_path: Path):
    from retrofit_agent.train.chain import Chain, ChainConfig

    common = (
        f'[model]\nname = "{MICRO}"\n[data]\nrender_size = [64, 64]\nworkers = 0\n'
        "[eval]\nevery = 0\nscenes = 16\nrender_size = 64\n[run]\nlog_every = 1\n"
    )
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text(common + "[optim]\nbatch_size = 8\nsteps = 3\nwarmup_steps = 1\nprecision = 'fp32'\n")
    second.write_text(
        common.replace("workers = 0", 'workers = 0\ntwins = 0.5\ntwin_scene = "same"\nworld_seed = 2')
        + "[optim]\nbatch_size = 8\nsteps = 2\nwarmup_steps = 1\nprecision = 'fp32'\n"
    )
    cfg = ChainConfig.model_validate(
        {
            "teacher": {"config": str(second), "pretrain": [{"config": str(first)}]},
            "distill": {"config": "models/configs/ci-student.toml"},
        }
    )
    work = tmp_path / "work"
    result = Chain(cfg, work, tmp_path / "bundle").run(until="teacher", start="teacher")["teacher"]
    assert torch.load(work / "teacher-pretrain" / "checkpoint.pt", weights_only=True)["step"] == 3
    main_cfg = json.loads((work / "teacher" / "config.json").read_text())
    assert main_cfg["model"]["init_from"] == str(work / "teacher-pretrain" / "checkpoint.pt")
    assert result["checkpoint"] == str(work / "teacher" / "checkpoint.pt")
    assert [set(e) for e in result["pretrain_eval"]] == [set(result["eval"])]
    # a changed first phase is a changed teacher
    key = Chain(cfg, work, tmp_path / "bundle")._stage_key("teacher")
    first.write_text(first.read_text().replace("steps = 3", "steps = 4"))
    assert Chain(cfg, work, tmp_path / "bundle")._stage_key("teacher") != key


def test_the_chain_distils_in_phases_each_from_the_last_student_sharing_one_teacher_cache(
    tmp_path: Path, trained: Path, monkeypatch
):
    from retrofit_agent.train.chain import Chain, ChainConfig

    world = tmp_path / "world"
    assert main(["world", "images", "--count", "24", "--out", str(world), "--size", "64x64", "--shard-size", "12"]) == 0
    phase = (
        '[student]\nbackbone = "test_efficientnet"\npretrained = false\nhidden_dim = 32\ninput_size = {size}\n'
        "[data]\nholdout = 4\nbatch_size = 8\nworkers = 0\n"
        "[loss]\npca_attention = 0.0\npca_value = 0.0\ngl = 0.0\nadversarial = 0.0\n"
        "[optim]\nmax_steps = 2\nwarmup_steps = 1\n[run]\ndevice = 'cpu'\neval_every = 1000\n"
        "[cache]\nenabled = true\n"
    )
    files = []
    for i, size in enumerate((32, 48, 64)):
        files.append(tmp_path / f"phase{i}.toml")
        files[-1].write_text(phase.format(size=size))
    cfg = ChainConfig.model_validate(
        {
            "teacher": {"config": "models/configs/ci-teacher.toml"},
            "distill": {"config": str(files[2]), "pretrain": [{"config": str(files[0])}, {"config": str(files[1])}]},
        }
    )
    chain = Chain(cfg, tmp_path / "work", tmp_path / "bundle")
    chain.results["world"] = {"shards": sorted(str(p) for p in (world / "shards").glob("*.tar"))}
    chain.results["teacher"] = {"model": MICRO, "checkpoint": str(trained / "checkpoint.pt")}
    chain.keys.update(world="given", teacher="given")
    import retrofit_agent.train.chain as chain_module

    calls: list[list[str]] = []
    real = chain_module._model
    monkeypatch.setattr(chain_module, "_model", lambda argv: (calls.append(argv), real(argv))[1])
    result = chain.run(until="distill", start="distill")["distill"]
    work = tmp_path / "work"
    sizes = [
        torch.load(d / "student.pt", weights_only=True)["architecture"]["input_size"]
        for d in (work / "distill-pretrain", work / "distill-pretrain-2", work / "distill")
    ]
    assert sizes == [32, 48, 64] and len(result["pretrain_metrics"]) == 2
    # The three phases store the same teacher outputs: built once, in one shared folder.
    (shared,) = (work / "teacher-cache").iterdir()
    assert (shared / "key.json").is_file()
    assert not any((d / "teacher-cache").exists() for d in (work / "distill-pretrain", work / "distill"))
    assert all(f"cache.dir={shared}" in argv for argv in calls)
    # each later phase was started from the one before
    starts = [[a for a in argv if a.startswith("student.initial_checkpoint=")] for argv in calls]
    assert starts == [
        [],
        [f"student.initial_checkpoint={work / 'distill-pretrain' / 'student.pt'}"],
        [f"student.initial_checkpoint={work / 'distill-pretrain-2' / 'student.pt'}"],
    ]


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
        (["--set", 'data.twin_groups=["lanes"]'], "data.twin_groups: no group 'lanes'"),
        (["--set", "data.twin_scene=mirror"], "data.twin_scene: Input should be 'other' or 'same'"),
        (["--set", 'labels.groups=["wheels"]'], "labels.groups: no group 'wheels'"),
        (
            ["--set", "model.init_from=/nonexistent/checkpoint.pt"],
            "model.init_from: no such checkpoint: '/nonexistent/",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expect: str):
    r = _model_cli("teacher-train", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrofit-model: error: ") and expect in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
