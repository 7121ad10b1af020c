"""The distillation config: one validated pydantic model, from a TOML file plus overrides.

Defaults reproduce the paper's setup (Clip4Retrofit): a ViT-L/14 (OpenAI) CLIP teacher and
an EfficientNet-B3 + MLP student at 300x300. ``models/configs/`` holds example files;
``tiny.toml`` runs on a laptop CPU in about a minute.

This module is torch-free on purpose: the CLI validates a config (and fails with one line)
before it pays for importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.settings import load_settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _none_word(value: Any) -> Any:
    # TOML has no null: the word "none" stands for it where a field is optional.
    return None if isinstance(value, str) and value.strip().lower() == "none" else value


class TeacherConfig(_Strict):
    model: str = Field(
        "ViT-L-14", description="open_clip model name (open_clip.list_models() or the repo's model_configs)."
    )
    pretrained: str | None = Field(
        "openai",
        description="open_clip pretrained tag (e.g. 'openai', 'laion2b_s32b_b82k') or a local checkpoint path; "
        "'none' for seeded random weights (smoke runs and tests only: nothing learnt from it means anything).",
    )
    seed: int | None = Field(None, description="Seed for the teacher's random init when pretrained is null.")
    layer: int | list[int] = Field(
        -1,
        description="Transformer block(s) whose tokens and attention the PCA/GL projectors align to (negative counts "
        "from the end); a list trains one projector pair per block and averages their losses. Earlier CLIP blocks "
        "(-4 to -8) localise better than the last one.",
    )

    _none = field_validator("pretrained", mode="before")(_none_word)

    @field_validator("layer")
    @classmethod
    def _layers(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("give one block index or a non-empty list of distinct ones")
        return value

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.layer) if isinstance(self.layer, list) else (self.layer,)


class StudentConfig(_Strict):
    backbone: str = Field("efficientnet_b3", description="timm model name; any timm model works.")
    pretrained: bool = Field(
        True, description="Start the backbone from timm's ImageNet weights (needs the HF hub or its cache)."
    )
    input_size: int = Field(300, gt=0, description="Square input size in pixels (the paper's 300).")
    hidden_dim: int = Field(1024, gt=0, description="Hidden width of the MLP projection head.")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="Dropout before the backbone's pooled output.")
    feature_index: int = Field(
        -2,
        description="Which of the backbone's feature maps (timm feature_info order) feeds the projectors; "
        "-2 is stride 16 (19x19 at 300 px for EfficientNet-B3), -1 stride 32 (10x10).",
    )
    sync_batchnorm: bool = Field(
        False, description="Under DDP, compute BatchNorm statistics over all ranks' batches (SyncBatchNorm)."
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute backbone activations in backward (timm set_grad_checkpointing): less memory, more compute.",
    )
    initial_checkpoint: Path | None = Field(
        None,
        description="Start from another distill run's student.pt (backbone and head; timm train.py's "
        "--initial-checkpoint) instead of timm's weights; its input size may differ (a phase at the camera's "
        "300 px after one at a lower resolution). Optimiser, schedule and projectors start afresh; "
        "'pretrained' is then not downloaded.",
    )

    @model_validator(mode="after")
    def _check_initial(self) -> StudentConfig:
        if self.initial_checkpoint is not None and not self.initial_checkpoint.is_file():
            raise ValueError(f"student.initial_checkpoint: no such file: {str(self.initial_checkpoint)!r}")
        return self


class DataConfig(_Strict):
    train: list[str] = Field(
        default_factory=list,
        description="Training sources: image folders (recursive), ImageFolder roots, "
        "WebDataset .tar shards, globs or brace patterns like 'shards/train-{000..099}.tar'.",
    )
    val: list[str] = Field(
        default_factory=list, description="Held-out sources; when empty, 'holdout' images are taken from train."
    )
    holdout: int = Field(64, ge=0, description="Images held out from train (seeded) when 'val' is empty.")
    batch_size: int = Field(64, gt=0, description="Images per step per process.")
    workers: int = Field(4, ge=0, description="DataLoader worker processes per training process.")
    max_images: int | None = Field(
        None, gt=0, description="Use only the first N images found (after sorting); quick runs."
    )


class AugmentConfig(_Strict):
    enabled: bool = Field(True, description="Augment the training views (see teacher_view for what the teacher sees).")
    teacher_view: Literal["same", "clean"] = Field(
        "same",
        description="'same': the teacher sees the student's view (same crop, rotation and colour; patch masking "
        "stays the student's alone), so spatial losses compare matching positions and targets match the pixels the "
        "student sees. 'clean': the teacher sees the unperturbed image (the earlier recipe; under crop or rotation "
        "PCA/GL then compare misaligned positions).",
    )
    views: int = Field(1, ge=1, description="Augmented student views per image per step (multi-view training).")
    p_color: float = Field(0.5, ge=0, le=1, description="Probability of colour jitter.")
    p_crop: float = Field(0.5, ge=0, le=1, description="Probability of a random resized crop.")
    p_rotate: float = Field(0.5, ge=0, le=1, description="Probability of a random rotation.")
    p_mask: float = Field(0.5, ge=0, le=1, description="Probability of patch masking.")
    brightness: float = Field(0.4, ge=0, description="Colour jitter: brightness factor range ±.")
    contrast: float = Field(0.4, ge=0, description="Colour jitter: contrast factor range ±.")
    saturation: float = Field(0.4, ge=0, description="Colour jitter: saturation factor range ±.")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="Crop area as a fraction of the image (min, max).")
    max_rotation_deg: float = Field(15.0, ge=0, description="Rotation angle range ±, degrees.")
    mask_patch: float = Field(0.125, gt=0, le=1, description="Masking patch side as a fraction of the image side.")
    mask_ratio: float = Field(
        0.25, ge=0, le=1, description="Fraction of patches masked (set to the view's mean, i.e. 0)."
    )


class LossConfig(_Strict):
    embed_l2: float = Field(
        1.0,
        ge=0,
        description="Squared L2 between the unit embeddings. On unit vectors ‖s − t‖² = 2(1 − cos), so it is "
        "merged into the one embedding term (logged as 'embed'), which it adds 2 × this weight to.",
    )
    embed_cosine: float = Field(
        1.0, ge=0, description="Weight of 1 − cosine between student and teacher embeddings (the 'embed' term)."
    )
    affinity: float = Field(
        1.0, ge=0, description="Weight of KL(teacher ‖ student) over the text bank (TinyCLIP affinity mimicking)."
    )
    affinity_temperature: float | None = Field(
        None,
        gt=0,
        description="Softmax temperature over the bank; null: 1/teacher logit scale, the scale the bundle's "
        "labeller multiplies cosines by.",
    )
    affinity_softmax: Literal["group", "flat"] = Field(
        "group",
        description="'group': a softmax within each label group of the bank, as the camera computes it; "
        "'flat': one softmax over every label (the earlier recipe). bank.texts form one group of their own.",
    )
    pca_attention: float = Field(
        0.0, ge=0, description="Weight of the PCA projector's attention-map loss (Liu et al. 2022)."
    )
    pca_value: float = Field(0.0, ge=0, description="Weight of the PCA projector's value-relation loss.")
    gl: float = Field(0.0, ge=0, description="Weight of the GL projector's L2 to the teacher's tokens.")
    adversarial: float = Field(
        0.0, ge=0, description="Final weight of the student's adversarial loss against the discriminator."
    )
    dense: float = Field(
        0.0,
        ge=0,
        description="Weight of the dense term: the student's per-cell embeddings (its head on every cell of the last "
        "feature map) against the teacher's per-patch embeddings resampled to the student's grid, mean 1 − cosine "
        "over cells (logged as 'dense'). What makes the exported cell_embeddings mean something (regions).",
    )

    @property
    def needs_teacher_tokens(self) -> bool:
        return self.pca_attention > 0 or self.pca_value > 0 or self.gl > 0


class BankConfig(_Strict):
    prompts_file: Path | None = Field(
        Path("models/prompts/automotive.toml"),
        description="Prompts file whose labels (teacher text tower, ensemble mean) form the bank.",
    )
    texts: list[str] = Field(default_factory=list, description="Extra bank entries, one text each.")

    _none = field_validator("prompts_file", mode="before")(_none_word)


class ProjectorConfig(_Strict):
    pca_form: Literal["paper", "maps"] = Field(
        "paper",
        description="'paper': Liu et al. eq. 4, the attention output softmax(QKᵀ/√d)·V (with substituted operands) "
        "and the value relation VVᵀ/√d, each a mean squared error. 'maps': the earlier simplified form, attention maps "
        "softmax(QKᵀ/√d) and softmax(VVᵀ/√d) compared row by row.",
    )
    pca_substitute_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="PCA: probability that a student Q/K/V entry is replaced by the teacher's in training "
        "(the paper's g(·): p ~ U(0,1), teacher's entry where p ≥ 0.5).",
    )
    pca_granularity: Literal["matrix", "element"] = Field(
        "element",
        description="PCA substitution unit: each element (Liu et al. eq. 3), or a whole Q, K or V matrix per image.",
    )
    gl_group: int = Field(
        4, gt=0, description="GL: side of a square neighbourhood group of tokens that shares one linear layer."
    )
    gl_dropout: float = Field(
        0.1, ge=0, lt=1, description="GL: dropout on the student features before the linear layers."
    )


class DiscriminatorConfig(_Strict):
    hidden_dim: int = Field(512, gt=0, description="Hidden width of the discriminator MLP.")
    lr: float = Field(1e-4, gt=0, description="Discriminator learning rate (its own AdamW).")
    ramp_epochs: float = Field(
        1.0, ge=0, description="The adversarial weight ramps linearly from 0 to loss.adversarial over this many epochs."
    )


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate (student, head, projectors).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(500, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    clip_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    epochs: float = Field(30.0, gt=0, description="Training length in epochs (fractions allowed).")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many steps; overrides epochs for the schedule."
    )


class CacheConfig(_Strict):
    enabled: bool = Field(
        False, description="Train from precomputed teacher outputs: the teacher runs once over the training set."
    )
    dir: Path | None = Field(None, description="Cache directory; default <run.out_dir>/teacher-cache.")
    shard_size: int = Field(4096, gt=0, description="Images per shard file.")
    batch_size: int = Field(128, gt=0, description="Teacher batch size while building the cache.")
    views: int = Field(
        1,
        ge=1,
        description="Augmented views pre-sampled per image (augment.teacher_view = 'same'): their parameters and "
        "the teacher's outputs are stored; each step replays one on the student's input (FKD-style). With 'clean' one "
        "clean view is stored and the student is augmented afresh every step.",
    )
    seed: int = Field(
        0, description="Seeds the stored views (not run.seed, so runs with other seeds can share one cache)."
    )
    spatial: bool = Field(
        False,
        description="Also store the teacher's patch tokens and Q/K/V of teacher.layer (float16) so the PCA/GL losses "
        "can train from the cache: 4 x tokens x width x 2 bytes per image, view and layer.",
    )
    on_mismatch: Literal["refuse", "rebuild"] = Field(
        "refuse",
        description="A cache directory built for another teacher, resolution, view set or image list (or by an "
        "older build): 'refuse' stops with one line, 'rebuild' deletes its files and builds it again.",
    )


class RunConfig(_Strict):
    out_dir: Path = Field(Path("runs/distill"), description="Checkpoints, metrics.jsonl and the final student go here.")
    seed: int = Field(0, description="Seeds model init, data order, augmentation and dropout.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype. auto: bf16 on CUDA where supported, else fp16 with a grad scaler; fp32 on CPU.",
    )
    log_every: int = Field(10, gt=0, description="Write a metrics line every N steps.")
    eval_every: int = Field(
        500, gt=0, description="Held-out student↔teacher cosine and zero-shot agreement every N steps."
    )
    checkpoint_every: int = Field(1000, gt=0, description="Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="How many step checkpoints to keep.")
    resume: Literal["auto", "never"] | Path = Field(
        "auto",
        description="'auto' resumes from out_dir/checkpoints/last when present, 'never' starts over, or a checkpoint directory.",
    )
    progress: bool = Field(True, description="Show a progress bar (rank 0 only).")


class DistillConfig(_Strict):
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The frozen CLIP teacher.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The timm student.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out images.")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="Training views, and whether the teacher sees them."
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss part weights and the affinity softmax.")
    bank: BankConfig = Field(default_factory=BankConfig, description="Text bank for affinity and zero-shot agreement.")
    projectors: ProjectorConfig = Field(
        default_factory=ProjectorConfig, description="Training-only PCA/GL projectors and the PCA form."
    )
    discriminator: DiscriminatorConfig = Field(
        default_factory=DiscriminatorConfig, description="Training-only discriminator."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and schedule.")
    cache: CacheConfig = Field(
        default_factory=CacheConfig, description="Teacher cache: outputs on stored views, keyed."
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Run directory, seeding, precision, logging.")

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.cache.enabled and self.loss.needs_teacher_tokens and not self.cache.spatial:
            raise ValueError(
                "cache.enabled stores final embeddings only unless cache.spatial = true; set cache.spatial, or set "
                "loss.pca_attention, loss.pca_value and loss.gl to 0, or disable the cache"
            )
        a = self.augment
        if self.loss.dense > 0 and a.teacher_view == "clean" and a.enabled and (a.p_crop > 0 or a.p_rotate > 0):
            raise ValueError(
                "loss.dense compares positions, and with augment.teacher_view = 'clean' the student's crops and "
                "rotations move them away from the teacher's; set augment.teacher_view = 'same' (or p_crop and p_rotate "
                "to 0)"
            )
        if self.cache.enabled and self.cache.views > 1 and self.augment.teacher_view == "clean":
            raise ValueError("cache.views > 1 needs augment.teacher_view = 'same' (a clean teacher view is one view)")
        if self.loss.affinity > 0 and self.bank.prompts_file is None and not self.bank.texts:
            raise ValueError("loss.affinity needs a bank: set bank.prompts_file or bank.texts")
        lo, hi = self.augment.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("augment.crop_scale must satisfy 0 < min <= max <= 1")
        return self

    @property
    def cache_dir(self) -> Path:
        return self.cache.dir or self.run.out_dir / "teacher-cache"


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.train=[\\"a\\",\\"b\\"]"]`` → a nested dict.

    Values are JSON when they parse as JSON (numbers, booleans, null, lists) and strings
    otherwise, so paths and model names need no quoting.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load_distill_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> DistillConfig:
    """Defaults < TOML file < overrides; every failure is a one-line ConfigError."""
    return load_settings(DistillConfig, path, overrides)
