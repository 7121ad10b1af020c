"""Setting a distillation run up: device, precision, models, bank, data, cache, optimisers.

Each builder takes the config sections it needs and returns a small typed bundle; the
loop (:mod:`retrofit_agent.train.loop`) wires them in order.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.prompts import load_prompts
from retrofit_agent.train.augment import Normalisation
from retrofit_agent.train.cache import CacheSpec, TeacherCache, build_cache, cache_key
from retrofit_agent.train.config import BankConfig, DiscriminatorConfig, DistillConfig, OptimConfig
from retrofit_agent.train.data import DistillDataset, EpochBatchSampler, ImageRef, collate, index_sources, split_holdout
from retrofit_agent.train.distributed import DistEnv
from retrofit_agent.train.export import student_input_spec
from retrofit_agent.train.losses import DistillLoss, SpatialShape, StudentOutput
from retrofit_agent.train.projectors import Discriminator
from retrofit_agent.train.student import Student, read_student_file
from retrofit_agent.train.targets import TeacherSide
from retrofit_agent.train.teacher import Teacher
from retrofit_agent.train.zeroshot import ZeroShotBank

log = structlog.get_logger("retrofit_agent.train")


# --------------------------------------------------------------------------- device and precision


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

    def autocast(self, device: torch.device) -> ContextManager:
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


# --------------------------------------------------------------------------- models


class Trainable(nn.Module):
    """What DDP wraps: the student and the training-only projectors inside the loss."""

    def __init__(self, student: Student, loss: DistillLoss, feature_index: int) -> None:
        super().__init__()
        self.student, self.loss, self.feature_index = student, loss, feature_index

    def forward(
        self, x: torch.Tensor, target: Any, bank: ZeroShotBank | None, disc: nn.Module | None, adv_weight: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(loss parts, student embeddings) for one batch of views."""
        features, cells = self.loss.needs_features, self.loss.needs_cells
        if features and cells:  # one backbone pass for the projectors and the dense term
            emb, fmap, c = self.student.forward_dense_with_features(x, self.feature_index)
            out = StudentOutput(emb, fmap, c)
        elif features:
            out = StudentOutput(*self.student.forward_with_features(x, self.feature_index))
        elif cells:
            emb, c = self.student.forward_dense(x)
            out = StudentOutput(emb, cells=c)
        else:
            out = StudentOutput(self.student(x))
        return self.loss(out, target, bank, disc, adv_weight), out.embedding


@dataclass
class Models:
    teacher: Teacher
    student: Student
    loss: DistillLoss
    trainable: Trainable  # student + projectors (SyncBatchNorm-converted under DDP when asked)
    model: nn.Module  # what the step calls: ``trainable`` or its DDP wrapper
    disc: Discriminator | None
    bank: ZeroShotBank | None


def load_teacher(cfg: DistillConfig, device: torch.device) -> Teacher:
    c = cfg.teacher
    try:
        teacher = Teacher(c.model, c.pretrained, c.seed).to(device)
    except (RuntimeError, OSError, ValueError) as e:  # unknown name, missing/corrupt checkpoint, no network
        raise ConfigError(f"teacher: cannot load {c.model!r} (pretrained={c.pretrained!r}): {e}") from None
    if cfg.loss.needs_teacher_tokens:
        teacher.check_spatial(c.layers, need_qk=cfg.loss.pca_attention > 0 or cfg.loss.pca_value > 0)
    if cfg.loss.dense > 0:
        teacher.check_dense()
    return teacher


def build_models(cfg: DistillConfig, env: DistEnv, device: torch.device) -> Models:
    c = cfg
    teacher = load_teacher(cfg, device)
    torch.manual_seed(c.run.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    try:
        student = Student(
            c.student.backbone,
            teacher.embed_dim,
            c.student.hidden_dim,
            c.student.pretrained and c.student.initial_checkpoint is None,
            c.student.drop_rate,
            c.student.input_size,
        )
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"student: cannot create timm model {c.student.backbone!r}: {e}") from None
    if c.student.initial_checkpoint is not None:
        load_initial_student(student, c.student.initial_checkpoint)
    student.set_grad_checkpointing(c.student.grad_checkpointing)
    if c.loss.dense > 0 and not student.has_cells:
        raise ConfigError(
            f"loss.dense: student backbone {c.student.backbone!r} has no spatial final feature map to give cells; "
            "use a CNN backbone or set loss.dense to 0"
        )
    spatial = None
    if c.loss.needs_teacher_tokens:
        spatial = SpatialShape(
            student.feature_channels(c.student.feature_index),
            teacher.width,
            teacher.num_heads,
            teacher.grid_size,
            len(c.teacher.layers),
        )
    loss = DistillLoss(c.loss, c.projectors, spatial, teacher.logit_scale)
    trainable = Trainable(student, loss, c.student.feature_index).to(device)
    disc = Discriminator(teacher.embed_dim, c.discriminator.hidden_dim).to(device) if c.loss.adversarial > 0 else None
    model: nn.Module = trainable
    if env.enabled:
        if c.student.sync_batchnorm:
            trainable = nn.SyncBatchNorm.convert_sync_batchnorm(trainable)
            student = trainable.student
        model = DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    bank = build_bank(teacher, c.bank)
    torch.manual_seed(c.run.seed * 1000 + env.rank)  # per-rank dropout/substitution streams
    return Models(teacher, student, loss, trainable, model, disc, bank)


def load_initial_student(student: Student, path: Path) -> None:
    """Backbone and head weights from a distill run's ``student.pt``; its architecture must match
    ``student``'s except the input size (the network is fully convolutional)."""
    saved = read_student_file(path, "student.initial_checkpoint")
    arch, state = saved["architecture"], saved["student"]
    mine = {k: v for k, v in student.describe().items() if k != "input_size"}
    theirs = {k: arch.get(k) for k in mine}
    if mine != theirs:
        diff = ", ".join(f"{k} {theirs[k]!r} (this run: {mine[k]!r})" for k in mine if mine[k] != theirs[k])
        raise ConfigError(f"student.initial_checkpoint: {str(path)!r} has {diff}")
    student.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))})
    log.info("student_initial_checkpoint", path=str(path), steps=saved.get("steps"), trained_at=arch.get("input_size"))


def build_bank(teacher: Teacher, cfg: BankConfig) -> ZeroShotBank | None:
    """Text embeddings from the teacher's text tower, one row per label (ensemble mean), in its groups.

    ``bank.texts`` entries form one extra group, "texts".
    """
    from retrofit_agent.train.bank import encode_prompt_set

    rows, groups, labels = [], [], []
    if cfg.prompts_file is not None:
        emb, g, lab = encode_prompt_set(teacher, load_prompts(cfg.prompts_file))
        rows.append(torch.from_numpy(emb))
        groups += g
        labels += lab
    if cfg.texts:
        rows.append(teacher.encode_text(list(cfg.texts)).cpu())
        groups += ["texts"] * len(cfg.texts)
        labels += list(cfg.texts)
    if not rows:
        return None
    return ZeroShotBank.build(torch.cat(rows).to(teacher.device), groups, labels)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    train_refs: list[ImageRef]
    val_refs: list[ImageRef]
    steps_per_epoch: int
    total_steps: int
    sampler: EpochBatchSampler
    loader: DataLoader
    val_set: DistillDataset


def split_data(cfg: DistillConfig, env: DistEnv) -> tuple[list[ImageRef], list[ImageRef], int, int]:
    """(train, held-out, steps per epoch, total steps)."""
    c = cfg
    refs = index_sources(c.data.train)
    if c.data.max_images:
        refs = refs[: c.data.max_images]
    if c.data.val:
        train, val = refs, index_sources(c.data.val)
    else:
        train, val = split_holdout(refs, c.data.holdout, c.run.seed)
    steps = EpochBatchSampler.batches_per_epoch(len(train), c.data.batch_size, env.world)
    if steps == 0:
        raise ConfigError(
            f"data: {len(train)} training images are fewer than one batch "
            f"({c.data.batch_size} x {env.world} processes); add images or lower data.batch_size"
        )
    total = c.optim.max_steps or max(1, round(c.optim.epochs * steps))
    return train, val, steps, total


def build_data(
    cfg: DistillConfig, env: DistEnv, device: torch.device, student: Student, teacher: Teacher, live_teacher: bool
) -> Data:
    """Loaders for the split; the training batches carry the teacher's view only when it runs live."""
    c = cfg
    train, val, steps, total = split_data(cfg, env)
    student_spec = student_input_spec(student)
    sampler = EpochBatchSampler(len(train), c.data.batch_size, c.run.seed, 0, env.rank, env.world)
    loader = DataLoader(
        DistillDataset(train, student_spec, teacher.input_spec() if live_teacher else None),
        batch_sampler=sampler,
        num_workers=c.data.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=c.data.workers > 0,
        # Its own generator: by default each new iterator draws a worker seed from the
        # global RNG, which would shift dropout/substitution draws after a resume.
        generator=torch.Generator().manual_seed(c.run.seed + env.rank),
    )
    val_set = DistillDataset(val, student_spec, teacher.input_spec())
    log.info(
        "data_ready",
        train_images=len(train),
        heldout_images=len(val),
        steps_per_epoch=steps,
        total_steps=total,
        rank=env.rank,
    )
    return Data(train, val, steps, total, sampler, loader, val_set)


def teacher_side(cfg: DistillConfig, teacher: Teacher, precision: Precision) -> TeacherSide:
    spatial = cfg.loss.needs_teacher_tokens
    return TeacherSide(
        teacher,
        cfg.teacher.layers if spatial else None,
        spatial and (cfg.loss.pca_attention > 0 or cfg.loss.pca_value > 0),
        lambda: precision.autocast(teacher.device),
        dense=cfg.loss.dense > 0,
    )


def cache_spec(cfg: DistillConfig) -> CacheSpec:
    spatial = cfg.loss.needs_teacher_tokens
    return CacheSpec(
        views=cfg.cache.views,
        seed=cfg.cache.seed,
        teacher_view=cfg.augment.teacher_view,
        augment=cfg.augment,
        layers=cfg.teacher.layers if spatial else None,
        qkv=spatial and (cfg.loss.pca_attention > 0 or cfg.loss.pca_value > 0),
        shard_size=cfg.cache.shard_size,
        dense=cfg.loss.dense > 0,
    )


def prepare_cache(
    cfg: DistillConfig, env: DistEnv, teacher: Teacher, train: list[ImageRef], precision: Precision
) -> tuple[TeacherCache, list[str]]:
    """Build what is missing, then open it. Returns the cache and the images it skipped."""
    t0 = time.monotonic()
    spec = cache_spec(cfg)
    stats = build_cache(
        cfg.cache_dir,
        teacher,
        train,
        spec,
        cfg.cache.batch_size,
        env,
        cfg.data.workers,
        cfg.cache.on_mismatch,
        lambda: precision.autocast(teacher.device),
    )
    # A ResNet teacher (no patch grid) serves the embedding and affinity losses only.
    grid = teacher.grid_size if spec.layers is not None else (0, 0)
    cache = TeacherCache(cfg.cache_dir, cache_key(teacher, train, spec), grid)
    log.info(
        "teacher_cache_ready",
        dir=str(cfg.cache_dir),
        built_images=stats["built_images"],
        views=spec.views,
        seconds=round(time.monotonic() - t0, 2),
        teacher_images_per_s=cache.teacher_images_per_s,
    )
    return cache, stats["skipped"]


def student_norm(student: Student) -> Normalisation:
    return Normalisation(tuple(student.mean), tuple(student.std))


# --------------------------------------------------------------------------- optimisers


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(progress * math.pi))


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases (of any shape: the GL projector's are 2-d), norm weights and 1-d parameters."""
    exempt: set[int] = set()
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, _NORMS) or name.endswith("bias") or p.ndim <= 1:
                exempt.add(id(p))
    decay = [p for p in module.parameters() if p.requires_grad and id(p) not in exempt]
    no_decay = [p for p in module.parameters() if p.requires_grad and id(p) in exempt]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Optimisers:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    disc_optimizer: torch.optim.Optimizer | None


def build_optim(
    optim: OptimConfig,
    discriminator: DiscriminatorConfig,
    models: Models,
    total_steps: int,
    precision: Precision,
    device: torch.device,
) -> Optimisers:
    opt = torch.optim.AdamW(param_groups(models.trainable, optim.weight_decay), lr=optim.lr, betas=optim.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(optim.warmup_steps, total_steps, optim.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    # The discriminator keeps AdamW's default decay (0.01), with the same exemptions.
    disc_opt = (
        torch.optim.AdamW(param_groups(models.disc, 0.01), lr=discriminator.lr, betas=(0.5, 0.999))
        if models.disc is not None
        else None
    )
    return Optimisers(opt, sched, scaler, disc_opt)
