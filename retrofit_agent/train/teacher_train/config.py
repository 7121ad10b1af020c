"""The teacher-training config: one validated pydantic model, from a TOML file plus overrides.

Defaults are the recipe that trains ``retrofit-world-clip`` on the procedural world on a
2-core CPU (``models/configs/world-teacher.toml`` spells them out). Torch-free, so a bad
config fails with one line before torch is imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrofit_agent.contract.settings import load_settings
from retrofit_agent.train.world.labels import RENDERABLE

# The world numbers its scenes seed * 10_000_000 + index (world.dataset.scene_seed); a world
# seed therefore owns ten million scenes, and two different world seeds never share one.
SCENES_PER_WORLD_SEED = 10_000_000
WORLD_SEED_MAX = 2**31 - 1 - SCENES_PER_WORLD_SEED  # keeps every scene seed a positive int32 for safety
RENDER_MIN, RENDER_MAX = 32, 1024
DEFAULT_PROMPTS = Path(__file__).resolve().parents[3] / "models" / "prompts" / "automotive.toml"
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"  # teacher.CONFIG_DIR, without importing torch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(
        "retrofit-world-clip-rn",
        min_length=1,
        description="open_clip model config in retrofit_agent/train/model_configs/ (file name without .json).",
    )
    init_from: Path | None = Field(
        None,
        description="Start a new run from these weights (an open_clip checkpoint.pt of the same model, e.g. an "
        "earlier phase's) instead of a seeded initialisation; open_clip_train's fine-tuning from --pretrained. "
        "The optimiser, schedule and step count start afresh.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.init_from is not None and not self.init_from.is_file():
            raise ValueError(f"model.init_from: no such checkpoint: {str(self.init_from)!r}")
        return self


class DataConfig(_Strict):
    world_seed: int = Field(
        1,
        ge=0,
        le=WORLD_SEED_MAX,
        description="World seed of the training scenes; sample i of the run is scene world_seed*1e7+i.",
    )
    render_size: tuple[int, int] = Field(
        (128, 224),
        description="Each training scene is rendered square at a side drawn from [min, max] pixels, JPEG-coded "
        "at the scene's own quality and resized to the model's input like the distillation's teacher view.",
    )
    prompts_file: Path = Field(
        DEFAULT_PROMPTS, description="Prompts TOML: the world's label space and the zero-shot bank."
    )
    workers: int = Field(
        1, ge=0, le=16, description="DataLoader worker processes rendering scenes (0: render in the training process)."
    )
    cycle_scenes: int = Field(
        0,
        ge=0,
        le=SCENES_PER_WORLD_SEED,
        description="0: every sample is a new scene (the world is infinite); N: the run "
        "cycles over its first N scenes, a fixed training set (ablations, tests).",
    )
    twins: float = Field(
        0.25,
        ge=0,
        le=0.5,
        description="Fraction of each batch spent on hard negatives: scenes that copy another scene's labels "
        "except for one group, so the batch can only be told apart by that group.",
    )
    twin_scene: Literal["other", "same"] = Field(
        "other",
        description="other: a twin is a different scene drawn with its base's labels but one; same: a twin is "
        "its base's own scene (seed, camera, light, sensor, place) re-drawn with one group changed, a minimal "
        "pair, and both captions name that group. Contrastive training learns the easy, picture-wide groups "
        "first and can leave small objects at chance for good (feature suppression); a minimal pair can only "
        "be told apart by the object.",
    )
    twin_groups: tuple[str, ...] = Field(
        (),
        description="Groups a twin may change (drawn uniformly); empty: any group the base can observe.",
    )


class LabelsConfig(_Strict):
    weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Weight of a label loss beside the contrastive one: a linear head on the image embedding, "
        "one softmax cross-entropy per group against the world's ground truth (0: captions alone). It trains "
        "the image tower only through the embedding the camera uses; the head is not part of the checkpoint.",
    )
    groups: tuple[str, ...] = Field((), description="Groups the label head reads; empty: every group.")


class OptimConfig(_Strict):
    batch_size: int = Field(
        128, ge=2, le=65536, description="Image-caption pairs per step (ClipLoss needs at least 2)."
    )
    steps: int = Field(
        10000,
        ge=1,
        le=10_000_000,
        description="Optimiser steps of the run (the cosine schedule ends here, unless schedule_steps says otherwise).",
    )
    schedule_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Length of the warm-up + cosine schedule when it differs from steps: a run that stops early "
        "on a longer schedule (a first phase cut where a second takes over) stays reproducible from its config.",
    )
    lr: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(300, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(
        0.1, ge=0, le=10, description="AdamW weight decay (not on gains, biases, embeddings' norms or logit scale)."
    )
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (open_clip's ViT recipe).")
    eps: float = Field(1e-6, gt=0, description="AdamW epsilon.")
    clip_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    precision: Literal["fp32", "amp_bf16"] = Field(
        "amp_bf16",
        description="amp_bf16: forward and loss under CPU bfloat16 autocast, fp32 weights (open_clip_train's "
        "--precision amp_bf16); about 1.5x faster on CPUs with AVX512-BF16, slower on CPUs without it.",
    )

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must each be in [0, 1) (got {list(self.betas)})")
        return self


class EvalConfig(_Strict):
    world_seed: int = Field(
        9, ge=0, le=WORLD_SEED_MAX, description="World seed of the held-out scenes (must differ from data.world_seed)."
    )
    scenes: int = Field(
        1000, ge=1, le=SCENES_PER_WORLD_SEED, description="Held-out scenes of the final (and --eval-only) evaluation."
    )
    render_size: int = Field(
        224,
        ge=RENDER_MIN,
        le=RENDER_MAX,
        description="Side the held-out scenes are rendered at (the world's default picture size).",
    )
    every: int = Field(
        500,
        ge=0,
        description="Evaluate on eval.quick_scenes held-out scenes every this many steps (0: never during training).",
    )
    quick_scenes: int = Field(
        300, ge=1, le=SCENES_PER_WORLD_SEED, description="Held-out scenes of the evaluations during training."
    )


class RunConfig(_Strict):
    out_dir: Path = Field(
        Path("runs/world-teacher"), description="Run directory: checkpoint.pt, train_state.pt, log.jsonl, eval.json."
    )
    seed: int = Field(0, ge=0, description="Seed of the model's initial weights.")
    threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads of the training process. On cores shared with other work one "
        "thread is faster than two: OpenMP's per-op barriers stall whenever a sibling thread is descheduled.",
    )
    checkpoint_every_s: float = Field(
        300.0, gt=0, description="Write checkpoint.pt and train_state.pt at least this often (seconds), and at the end."
    )
    log_every: int = Field(10, ge=1, description="Append a loss line to log.jsonl every this many steps.")


class TeacherTrainConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> TeacherTrainConfig:
        lo, hi = self.data.render_size
        if not RENDER_MIN <= lo <= hi <= RENDER_MAX:
            raise ValueError(
                f"data.render_size must be [min, max] with {RENDER_MIN} <= min <= max <= {RENDER_MAX} (got {[lo, hi]})"
            )
        if self.eval.world_seed == self.data.world_seed:
            raise ValueError(
                f"eval.world_seed must differ from data.world_seed (both {self.eval.world_seed}): "
                "held-out scenes must not be training scenes"
            )
        if self.optim.steps * self.optim.batch_size > SCENES_PER_WORLD_SEED:
            raise ValueError(
                f"optim.steps x optim.batch_size must be <= {SCENES_PER_WORLD_SEED} (the scenes of one world seed)"
            )
        if self.data.twin_groups:
            unknown = [g for g in self.data.twin_groups if g not in RENDERABLE]
            if unknown:
                raise ValueError(f"data.twin_groups: no group {unknown[0]!r} (groups: {', '.join(RENDERABLE)})")
        unknown = [g for g in self.labels.groups if g not in RENDERABLE]
        if unknown:
            raise ValueError(f"labels.groups: no group {unknown[0]!r} (groups: {', '.join(RENDERABLE)})")
        if self.optim.warmup_steps >= self.optim.steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below optim.steps ({self.optim.steps})"
            )
        return self

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues (everything that shapes the weights)."""
        d = self.model_dump(mode="json")
        d.pop("run")
        d["eval"] = None
        d["seed"] = self.run.seed
        return d


def load_teacher_train_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TeacherTrainConfig:
    """Defaults < TOML file < overrides; every failure is a one-line ConfigError."""
    return load_settings(TeacherTrainConfig, path, overrides)


def dump(cfg: TeacherTrainConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), indent=2)
