"""The distillation loop: teacher → student, with checkpoints, metrics and DDP.

:class:`Distiller` wires the parts in order — setup (device, precision, models, bank,
data, cache, optimisers: :mod:`~retrofit_agent.train.setup`), the step's views and
targets (:mod:`~retrofit_agent.train.targets`), held-out evaluation
(:mod:`~retrofit_agent.train.heldout`) and checkpoint state
(:mod:`~retrofit_agent.train.checkpoint`) — and runs steps. One step: draw the views,
get the teacher's targets on them (live, or replayed from the cache), compute the loss
parts under autocast, clip, step AdamW and the warm-up + cosine schedule, then train the
discriminator. Metrics go to ``<out>/metrics.jsonl`` (one JSON object per logged step).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from tqdm import tqdm

from retrofit_agent.train.checkpoint import RunState, find_resume, restore_training, save_checkpoint, training_state
from retrofit_agent.train.config import DistillConfig
from retrofit_agent.train.distributed import DistEnv, average_gradients, barrier, mean_across, sync_buffers
from retrofit_agent.train.export import student_input_spec
from retrofit_agent.train.heldout import HeldOut
from retrofit_agent.train.projectors import discriminator_loss, ramp
from retrofit_agent.train.setup import (
    build_data,
    build_models,
    build_optim,
    prepare_cache,
    resolve_device,
    resolve_precision,
    student_norm,
    teacher_side,
)
from retrofit_agent.train.targets import StepViews, ViewTargets

log = structlog.get_logger("retrofit_agent.train")
STUDENT_FILE = "student.pt"


class Distiller:
    """Build with a validated config and a :class:`DistEnv`, then :meth:`fit`."""

    def __init__(self, cfg: DistillConfig, env: DistEnv = DistEnv()) -> None:
        self.cfg, self.env = cfg, env
        self.out = cfg.run.out_dir
        self.device = resolve_device(cfg.run.device, env)
        self.precision = resolve_precision(cfg.run.precision, self.device)
        self.state = RunState()
        self.models = build_models(cfg, env, self.device)
        m = self.models
        self.cache = None
        self.data = build_data(cfg, env, self.device, m.student, m.teacher, live_teacher=not cfg.cache.enabled)
        if cfg.cache.enabled:
            self.cache, skipped = prepare_cache(cfg, env, m.teacher, self.data.train_refs, self.precision)
            self.state.skipped.update(skipped)  # logged by the cache builder already
        self.views = ViewTargets(
            cfg.augment,
            cfg.run.seed,
            env.rank,
            student_norm(m.student),
            teacher_side(cfg, m.teacher, self.precision),
            self.cache,
        )
        self.optim = build_optim(cfg.optim, cfg.discriminator, m, self.data.total_steps, self.precision, self.device)
        self.heldout = HeldOut(
            self.data.val_set, m.teacher, cfg.data.batch_size, self.precision, dense=cfg.loss.dense > 0
        )

    # ---- the parts, by name (tests, benchmarks)

    @property
    def teacher(self):
        return self.models.teacher

    @property
    def student(self):
        return self.models.student

    @property
    def loss(self):
        return self.models.loss

    @property
    def disc(self):
        return self.models.disc

    @property
    def bank(self):
        return self.models.bank

    @property
    def total_steps(self) -> int:
        return self.data.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.data.steps_per_epoch

    # ---- checkpoints

    def save(self) -> Path:
        state = training_state(self.models, self.optim, self.state, self.env, self.cfg.model_dump(mode="json"))
        return save_checkpoint(
            self.out / "checkpoints", self.state.step, state, self.env, self.cfg.run.keep_checkpoints
        )

    def resume(self) -> bool:
        path = find_resume(self.cfg.run.resume, self.out / "checkpoints")
        if path is None:
            return False
        exact = restore_training(path, self.models, self.optim, self.state, self.env)
        log.info("resumed", checkpoint=str(path), step=self.state.step, exact=exact)
        return True

    # ---- steps

    def _batches(self) -> Iterator[dict]:
        """Batches from the current step on, across epochs."""
        while True:
            epoch, start = divmod(self.state.step, self.steps_per_epoch)
            self.data.sampler.epoch, self.data.sampler.start = epoch, start
            yield from self.data.loader

    def adversarial_weight(self) -> float:
        epoch = self.state.step / self.steps_per_epoch
        return ramp(self.cfg.loss.adversarial, epoch, self.cfg.discriminator.ramp_epochs)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimiser step of the student (and projectors), then one of the discriminator."""
        views = self.views(batch, self.state.step)
        if len(views.index) == 0:
            return {}
        out, s_emb = self.student_step(views)
        if self.disc is not None:
            out["loss_discriminator"] = self.disc_step(views, s_emb)
        return out

    def student_step(self, views: StepViews) -> tuple[dict[str, float], torch.Tensor]:
        """Backward and step for the student; the discriminator is frozen throughout (it gets no gradients)."""
        m, o = self.models, self.optim
        m.trainable.train()
        adv_w = self.adversarial_weight()
        if m.disc is not None:
            m.disc.requires_grad_(False)
        with self.precision.autocast(self.device):
            parts, s_emb = m.model(views.student, views.target, m.bank, m.disc, adv_w)
        o.scaler.scale(parts["total"]).backward()
        if self.cfg.optim.clip_grad_norm:
            o.scaler.unscale_(o.optimizer)
            nn.utils.clip_grad_norm_(m.trainable.parameters(), self.cfg.optim.clip_grad_norm)
        o.scaler.step(o.optimizer)
        o.scaler.update()
        o.optimizer.zero_grad(set_to_none=True)
        o.scheduler.step()
        out = {f"loss_{k}" if k != "total" else "loss": float(v.detach()) for k, v in parts.items()}
        if m.disc is not None:
            out["adversarial_weight"] = adv_w
        if m.loss.pca is not None:
            out["pca_substitution_rate"] = m.loss.substitution_rate
        return out, s_emb

    def disc_step(self, views: StepViews, s_emb: torch.Tensor) -> float:
        disc, opt = self.models.disc, self.optim.disc_optimizer
        disc.requires_grad_(True)
        t_emb = getattr(views.target, "embedding", views.target)
        loss = discriminator_loss(disc, t_emb, s_emb)
        loss.backward()
        average_gradients(self.env, disc)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def evaluate(self) -> dict[str, float]:
        """Held-out student↔teacher cosine and per-group zero-shot agreement (clean views)."""
        return self.heldout.evaluate(self.student, self.bank, self._count_skipped)

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
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not (self.cfg.run.progress and self.env.is_main),
            desc="distill",
            dynamic_ncols=True,
        )
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
            line = {
                "step": self.state.step,
                "kind": "train",
                "epoch": round(self.state.step / self.steps_per_epoch, 4),
                "lr": self.optim.scheduler.get_last_lr()[0],
                "images_per_s": round(rate, 2),
                "skipped_images": len(self.state.skipped),
                **metrics,
            }
            self._write_metrics(line)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", img_s=f"{rate:.1f}")
        return now, 0

    def _write_metrics(self, line: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def _finish(self) -> dict[str, Any]:
        sync_buffers(self.env, self.models.trainable)
        self.save()
        if self.env.is_main:
            self.state.last_eval = self.evaluate()
            self._write_metrics({"step": self.state.step, "kind": "eval", **self.state.last_eval})
            self._write_student()
        barrier(self.env)
        rates = self.state.images_per_s[1:] or self.state.images_per_s  # the first window includes start-up
        summary = {
            "steps": self.state.step,
            "out_dir": str(self.out),
            "initial": self.state.initial_eval,
            "final": self.state.last_eval,
            "skipped_images": len(self.state.skipped),
            "images_per_s": sum(rates) / len(rates) if rates else None,
        }
        if self.cache is not None and self.cache.teacher_images_per_s and summary["images_per_s"]:
            s, t = summary["images_per_s"], self.cache.teacher_images_per_s
            summary["cache_speedup"] = {
                "student_images_per_s": s,
                "teacher_images_per_s": t,
                "estimated_uncached_images_per_s": 1 / (1 / s + 1 / t),
                "speedup": s * (1 / s + 1 / t),
            }
        log.info("distill_finished", **{k: v for k, v in summary.items() if k != "cache_speedup"})
        return summary

    def _write_student(self) -> Path:
        """The student alone (no projectors, no discriminator): what ``retrofit-model export`` reads.

        Only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
        """
        path = self.out / STUDENT_FILE
        torch.save(
            {
                "student": self.student.state_dict(),
                "architecture": self.student.describe(),
                "input_spec": student_input_spec(self.student).model_dump(mode="json"),
                "teacher": self.teacher.identity,
                "fingerprint": self.teacher.fingerprint(),
                "trained_from_pretrained_teacher": self.cfg.teacher.pretrained is not None,
                "steps": self.state.step,
            },
            path,
        )
        return path
