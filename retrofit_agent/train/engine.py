"""The distillation loop: teacher → student, with checkpoints, metrics and DDP.

:class:`Distiller` wires config sections into components (models, data, optimisers) and
runs steps. One step: augment the student's view, get the teacher's target (live, or from
the embedding cache), compute the loss parts under autocast, clip, step AdamW and the
warm-up + cosine schedule, then train the discriminator. Metrics go to
``<out>/metrics.jsonl`` (one JSON object per logged step).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import structlog
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.prompts import load_prompts
from retrofit_agent.train.augment import Augmenter, step_generator
from retrofit_agent.train.cache import TeacherCache, build_cache
from retrofit_agent.train.checkpoint import find_resume, load_checkpoint, save_checkpoint, set_rng_state
from retrofit_agent.train.config import DistillConfig
from retrofit_agent.train.data import DistillDataset, EpochBatchSampler, ImageRef, collate, index_sources, split_holdout
from retrofit_agent.train.distributed import DistEnv, average_gradients, barrier, mean_across, sync_buffers
from retrofit_agent.train.export import student_input_spec
from retrofit_agent.train.losses import DistillLoss, StudentOutput
from retrofit_agent.train.projectors import Discriminator, discriminator_loss, ramp
from retrofit_agent.train.student import Student
from retrofit_agent.train.teacher import Teacher

log = structlog.get_logger("retrofit_agent.train")
STUDENT_FILE = "student.pt"


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available")
    return torch.device(f"cuda:{env.local_rank}" if name == "cuda" else name)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: fp32, no autocast
    scaler: bool  # fp16 needs loss scaling; bf16 does not

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"  # CPU bf16 autocast is only faster on CPUs with AMX/AVX512-BF16: opt in
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("run.precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
    return Precision({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name], name == "fp16")


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and other 1-d parameters (timm's convention)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_bank(teacher: Teacher, cfg: DistillConfig) -> torch.Tensor | None:
    """Text embeddings from the teacher's text tower: one row per label (ensemble mean) or text."""
    from retrofit_agent.train.bank import encode_prompt_set

    rows = []
    if cfg.bank.prompts_file is not None:
        emb, _, _ = encode_prompt_set(teacher, load_prompts(cfg.bank.prompts_file))
        rows.append(torch.from_numpy(emb))
    if cfg.bank.texts:
        rows.append(teacher.encode_text(list(cfg.bank.texts)).cpu())
    return torch.cat(rows).to(teacher.device) if rows else None


class Trainable(nn.Module):
    """What DDP wraps: the student and the training-only projectors inside the loss."""

    def __init__(self, student: Student, loss: DistillLoss, feature_index: int) -> None:
        super().__init__()
        self.student, self.loss, self.feature_index = student, loss, feature_index

    def forward(self, x: torch.Tensor, target: Any, bank: torch.Tensor | None, disc: nn.Module | None,
                adv_weight: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(loss parts, student embeddings) for one batch of views."""
        if self.loss.pca is not None or self.loss.gl is not None:
            out = StudentOutput(*self.student.forward_with_features(x, self.feature_index))
        else:
            out = StudentOutput(self.student(x))
        return self.loss(out, target, bank, disc, adv_weight), out.embedding


@dataclass
class RunState:
    step: int = 0
    skipped: set[str] = field(default_factory=set)
    initial_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    images_per_s: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the loop


class Distiller:
    """Build with a validated config and a :class:`DistEnv`, then :meth:`fit`."""

    def __init__(self, cfg: DistillConfig, env: DistEnv = DistEnv()) -> None:
        self.cfg, self.env = cfg, env
        self.out = cfg.run.out_dir
        self.device = resolve_device(cfg.run.device, env)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.state = RunState()
        self._build_models()
        self._build_data()
        self._build_optim()

    # ---- construction

    def _build_models(self) -> None:
        c = self.cfg
        try:
            self.teacher = Teacher(c.teacher.model, c.teacher.pretrained, c.teacher.seed).to(self.device)
        except (RuntimeError, OSError, ValueError) as e:  # unknown name, missing/corrupt checkpoint, no network
            raise ConfigError(f"teacher: cannot load {c.teacher.model!r} (pretrained={c.teacher.pretrained!r}): {e}") from None
        # Same seed on every rank for init (DDP also broadcasts rank 0's weights).
        torch.manual_seed(c.run.seed)
        try:
            self.student = Student(c.student.backbone, self.teacher.embed_dim, c.student.hidden_dim, c.student.pretrained,
                                   c.student.drop_rate, c.student.input_size)
        except (RuntimeError, OSError, ValueError) as e:
            raise ConfigError(f"student: cannot create timm model {c.student.backbone!r}: {e}") from None
        self.student.set_grad_checkpointing(c.student.grad_checkpointing)
        channels = self.student.feature_channels(c.student.feature_index)
        width, heads, grid = (self.teacher.width, self.teacher.num_heads, self.teacher.grid_size) if c.loss.needs_teacher_tokens else (1, 1, (1, 1))
        self.loss = DistillLoss(c, channels, width, heads, grid, 1 / self.teacher.logit_scale)
        self.trainable = Trainable(self.student, self.loss, c.student.feature_index).to(self.device)
        self.disc = Discriminator(self.teacher.embed_dim, c.discriminator.hidden_dim).to(self.device) if c.loss.adversarial > 0 else None
        self.model: nn.Module = self.trainable
        if self.env.enabled:
            if c.student.sync_batchnorm:
                self.trainable = nn.SyncBatchNorm.convert_sync_batchnorm(self.trainable)
                self.student = self.trainable.student
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.trainable, device_ids=ids)
        self.bank = build_bank(self.teacher, c)
        self.augment = Augmenter(c.augment, self.student.mean, self.student.std)
        torch.manual_seed(c.run.seed * 1000 + self.env.rank)  # per-rank dropout/substitution streams

    def _build_data(self) -> None:
        c = self.cfg
        refs = index_sources(c.data.train)
        if c.data.max_images:
            refs = refs[: c.data.max_images]
        if c.data.val:
            self.train_refs, self.val_refs = refs, index_sources(c.data.val)
        else:
            self.train_refs, self.val_refs = split_holdout(refs, c.data.holdout, c.run.seed)
        self.steps_per_epoch = EpochBatchSampler.batches_per_epoch(len(self.train_refs), c.data.batch_size, self.env.world)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data: {len(self.train_refs)} training images are fewer than one batch "
                f"({c.data.batch_size} x {self.env.world} processes); add images or lower data.batch_size"
            )
        self.total_steps = c.optim.max_steps or max(1, round(c.optim.epochs * self.steps_per_epoch))
        self.cache: TeacherCache | None = None
        if c.cache.enabled:
            self._prepare_cache()
        student_spec = student_input_spec(self.student)
        teacher_spec = None if self.cache else self.teacher.input_spec()
        self.sampler = EpochBatchSampler(len(self.train_refs), c.data.batch_size, c.run.seed, 0, self.env.rank, self.env.world)
        self.loader = DataLoader(
            DistillDataset(self.train_refs, student_spec, teacher_spec), batch_sampler=self.sampler,
            num_workers=c.data.workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
            persistent_workers=c.data.workers > 0,
            # Its own generator: by default each new iterator draws a worker seed from the
            # global RNG, which would shift dropout/substitution draws after a resume.
            generator=torch.Generator().manual_seed(c.run.seed + self.env.rank),
        )
        self.val_set = DistillDataset(self.val_refs, student_spec, self.teacher.input_spec())
        log.info("data_ready", train_images=len(self.train_refs), heldout_images=len(self.val_refs),
                 steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps, rank=self.env.rank)

    def _prepare_cache(self) -> None:
        c = self.cfg
        t0 = time.monotonic()
        stats = build_cache(c.cache_dir, self.teacher, self.train_refs, c.cache.shard_size, c.cache.batch_size, self.env, c.data.workers)
        self.cache = TeacherCache(c.cache_dir, self.teacher, self.train_refs)
        self.state.skipped.update(stats["skipped"])  # logged by the cache builder already
        log.info("teacher_cache_ready", dir=str(c.cache_dir), built_images=stats["built_images"],
                 seconds=round(time.monotonic() - t0, 2), teacher_images_per_s=self.cache.teacher_images_per_s)

    def _build_optim(self) -> None:
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.trainable, o.weight_decay), lr=o.lr, betas=o.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(o.warmup_steps, self.total_steps, o.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaler)
        self.disc_optimizer = (
            torch.optim.AdamW(self.disc.parameters(), lr=self.cfg.discriminator.lr, betas=(0.5, 0.999))
            if self.disc is not None else None
        )

    # ---- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.state.step, "world": self.env.world, "config": self.cfg.model_dump(mode="json"),
            "student": self.student.state_dict(), "projectors": self.loss.state_dict(),
            "discriminator": self.disc.state_dict() if self.disc else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer else None,
            "skipped": sorted(self.state.skipped), "initial_eval": self.state.initial_eval,
            "teacher": self.teacher.identity, "fingerprint": self.teacher.fingerprint(),
        }

    def save(self) -> Path:
        return save_checkpoint(self.out / "checkpoints", self.state.step, self._state(), self.env, self.cfg.run.keep_checkpoints)

    def resume(self) -> bool:
        path = find_resume(self.cfg.run.resume, self.out / "checkpoints")
        if path is None:
            return False
        state, rng = load_checkpoint(path, self.env)
        if state["fingerprint"] != self.teacher.fingerprint():
            raise ConfigError(f"checkpoint {path} was trained against another teacher ({state['teacher']})")
        self.student.load_state_dict(state["student"])
        self.loss.load_state_dict(state["projectors"])
        if self.disc is not None and state["discriminator"] is not None:
            self.disc.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state.step = state["step"]
        self.state.skipped.update(state["skipped"])
        self.state.initial_eval = state["initial_eval"]
        if rng is not None:
            set_rng_state(rng)
        log.info("resumed", checkpoint=str(path), step=self.state.step, exact=rng is not None)
        return True

    # ---- steps

    def _batches(self) -> Iterator[dict]:
        """Batches from the current step on, across epochs."""
        while True:
            epoch, start = divmod(self.state.step, self.steps_per_epoch)
            self.sampler.epoch, self.sampler.start = epoch, start
            yield from self.loader

    def _target(self, batch: dict) -> tuple[Any, torch.Tensor]:
        """The teacher's target for the batch and a mask of usable rows."""
        index = batch["index"]
        if self.cache is not None:
            emb, ok = self.cache.lookup(index)
            return emb.to(self.device), ok
        x = batch["teacher"].to(self.device, non_blocking=True)
        with self.precision.autocast(self.device):
            if self.cfg.loss.needs_teacher_tokens:
                return self.teacher.forward_features(x, self.cfg.teacher.layer), torch.ones(len(index), dtype=torch.bool)
            return self.teacher.encode_image(x), torch.ones(len(index), dtype=torch.bool)

    def _views(self, batch: dict, target: Any) -> tuple[torch.Tensor, Any]:
        """Augmented student views (``augment.views`` per image) and the matching targets."""
        x = batch["student"].to(self.device, non_blocking=True)
        v = self.cfg.augment.views
        if v > 1:
            x = x.repeat(v, 1, 1, 1)
            target = _repeat(target, v)
        x = self.augment(x, step_generator(self.cfg.run.seed, self.state.step, self.env.rank))
        return x, target

    def adversarial_weight(self) -> float:
        epoch = self.state.step / self.steps_per_epoch
        return ramp(self.cfg.loss.adversarial, epoch, self.cfg.discriminator.ramp_epochs)

    def train_step(self, batch: dict) -> dict[str, float]:
        self.trainable.train()
        target, ok = self._target(batch)
        if not bool(ok.all()):  # cache rows of images the teacher could not read
            batch = {**batch, "student": batch["student"][ok], "index": batch["index"][ok]}
            target = _select(target, ok.to(self.device))
        x, target = self._views(batch, target)
        adv_w = self.adversarial_weight()
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the student's pass must not train the discriminator
        with self.precision.autocast(self.device):
            parts, s_emb = self.model(x, target, self.bank, self.disc, adv_w)
        self.scaler.scale(parts["total"]).backward()
        if self.cfg.optim.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {f"loss_{k}" if k != "total" else "loss": float(v.detach()) for k, v in parts.items()}
        if self.disc is not None:
            out["loss_discriminator"] = self._disc_step(target, s_emb)
            out["adversarial_weight"] = adv_w
        if self.loss.pca is not None:
            out["pca_substitution_rate"] = self.loss.pca.last_substitution_rate
        return out

    def _disc_step(self, target: Any, s_emb: torch.Tensor) -> float:
        self.disc.requires_grad_(True)
        t_emb = target.embedding if hasattr(target, "embedding") else target
        loss = discriminator_loss(self.disc, t_emb, s_emb)
        loss.backward()
        average_gradients(self.env, self.disc)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out student↔teacher cosine and zero-shot top-1 agreement over the bank (clean views)."""
        if not self.val_refs:
            return {}
        self.student.eval()
        s_all, t_all = [], []
        for start in range(0, len(self.val_set), self.cfg.data.batch_size):
            items = [self.val_set[i] for i in range(start, min(len(self.val_set), start + self.cfg.data.batch_size))]
            b = collate(items)
            self._count_skipped(b)
            if len(b["index"]) == 0:
                continue
            with self.precision.autocast(self.device):
                s_all.append(self.student(b["student"].to(self.device)).float())
            t_all.append(self._heldout_teacher(start, b))
        self.student.train()
        s, t = torch.cat(s_all), torch.cat(t_all)
        # Baselines a constant predictor reaches: the held-out mean teacher embedding, and
        # always answering the teacher's most frequent label. Progress means beating them.
        mean_dir = nn.functional.normalize(t.mean(0), dim=-1)
        # Centred cosine: both sides minus the teacher's mean, i.e. only what varies from image
        # to image. A seeded random teacher maps all images near one direction, which makes the
        # plain cosine look good for a constant; the centred one is 0 for any constant.
        m = t.mean(0)
        centred = nn.functional.cosine_similarity(s - m, t - m, dim=-1).mean()
        out = {"heldout_cosine": float((s * t).sum(-1).mean()), "heldout_cosine_constant_baseline": float((t @ mean_dir).mean()),
               "heldout_centred_cosine": float(centred)}
        if self.bank is not None:
            t_top = (t @ self.bank.T).argmax(-1)
            out["heldout_top1_agreement"] = float(((s @ self.bank.T).argmax(-1) == t_top).float().mean())
            out["heldout_top1_constant_baseline"] = float(torch.bincount(t_top).max() / len(t_top))
        return out

    def _heldout_teacher(self, start: int, batch: dict) -> torch.Tensor:
        # The teacher is frozen: its held-out embeddings are computed once and kept.
        memo = self.__dict__.setdefault("_val_teacher", {})
        if start not in memo:
            memo[start] = self.teacher.encode_image(batch["teacher"].to(self.device)).float()
        return memo[start]

    # ---- driver

    def fit(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming when configured); returns a summary.

        ``until_step`` stops earlier without changing the schedule and leaves a checkpoint
        to resume from (time-boxed jobs on shared clusters, and the resume test).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        if self.env.is_main and not self.state.initial_eval:
            self.state.initial_eval = self.evaluate()
            self._write_metrics({"step": self.state.step, "kind": "eval", **self.state.initial_eval})
        barrier(self.env)
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not (self.cfg.run.progress and self.env.is_main),
                   desc="distill", dynamic_ncols=True)
        t_last, images = time.monotonic(), 0
        stop = min(self.total_steps, until_step or self.total_steps)
        for batch in self._batches():
            if self.state.step >= stop:
                break
            self._count_skipped(batch)
            metrics = self.train_step(batch) if len(batch["index"]) else {}
            images += len(batch["index"])
            self.state.step += 1
            bar.update(1)
            if self.state.step % self.cfg.run.log_every == 0 or self.state.step == self.total_steps:
                t_last, images = self._log_step(metrics, t_last, images, bar)
            if self.state.step % self.cfg.run.eval_every == 0 and self.env.is_main:
                self.state.last_eval = self.evaluate()
                self._write_metrics({"step": self.state.step, "kind": "eval", **self.state.last_eval})
            if self.state.step % self.cfg.run.checkpoint_every == 0 and self.state.step < self.total_steps:
                self.save()
        bar.close()
        if self.state.step < self.total_steps:
            self.save()
            return {"steps": self.state.step, "out_dir": str(self.out), "interrupted": True}
        return self._finish()

    def _count_skipped(self, batch: dict) -> None:
        for s in batch["skipped"]:
            if s.key not in self.state.skipped:
                self.state.skipped.add(s.key)
                log.warning("image_skipped", image=s.key, reason=s.reason, rank=self.env.rank)

    def _log_step(self, metrics: dict[str, float], t_last: float, images: int, bar: tqdm) -> tuple[float, int]:
        now = time.monotonic()
        rate = images * self.env.world / max(now - t_last, 1e-9)
        metrics = mean_across(self.env, metrics, self.device)
        if self.env.is_main:
            self.state.images_per_s.append(rate)
            line = {"step": self.state.step, "kind": "train", "epoch": round(self.state.step / self.steps_per_epoch, 4),
                    "lr": self.scheduler.get_last_lr()[0], "images_per_s": round(rate, 2),
                    "skipped_images": len(self.state.skipped), **metrics}
            self._write_metrics(line)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", img_s=f"{rate:.1f}")
        return now, 0

    def _write_metrics(self, line: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def _finish(self) -> dict[str, Any]:
        sync_buffers(self.env, self.trainable)
        self.save()
        if self.env.is_main:
            self.state.last_eval = self.evaluate()
            self._write_metrics({"step": self.state.step, "kind": "eval", **self.state.last_eval})
            self._write_student()
        barrier(self.env)
        rates = self.state.images_per_s[1:] or self.state.images_per_s  # the first window includes start-up
        summary = {
            "steps": self.state.step, "out_dir": str(self.out), "initial": self.state.initial_eval,
            "final": self.state.last_eval, "skipped_images": len(self.state.skipped),
            "images_per_s": sum(rates) / len(rates) if rates else None,
        }
        if self.cache is not None and self.cache.teacher_images_per_s and summary["images_per_s"]:
            s, t = summary["images_per_s"], self.cache.teacher_images_per_s
            summary["cache_speedup"] = {"student_images_per_s": s, "teacher_images_per_s": t,
                                        "estimated_uncached_images_per_s": 1 / (1 / s + 1 / t), "speedup": s * (1 / s + 1 / t)}
        log.info("distill_finished", **{k: v for k, v in summary.items() if k != "cache_speedup"})
        return summary

    def _write_student(self) -> Path:
        """The student alone (no projectors, no discriminator): what ``retrofit-model export`` reads.

        Only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
        """
        path = self.out / STUDENT_FILE
        torch.save({
            "student": self.student.state_dict(), "architecture": self.student.describe(),
            "input_spec": student_input_spec(self.student).model_dump(mode="json"),
            "teacher": self.teacher.identity, "fingerprint": self.teacher.fingerprint(),
            "trained_from_pretrained_teacher": self.cfg.teacher.pretrained is not None, "steps": self.state.step,
        }, path)
        return path


def _repeat(target: Any, v: int) -> Any:
    if isinstance(target, torch.Tensor):
        return target.repeat(v, *([1] * (target.ndim - 1)))
    return type(target)(**{k: _repeat(val, v) if isinstance(val, torch.Tensor) else val for k, val in vars(target).items()})


def _select(target: Any, ok: torch.Tensor) -> Any:
    if isinstance(target, torch.Tensor):
        return target[ok]
    return type(target)(**{k: val[ok] if isinstance(val, torch.Tensor) else val for k, val in vars(target).items()})
