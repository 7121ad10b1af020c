"""End-to-end distillation with a seeded micro CLIP teacher and timm's test_efficientnet.

The teacher is random (nothing can be downloaded here), so what is tested is that the
student learns to reproduce *this* teacher: held-out cosine and zero-shot agreement rise
far above where they start and above what a constant predictor reaches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from retrofit_agent.contract.errors import ConfigError  # noqa: E402
from retrofit_agent.train.engine import Distiller  # noqa: E402
from train_helpers import REPO, TINY, fresh_logging, images, tiny_config  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.train]


def _metrics(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if l["kind"] == kind]


@pytest.mark.slow
def test_student_learns_the_teacher_with_every_loss_part(tmp_path: Path, images: Path, capsys):
    cfg = tiny_config(tmp_path / "run", [str(images)], optim={"max_steps": 80}, run={"eval_every": 40, "log_every": 10})
    summary = Distiller(cfg).fit()
    first, last = summary["initial"], summary["final"]
    with capsys.disabled():
        print(
            f"\n[distill] cosine {first['heldout_cosine']:.3f} -> {last['heldout_cosine']:.3f} "
            f"(constant baseline {last['heldout_cosine_constant_baseline']:.3f}); top-1 agreement "
            f"{first['heldout_top1_agreement']:.3f} -> {last['heldout_top1_agreement']:.3f} "
            f"(constant baseline {last['heldout_top1_constant_baseline']:.3f}); centred cosine "
            f"{first['heldout_centred_cosine']:.3f} -> {last['heldout_centred_cosine']:.3f}"
        )
    assert last["heldout_cosine"] > first["heldout_cosine"] + 0.5
    assert last["heldout_cosine"] > last["heldout_cosine_constant_baseline"]
    assert last["heldout_centred_cosine"] > first["heldout_centred_cosine"] + 0.4
    assert last["heldout_top1_agreement"] >= first["heldout_top1_agreement"] + 0.4
    # The random teacher gives most images one label, so a constant scores well; the student
    # must also get the other images right: at most 60 % of the constant's disagreements.
    assert 1 - last["heldout_top1_agreement"] <= 0.6 * (1 - last["heldout_top1_constant_baseline"])
    train = _metrics(tmp_path / "run", "train")
    parts = {
        "loss_embed",
        "loss_affinity",
        "loss_pca_attention",
        "loss_pca_value",
        "loss_gl",
        "loss_adversarial",
        "loss_discriminator",
        "lr",
        "images_per_s",
        "loss",
    }
    assert parts <= train[-1].keys()
    assert train[-1]["loss"] < train[0]["loss"] / 2
    assert 0.3 < sum(l["pca_substitution_rate"] for l in train) / len(train) < 0.7
    assert train[-1]["adversarial_weight"] > train[0]["adversarial_weight"]  # ramped up
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=False)
    # Only the student is kept for export: no projector or discriminator weights.
    assert all(k.startswith(("backbone.", "head.")) for k in saved["student"])
    assert saved["trained_from_pretrained_teacher"] is False
    # The export command's loader rebuilds the same student from it (weights_only load).
    from retrofit_agent.train.commands import load_student

    student, _ = load_student(tmp_path / "run" / "student.pt")
    assert student.describe() == saved["architecture"]
    assert all(torch.equal(v, saved["student"][k]) for k, v in student.state_dict().items())


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_exactly(tmp_path: Path, images: Path):
    sections = dict(
        optim={"max_steps": 8, "warmup_steps": 3},
        run={"log_every": 1, "checkpoint_every": 4, "eval_every": 100},
        data={"max_images": 200, "batch_size": 16},
        augment={"views": 2},
    )
    Distiller(tiny_config(tmp_path / "a", [str(images)], **sections)).fit()
    first = Distiller(tiny_config(tmp_path / "b", [str(images)], **sections)).fit(until_step=4)
    assert first["interrupted"] and (tmp_path / "b" / "checkpoints" / "last").exists()
    Distiller(tiny_config(tmp_path / "b", [str(images)], **sections)).fit()  # a new process would do the same
    a, b = _metrics(tmp_path / "a", "train"), _metrics(tmp_path / "b", "train")
    assert [l["step"] for l in b] == list(range(1, 9))
    keys = [k for k in a[0] if k.startswith("loss") or k in ("lr", "adversarial_weight")]
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys)
    print(f"[resume] largest loss/lr difference over 8 steps: {worst:.3g}")
    assert worst <= 1e-5
    wa = torch.load(tmp_path / "a" / "student.pt", weights_only=False)["student"]
    wb = torch.load(tmp_path / "b" / "student.pt", weights_only=False)["student"]
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-5


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrofit_agent.train.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.slow
def test_cli_distills_from_the_teacher_cache_and_skips_a_corrupt_image(tmp_path: Path, images: Path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(images.iterdir())[:160]:
        (data / p.name).symlink_to(p)
    (data / "zz-corrupt.jpg").write_bytes(b"\xff\xd8 truncated garbage")
    out = tmp_path / "run"
    args = [
        "distill",
        "--config",
        str(TINY),
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "15",
        "--set",
        f'data.train=["{data}"]',
        "--set",
        "data.holdout=32",
        "--set",
        "cache.enabled=true",
        "--set",
        "cache.shard_size=50",
        "--set",
        "loss.pca_attention=0",
        "--set",
        "loss.pca_value=0",
        "--set",
        "loss.gl=0",
        "--log-format",
        "json",
    ]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x faster" in r.stdout and "teacher cache:" in r.stdout
    summary = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert summary["skipped_images"] == 1
    assert summary["final"]["heldout_cosine"] > summary["initial"]["heldout_cosine"]
    assert len(list((out / "teacher-cache").glob("valid-*.npy"))) == 3  # 129 training images / 50 per shard
    events = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    assert any(e["event"] == "image_skipped" and e["image"].endswith("zz-corrupt.jpg") for e in events)
    # Resumable: a lost shard is rebuilt alone; the others are reused.
    (out / "teacher-cache" / "valid-00001.npy").unlink()
    r2 = _cli(*args[:-2], "--set", "optim.max_steps=16", "--log-format", "json")
    assert r2.returncode == 0, r2.stderr[-3000:]
    shards = [json.loads(l) for l in r2.stderr.splitlines() if '"teacher_cache_shard"' in l]
    assert [s["shard"] for s in shards] == [1]


def test_cli_rejects_bad_config_with_one_line_and_exit_2(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = -1\n")
    cases = {
        ("--config", str(bad)): "optim.lr",
        ("--config", str(TINY), "--set", "loss.nope=1"): "loss.nope: unknown setting",
        ("--config", str(TINY), "--set", "cache.enabled=true"): "cache.enabled stores final embeddings only",
        (
            "--config",
            str(TINY),
            "--set",
            "cache.enabled=true",
            "--set",
            "cache.spatial=true",
            "--set",
            "cache.views=2",
            "--set",
            "augment.teacher_view=clean",
        ): "cache.views > 1 needs augment.teacher_view",
        ("--config", str(TINY), "--set", "teacher.layer=[]"): "teacher.layer",
        ("--config", str(TINY), "--set", "augment.teacher_view=both"): "augment.teacher_view",
        ("--config", str(tmp_path / "missing.toml")): "config file not found",
        ("--config", str(TINY), "--set", "nonsense"): "must look like section.key=value",
    }
    for args, needle in cases.items():
        r = _cli("distill", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_after_a_student_step_only_the_student_and_projectors_have_learnt(tmp_path: Path, images: Path):
    d = Distiller(tiny_config(tmp_path / "run", [str(images)], data={"max_images": 48, "holdout": 0, "batch_size": 8}))
    before = {n: p.detach().clone() for n, p in d.models.trainable.named_parameters()}
    disc_before = {n: p.detach().clone() for n, p in d.disc.named_parameters()}
    views = d.views(next(iter(d.data.loader)), step=0)
    d.student_step(views)
    assert all(p.grad is None for p in d.disc.parameters())  # frozen for the student's pass
    assert all(torch.equal(p, disc_before[n]) for n, p in d.disc.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert not d.bank.embeddings.requires_grad and d.bank.embeddings.grad is None
    changed = {n for n, p in d.models.trainable.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("student.backbone.") for n in changed) and any(
        n.startswith("student.head.") for n in changed
    )
    assert any(n.startswith("loss.pca.") for n in changed) and any(n.startswith("loss.gl.") for n in changed)
    d.disc_step(views, d.student(views.student).detach())
    assert not all(torch.equal(p, disc_before[n]) for n, p in d.disc.named_parameters())  # then it learns on its own


def test_weight_decay_spares_every_bias_and_norm_weight():
    from retrofit_agent.train.config import LossConfig, ProjectorConfig
    from retrofit_agent.train.losses import DistillLoss, SpatialShape
    from retrofit_agent.train.projectors import Discriminator
    from retrofit_agent.train.setup import param_groups
    from retrofit_agent.train.student import Student

    student = Student("test_efficientnet", embed_dim=16, hidden_dim=32, input_size=32)
    loss = DistillLoss(LossConfig(pca_attention=1, gl=1), ProjectorConfig(), SpatialShape(8, 8, 2, (4, 4), 1), 1.0)
    model = torch.nn.ModuleDict({"student": student, "loss": loss, "disc": Discriminator(16, 8)})
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "loss.gl.0.bias" in spared and model.get_parameter("loss.gl.0.bias").ndim == 2  # a 2-d bias is still a bias
    assert all(n.endswith("bias") or ".bn" in n or "norm" in n for n in spared), sorted(spared)
    assert not any(n.endswith("bias") for n in decayed)
    assert any(".bn1.weight" in n for n in spared)  # BatchNorm weights
    assert (
        "loss.gl.0.weight" in decayed
        and "student.head.net.0.weight" in decayed
        and "loss.pca.0.qkv.0.weight" in decayed
    )
    assert len(spared) + len(decayed) == len(names)


def test_teacher_with_qk_norm_or_an_old_open_clip_exits_2_with_one_line(
    tmp_path: Path, images: Path, capsys, monkeypatch, fresh_logging
):
    import open_clip

    from retrofit_agent.train.cli import main

    configs = tmp_path / "configs"
    configs.mkdir()
    cfg = json.loads((REPO / "retrofit_agent" / "train" / "model_configs" / "retrofit-micro-clip.json").read_text())
    cfg["vision_cfg"]["qk_norm"] = True
    (configs / "qknorm-micro-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(configs)
    args = [
        "distill",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--max-steps",
        "1",
        "--set",
        f'data.train=["{images}"]',
        "--set",
        "teacher.model=qknorm-micro-clip",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "uses QK-norm" in err.strip().splitlines()[-1] and "Traceback" not in err
    monkeypatch.setattr(open_clip, "__version__", "2.24.0")
    assert main(args[:-2]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "open_clip_torch 2.24.0 is older than 2.26" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("cached", [False, True], ids=["live teacher", "teacher cache"])
def test_the_dense_term_is_logged_and_falls_with_training(tmp_path: Path, images: Path, cached: bool):
    """The student's cells learn the teacher's per-patch embeddings, with the live teacher and from the cache."""
    from retrofit_agent.train.engine import Distiller

    cfg = tiny_config(
        tmp_path / "run",
        [str(images)],
        student={"input_size": 96},  # a 3x3 grid of cells (32 px would give one)
        loss={"pca_attention": 0.0, "pca_value": 0.0, "gl": 0.0, "adversarial": 0.0, "affinity": 0.0, "dense": 1.0},
        data={"max_images": 64, "holdout": 8, "batch_size": 16},
        augment={"p_mask": 0.0},
        cache={"enabled": cached, "views": 2},
        optim={"max_steps": 40, "warmup_steps": 5},
        run={"log_every": 5, "eval_every": 1000, "checkpoint_every": 1000},
    )
    summary = Distiller(cfg).fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dense = [m["loss_dense"] for m in lines if m.get("kind") == "train"]
    assert len(dense) == 8
    assert dense[-1] < 0.7 * dense[0], dense
    # held out, on clean views: the cells move towards the teacher's patches, past a constant
    first, last = summary["initial"], summary["final"]
    print(
        f"\n[dense] held-out cell cosine {first['heldout_cell_cosine']:.3f} -> {last['heldout_cell_cosine']:.3f} "
        f"(constant {last['heldout_cell_cosine_constant_baseline']:.3f}); centred "
        f"{first['heldout_cell_centred_cosine']:.3f} -> {last['heldout_cell_centred_cosine']:.3f}"
    )
    assert last["heldout_cell_cosine"] > first["heldout_cell_cosine"] + 0.2
    assert last["heldout_cell_cosine"] > last["heldout_cell_cosine_constant_baseline"]
    assert last["heldout_cell_centred_cosine"] > first["heldout_cell_centred_cosine"] + 0.2


def test_a_second_phase_starts_from_the_first_phases_student_at_another_size(tmp_path: Path, images: Path):
    """student.initial_checkpoint: the held-out figures the second phase starts from are the
    first phase's own (same weights, same held-out pictures), at the new input size too; a
    student of another architecture is refused with one line."""
    from retrofit_agent.train.engine import Distiller

    common = {
        "loss": {"pca_attention": 0.0, "pca_value": 0.0, "gl": 0.0, "adversarial": 0.0, "affinity": 0.0},
        "data": {"max_images": 48, "holdout": 8, "batch_size": 8},
        "optim": {"max_steps": 6, "warmup_steps": 1},
        "run": {"log_every": 3, "eval_every": 1000, "checkpoint_every": 1000},
    }
    first = Distiller(tiny_config(tmp_path / "first", [str(images)], student={"input_size": 64}, **common)).fit()
    student_pt = tmp_path / "first" / "student.pt"
    again = tiny_config(
        tmp_path / "again", [str(images)], student={"input_size": 64, "initial_checkpoint": str(student_pt)}, **common
    )
    second = Distiller(again).fit()
    assert second["initial"]["heldout_cosine"] == pytest.approx(first["final"]["heldout_cosine"], abs=1e-5)
    bigger = tiny_config(
        tmp_path / "bigger", [str(images)], student={"input_size": 96, "initial_checkpoint": str(student_pt)}, **common
    )
    big = Distiller(bigger)
    assert big.student.input_size == (96, 96)
    saved = torch.load(student_pt, weights_only=True)["student"]
    assert all(torch.equal(v, big.student.state_dict()[k]) for k, v in saved.items() if k.startswith("backbone."))
    with pytest.raises(ConfigError, match=r"student.initial_checkpoint: .* has hidden_dim 128 \(this run: 64\)"):
        Distiller(
            tiny_config(
                tmp_path / "other",
                [str(images)],
                student={"hidden_dim": 64, "initial_checkpoint": str(student_pt)},
                **common,
            )
        )
    with pytest.raises(ConfigError, match="student.initial_checkpoint: no such file"):
        tiny_config(tmp_path / "x", [str(images)], student={"initial_checkpoint": str(tmp_path / "none.pt")})
