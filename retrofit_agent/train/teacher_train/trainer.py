"""Contrastive training of an open_clip model from scratch on world captions, on the CPU.

open_clip's own pieces: ``open_clip.create_model`` builds the model from its config,
``open_clip.get_tokenizer`` tokenises, ``open_clip.loss.ClipLoss`` is the loss; the loop is
open_clip_train's, made compact: AdamW without decay on gains, biases and the logit scale,
linear warm-up then cosine, global gradient-norm clipping, and the learnable logit scale
clamped to ln(100) after every step.

Run directory::

    config.json       the resolved config (a resumed run must match it)
    checkpoint.pt     open_clip format ({"name", "step", "state_dict"}): loads through
                      open_clip.create_model_and_transforms(name, pretrained=<this file>)
    train_state.pt    everything to resume exactly: weights, optimiser, step, RNG, totals
    log.jsonl         one line per log_every steps (loss, lr, logit scale, images/s, CPU
                      seconds) and one per evaluation (top-1 per group)
    eval.json         the final held-out zero-shot report (also ``--eval-only``)

Both checkpoint files are written to a temporary name and renamed, so a run killed at any
moment resumes from its last complete save.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import structlog
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.prompts import load_prompts
from retrofit_agent.train.teacher import register_local_configs, teacher_view
from retrofit_agent.train.teacher_train.config import TeacherTrainConfig
from retrofit_agent.train.teacher_train.stream import HeldOut, WorldBatches, held_out
from retrofit_agent.train.teacher_train.zeroshot_eval import LiveText, embed_images, top1_by_group, zero_shot_report
from retrofit_agent.train.world import LabelSpace, load_label_space

log = structlog.get_logger("retrofit_agent.train.teacher_train")

CHECKPOINT = "checkpoint.pt"
TRAIN_STATE = "train_state.pt"
LOG = "log.jsonl"
CONFIG = "config.json"
MAX_LOGIT_SCALE = math.log(100)  # open_clip_train clamps here (the CLIP paper's 100)


@dataclass
class Totals:
    """What a run has spent so far, carried across resumes."""

    step: int = 0
    samples: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # training process + render workers


def lr_at(step: int, cfg: TeacherTrainConfig) -> float:
    """Linear warm-up to ``optim.lr``, then cosine to ``optim.lr * optim.min_lr_ratio`` at
    ``optim.schedule_steps`` (default: ``optim.steps``)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, (o.schedule_steps or o.steps) - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + 0.5 * (o.lr - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip_train's split: no decay on 1-d parameters (gains, biases), norms and the logit scale."""

    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


class LabelHead(torch.nn.Module):
    """A linear read-out of the image embedding, one softmax per label group, trained beside
    the contrastive loss (``[labels] weight``).

    Contrastive training can settle where a small object's features are absent from the image
    embedding and its words are merged in the text tower (the world teacher's first phase:
    "a bus" and "a truck" encode to cosine 1.000, and the image side cannot tell a minimal pair
    apart), and there neither side's gradient is larger than the other's difference. The
    world's ground truth moves the image side off that point; the contrastive loss then has a
    difference to align the text with. The head reads the unit embedding the bank is scored
    against, so whatever it teaches is in the space zero-shot uses; it is not saved in
    checkpoint.pt (open_clip's format), only in train_state.pt.
    """

    def __init__(self, dim: int, groups: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.groups = groups
        self.linear = torch.nn.Linear(dim, sum(len(v) for v in groups.values()))
        self.scale = 10.0  # unit embeddings: logits of a usable range from the start

    @classmethod
    def build(cls, cfg: TeacherTrainConfig, space: LabelSpace, model: torch.nn.Module) -> LabelHead:
        names = cfg.labels.groups or tuple(space.groups)
        return cls(int(model.visual.output_dim), {g: space.groups[g] for g in names if g in space.groups})

    def loss(self, image_features: torch.Tensor, labels: list[dict[str, str | None]]) -> torch.Tensor:
        """Mean over groups of the cross-entropy over pictures whose truth for the group is known."""
        logits = self.linear(image_features * self.scale)
        out, start, n = image_features.new_zeros(()), 0, 0
        for group, names in self.groups.items():
            target = torch.tensor([names.index(t[group]) if t.get(group) in names else -100 for t in labels])
            if (target >= 0).any():
                out = out + torch.nn.functional.cross_entropy(logits[:, start : start + len(names)], target)
                n += 1
            start += len(names)
        return out / max(1, n)


def build_model(name: str, seed: int) -> torch.nn.Module:
    register_local_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(name)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class TeacherTrainer:
    """One run: ``fit()`` trains (or resumes) to ``optim.steps`` and returns the summary."""

    def __init__(self, cfg: TeacherTrainConfig, resume: bool = False) -> None:
        self.cfg, self.out = cfg, Path(cfg.run.out_dir)
        torch.set_num_threads(cfg.run.threads)
        self.space: LabelSpace = load_label_space(cfg.data.prompts_file)
        self.prompts = load_prompts(cfg.data.prompts_file)
        self.model = build_model(cfg.model.name, cfg.run.seed)
        self.tokenizer = open_clip.get_tokenizer(cfg.model.name)
        self.spec = teacher_view(self.model)
        self.label_head = LabelHead.build(cfg, self.space, self.model) if cfg.labels.weight > 0 else None
        trainable = torch.nn.ModuleList([self.model] + ([self.label_head] if self.label_head is not None else []))
        self.optimizer = torch.optim.AdamW(
            param_groups(trainable, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
        )
        self.loss = ClipLoss()
        self.totals = Totals()
        self._quick: HeldOut | None = None
        self.out.mkdir(parents=True, exist_ok=True)
        self._start(resume)

    # ----------------------------------------------------------------- state

    def _start(self, resume: bool) -> None:
        state_path = self.out / TRAIN_STATE
        if state_path.exists() and not resume:
            raise ConfigError(
                f"{self.out} already holds a run ({TRAIN_STATE}); pass --resume to continue it or choose another --out"
            )
        (self.out / CONFIG).write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2) + "\n")
        if not state_path.exists():
            (self.out / LOG).write_text("")
            if self.cfg.model.init_from is not None:
                self._init_from(self.cfg.model.init_from)
            log.info("teacher_train_started", out=str(self.out), model=self.cfg.model.name, steps=self.cfg.optim.steps)
            return
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        mine, theirs = self._comparable(self.cfg.fingerprint()), self._comparable(state["fingerprint"])
        if self.cfg.optim.schedule_steps is None:  # extending the run: its cosine tail follows the new steps
            mine.pop("optim.schedule_steps"), theirs.pop("optim.schedule_steps")
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(
                f"--resume: the config differs from the run in {self.out} in {', '.join(diff)} "
                "(resume with the same settings, or start a new --out)"
            )
        self.model.load_state_dict(state["model"])
        if self.label_head is not None:
            self.label_head.load_state_dict(state["label_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.totals = Totals(**state["totals"])
        self._truncate_log(self.totals.step)
        log.info("teacher_train_resumed", out=str(self.out), step=self.totals.step, steps=self.cfg.optim.steps)

    def _init_from(self, path: Path) -> None:
        """Load another run's weights (open_clip's checkpoint format) before the first step."""
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise ConfigError(f"model.init_from: cannot read {str(path)!r}: {e}") from None
        state = ck.get("state_dict", ck) if isinstance(ck, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"model.init_from: {str(path)!r} holds no state_dict")
        if isinstance(ck, dict) and ck.get("name") not in (None, self.cfg.model.name):
            raise ConfigError(f"model.init_from: {str(path)!r} is a {ck['name']} checkpoint, not {self.cfg.model.name}")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"model.init_from: {str(path)!r} does not fit {self.cfg.model.name}: {first}") from None
        log.info("teacher_init_from", path=str(path), step=ck.get("step") if isinstance(ck, dict) else None)

    @classmethod
    def _comparable(cls, fp: dict[str, Any]) -> dict[str, Any]:
        """Flatten, leaving out optim.steps: a run may be extended (its cosine tail then changes).

        Settings added to the config after a run started are absent from its stored
        fingerprint; they count as their defaults, which is what that run trained with."""
        flat: dict[str, Any] = {}
        defaults = TeacherTrainConfig().fingerprint()
        for section, values in defaults.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items()})
        for section, values in fp.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                flat[section] = values
        # The schedule's length: schedule_steps, or else steps, which may change between resumes.
        steps = flat.pop("optim.steps", None)
        flat["optim.schedule_steps"] = flat.get("optim.schedule_steps") or steps
        return flat

    def _truncate_log(self, step: int) -> None:
        """Drop log lines a killed run wrote after its last checkpoint: they will be written again."""
        path = self.out / LOG
        if not path.exists():
            return
        keep = [
            line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in keep))

    def save(self) -> None:
        name = self.cfg.model.name
        _atomic_save(
            {"name": name, "step": self.totals.step, "state_dict": self.model.state_dict()}, self.out / CHECKPOINT
        )
        _atomic_save(
            {
                "model": self.model.state_dict(),
                "label_head": self.label_head.state_dict() if self.label_head is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "rng": _rng_state(),
                "totals": asdict(self.totals),
                "fingerprint": self.cfg.fingerprint(),
            },
            self.out / TRAIN_STATE,
        )
        log.info("teacher_checkpoint_saved", step=self.totals.step, path=str(self.out / CHECKPOINT))

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- loop

    def _loader(self) -> DataLoader:
        o, d = self.cfg.optim, self.cfg.data
        batches = WorldBatches(d, self.space, self.spec, self.tokenizer, o.batch_size, (self.totals.step, o.steps))
        # Spawned, not forked: a child forked after OpenCV's or OpenMP's thread pools ran in this
        # process can deadlock on their copied locks (cv2.setNumThreads hung so in a worker).
        return DataLoader(
            batches,
            batch_size=None,
            num_workers=d.workers,
            prefetch_factor=2 if d.workers else None,
            multiprocessing_context="spawn" if d.workers else None,
        )

    def step(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        lr: float,
        labels: list[dict[str, str | None]] | None = None,
    ) -> dict[str, float]:
        """One optimiser step; returns the loss parts (ClipLoss's contrastive loss, and the label
        head's cross-entropy when ``labels.weight`` > 0) as floats."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        parts: dict[str, torch.Tensor] = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.optim.precision == "amp_bf16"):
            image_features, text_features, logit_scale = self.model(images, tokens)[:3]
            parts["contrastive"] = self.loss(image_features, text_features, logit_scale)
        if self.label_head is not None and labels is not None:
            parts["labels"] = self.label_head.loss(image_features.float(), labels)
        loss = parts["contrastive"] + self.cfg.labels.weight * parts.get("labels", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.clip_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad_norm, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {name: float(value.detach()) for name, value in parts.items()}

    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.totals
        self.model.train()
        last_save = time.monotonic()
        window = {"t": time.monotonic(), "samples": 0, "loss": 0.0, "labels": 0.0, "n": 0}
        session_wall0, session_cpu0, session_render = time.monotonic(), time.process_time(), 0.0
        base_wall, base_cpu = t.wall_s, t.cpu_s
        workers = cfg.data.workers > 0
        for batch in self._loader():
            lr = lr_at(t.step, cfg)
            parts = self.step(batch["images"], batch["tokens"], lr, batch["labels"])
            t.step += 1
            t.samples += len(batch["images"])
            render = float(batch["render_cpu_s"]) if workers else 0.0  # in-process renders are already in process_time
            session_render += render
            t.wall_s = base_wall + time.monotonic() - session_wall0
            t.cpu_s = base_cpu + time.process_time() - session_cpu0 + session_render
            window["samples"] += len(batch["images"])
            window["loss"] += parts["contrastive"]
            window["labels"] += parts.get("labels", 0.0)
            window["n"] += 1
            if t.step % cfg.run.log_every == 0 or t.step == cfg.optim.steps:
                now = time.monotonic()
                record = {
                    "step": t.step,
                    "samples": t.samples,
                    "loss": round(window["loss"] / window["n"], 5),
                    **(
                        {"loss_labels": round(window["labels"] / window["n"], 5)} if self.label_head is not None else {}
                    ),
                    "lr": lr,
                    "logit_scale": round(float(self.model.logit_scale.detach().exp()), 3),
                    "img_per_s": round(window["samples"] / max(1e-9, now - window["t"]), 2),
                    "wall_s": round(t.wall_s, 1),
                    "cpu_s": round(t.cpu_s, 1),
                }
                self._log(record)
                log.info("teacher_train_step", **record)
                window = {"t": now, "samples": 0, "loss": 0.0, "labels": 0.0, "n": 0}
            if cfg.eval.every and t.step % cfg.eval.every == 0 and t.step < cfg.optim.steps:
                self._quick_eval()
            if time.monotonic() - last_save >= cfg.run.checkpoint_every_s or t.step == cfg.optim.steps:
                self.save()
                last_save = time.monotonic()
        return {
            "step": t.step,
            "samples": t.samples,
            "wall_s": round(t.wall_s, 1),
            "cpu_s": round(t.cpu_s, 1),
            "checkpoint": str(self.out / CHECKPOINT),
        }

    def _quick_eval(self) -> None:
        """Top-1 per group on eval.quick_scenes held-out scenes with the live model (the learning curve)."""
        if self._quick is None:
            self._quick = held_out(self.cfg.eval, self.space, self.spec, self.cfg.eval.quick_scenes)
        self.model.eval()
        try:
            emb = embed_images(self.model.encode_image, self._quick.images)
            report = zero_shot_report(
                emb,
                LiveText(self.model, self.tokenizer),
                float(self.model.logit_scale.detach().exp()),
                self.prompts,
                self._quick,
            )
        finally:
            self.model.train()
        record = {
            "step": self.totals.step,
            "eval_scenes": len(self._quick.labels),
            "top1": top1_by_group(report),
            "mean_top1": round(report["mean_top1"], 4),
            "min_top1": round(report["min_top1"], 4),
        }
        self._log(record)
        log.info("teacher_quick_eval", **record)


def evaluate_checkpoint(cfg: TeacherTrainConfig, checkpoint: Path, scenes: int | None = None) -> dict[str, Any]:
    """Load ``checkpoint`` the way distillation does (``Teacher(name, pretrained=path)``) and score held-out scenes."""
    from retrofit_agent.train.teacher import Teacher

    torch.set_num_threads(cfg.run.threads)
    teacher = Teacher(cfg.model.name, pretrained=str(checkpoint))
    space = load_label_space(cfg.data.prompts_file)
    held = held_out(cfg.eval, space, teacher.input_spec(), scenes or cfg.eval.scenes)
    emb = embed_images(teacher.model.encode_image, held.images)
    report = zero_shot_report(emb, teacher, teacher.logit_scale, load_prompts(cfg.data.prompts_file), held)
    step = torch.load(checkpoint, map_location="cpu", weights_only=False).get("step")
    report.update(
        {
            "checkpoint": str(checkpoint),
            "step": step,
            "model": cfg.model.name,
            "eval_world_seed": cfg.eval.world_seed,
            "render_size": cfg.eval.render_size,
        }
    )
    return report
