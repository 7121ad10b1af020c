"""``retrofit-model teacher-train``: train (or evaluate) a world CLIP teacher.

    retrofit-model teacher-train --config models/configs/world-teacher.toml --out runs/teacher
    retrofit-model teacher-train --config ... --out runs/teacher --resume       # continue a killed run
    retrofit-model teacher-train --config ... --out runs/teacher --eval-only    # held-out zero-shot report

Then distil from it: ``teacher.model = "retrofit-world-clip-rn"`` and
``teacher.pretrained = "runs/teacher/checkpoint.pt"`` (loss.pca_attention, loss.pca_value and
loss.gl at 0: they read a ViT's attention blocks), and build its bank with
``retrofit-model prompts --teacher retrofit-world-clip-rn --pretrained runs/teacher/checkpoint.pt``.

The config, the model config's presence and the prompts file are checked before torch is
imported; each problem is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrofit_agent.contract.errors import ConfigError


def _arguments(p: argparse.ArgumentParser) -> None:
    from retrofit_agent.train.cli import add_config_arguments

    add_config_arguments(
        p,
        "TOML config (see models/configs/world-teacher.toml); defaults are that recipe",
        "--set optim.lr=5e-4 --set data.twins=0.25",
    )
    p.add_argument("--out", dest="run.out_dir", metavar="DIR", help="run directory (run.out_dir)")
    p.add_argument("--steps", dest="optim.steps", type=int, metavar="N", help="optim.steps")
    p.add_argument(
        "--threads", dest="run.threads", type=int, metavar="N", help="run.threads (torch threads; default 1)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint (starts one if none)"
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="score --checkpoint (default OUT/checkpoint.pt) on held-out scenes and exit",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate with --eval-only")
    p.add_argument("--scenes", type=int, metavar="N", help="held-out scenes for --eval-only (eval.scenes)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from retrofit_agent.train.cli import overrides_from_args

    tree = overrides_from_args(args)
    if args.scenes is not None:
        tree.setdefault("eval", {})["scenes"] = args.scenes
    return tree


def check_model_config(name: str) -> None:
    """The model must be one of the repo's open_clip configs, built by open_clip's own image towers.

    A ViT (``layers`` a number) feeds every distillation loss; a ResNet (``layers`` a list)
    learns the world far faster on a CPU but feeds only the embedding and affinity losses
    (the PCA and GL projectors read a ViT's attention blocks).
    """
    from retrofit_agent.train.teacher_train.config import MODEL_CONFIG_DIR as CONFIG_DIR

    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"model.name: no open_clip config {name!r} in {CONFIG_DIR} (there: {known})")
    try:
        vision = json.loads(path.read_text(encoding="utf-8"))["vision_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.name: {path} is not an open_clip model config with a vision_cfg ({e})") from None
    if "timm_model_name" in vision or "layers" not in vision:
        raise ConfigError(
            f"model.name: {name!r} is not built by open_clip's own image towers (a ViT, or a ResNet with a list of "
            "layers); teacher-train trains those only"
        )


def _run(args: argparse.Namespace) -> int:
    from retrofit_agent.train.teacher_train.config import dump, load_teacher_train_config
    from retrofit_agent.train.world.labels import WorldError, load_label_space

    cfg = load_teacher_train_config(args.config, _overrides(args))
    if args.print_config:
        sys.stdout.write(dump(cfg) + "\n")
        return 0
    check_model_config(cfg.model.name)
    try:
        load_label_space(cfg.data.prompts_file)
    except WorldError as e:
        raise ConfigError(f"data.prompts_file: {e}") from None
    if args.checkpoint is not None and not args.eval_only:
        raise ConfigError("--checkpoint goes with --eval-only (training writes OUT/checkpoint.pt)")
    # Heavy imports only now: a bad config above fails in a fraction of a second.
    import torch

    # run.threads is this run's, not the process's: the chain calls commands in-process, and a
    # teacher stage left at 1 thread once made the distillation after it run on one core of two.
    # Training and --eval-only both set it (evaluate_checkpoint does), so both give it back.
    threads = torch.get_num_threads()
    try:
        return _eval_only(cfg, args.checkpoint) if args.eval_only else _train(cfg, args.resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Any, resume: bool) -> int:
    from retrofit_agent.train.teacher_train.trainer import TeacherTrainer, evaluate_checkpoint
    from retrofit_agent.train.teacher_train.zeroshot_eval import report_table

    summary = TeacherTrainer(cfg, resume=resume).fit()
    done = cfg.run.out_dir / "eval.json"
    report = json.loads(done.read_text()) if done.is_file() else {}
    # A finished run resumed again (the chain does, session after session) keeps its report:
    # the same weights on the same held-out scenes give the same figures.
    if (report.get("step"), report.get("scenes")) != (summary["step"], cfg.eval.scenes):
        report = evaluate_checkpoint(cfg, Path(summary["checkpoint"]))
        done.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(summary) + "\n" + report_table(report) + "\n")
    return 0


def _eval_only(cfg: Any, checkpoint: Path | None) -> int:
    path = checkpoint or cfg.run.out_dir / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"--eval-only: no checkpoint at {path} (train first, or give --checkpoint)")
    from retrofit_agent.train.teacher_train.trainer import evaluate_checkpoint
    from retrofit_agent.train.teacher_train.zeroshot_eval import report_table

    report = evaluate_checkpoint(cfg, path)
    out = path.parent / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(report_table(report) + f"\nreport: {out}\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teacher-train",
        help="train a CLIP teacher from scratch on the procedural world (CPU), or evaluate one",
        description="Contrastive training of an open_clip model on world captions; held-out zero-shot "
        "top-1 and AUROC per group with the prompts file's bank.",
    )
    _arguments(p)
    p.set_defaults(func=_run)
