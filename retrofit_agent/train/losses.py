"""Distillation losses, returned as a dict of named parts (open_clip's distill style).

Every part is unweighted in the dict; :class:`DistillLoss` adds ``total``, the weighted
sum, so each part can be logged on its own scale. Each loss gets only its own config
sections (``[loss]``, ``[projectors]``), never the whole config. Loss arithmetic runs in
float32 outside autocast; the student and the projectors' layers run under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from retrofit_agent.train.config import LossConfig, ProjectorConfig
from retrofit_agent.train.projectors import GLProjector, PCAProjector, adversarial_loss, mse
from retrofit_agent.train.teacher import TeacherFeatures
from retrofit_agent.train.zeroshot import ZeroShotBank, fp32, group_log_softmax


def embed_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity, mean over the batch.

    On unit vectors the squared L2 distance is 2(1 − cos): the same loss twice over, so
    ``loss.embed_l2`` adds to this term's weight instead of adding a second term.
    """
    with fp32(student.device):
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def embedding_weight(cfg: LossConfig) -> float:
    """Weight of the one embedding term: ``embed_cosine + 2 × embed_l2`` (see :func:`embed_cosine`)."""
    return cfg.embed_cosine + 2 * cfg.embed_l2


def grouped_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, groups: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """KL(teacher ‖ student) of the per-group softmaxes: mean over groups, then over rows."""
    with fp32(student_logits.device):
        ls, lt = group_log_softmax(student_logits, groups), group_log_softmax(teacher_logits, groups)
        inside = torch.isfinite(lt)  # columns in no group contribute nothing
        kl = torch.where(inside, lt.exp() * (lt - ls), torch.zeros_like(lt)).sum(-1)
        return kl.mean() / len(groups)


def affinity_kl(student: torch.Tensor, teacher: torch.Tensor, bank: ZeroShotBank, logit_scale: float) -> torch.Tensor:
    """TinyCLIP affinity mimicking: KL(teacher ‖ student) of the zero-shot distributions.

    Image→text follows the camera: ``logit_scale`` × cosine, a softmax within each of the
    bank's label groups (``bank.flat()`` for one softmax over every label). Text→image: each
    bank row over the batch's images. The two directions are averaged; identical
    embeddings give exactly zero. Logits and softmaxes are float32 whatever autocast is on.
    """
    with fp32(student.device):
        ls, lt = bank.logits(student, logit_scale), bank.logits(teacher, logit_scale)
        i2t = grouped_kl(ls, lt, bank.groups)
        t2i = F.kl_div(F.log_softmax(ls.T, -1), F.log_softmax(lt.T, -1), log_target=True, reduction="batchmean")
        return (i2t + t2i) / 2


def gl_loss(projected: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """MSE between GL-projected student features and the teacher's patch tokens (Liu et al. eq. 6).

    The teacher's tokens are layer-normalised (no affine) first: CLIP ViTs carry a few
    tokens with very large norms that would otherwise dominate an L2.
    """
    with fp32(projected.device):
        target = tokens.float()
        return mse(projected, F.layer_norm(target, target.shape[-1:]))


def resample_cells(cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, D) unit embeddings → (B, H', W', D) unit embeddings on another grid of the same image.

    Both grids tile the whole view, cell (i, j) covering rows i/h..(i+1)/h, so a finer grid is
    averaged over each coarser cell (adaptive average pooling) and a coarser one is
    interpolated bilinearly (at cell centres, ``align_corners=False``); the result is
    normalised again, since a mean of unit vectors is shorter than one.
    """
    h, w = cells.shape[1:3]
    if (h, w) == tuple(grid):
        return cells
    x = cells.permute(0, 3, 1, 2)
    if h >= grid[0] and w >= grid[1]:
        x = F.adaptive_avg_pool2d(x, grid)
    else:
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return F.normalize(x.permute(0, 2, 3, 1), dim=-1)


def dense_cosine(cells: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and cells of 1 − cosine between the student's (B, H', W', D) cells and the teacher's
    (B, gh, gw, D) patch embeddings resampled to (H', W') (:func:`resample_cells`)."""
    with fp32(cells.device):
        t = resample_cells(target.float(), (int(cells.shape[1]), int(cells.shape[2])))
        return (1 - F.cosine_similarity(cells.float(), t, dim=-1)).mean()


@dataclass
class StudentOutput:
    embedding: torch.Tensor
    feature_map: torch.Tensor | None = None
    cells: torch.Tensor | None = None  # (B, H', W', D) unit embeddings per cell (Student.forward_dense)


@dataclass(frozen=True)
class SpatialShape:
    """What the PCA/GL projectors connect: the student's map and the teacher's blocks."""

    student_channels: int
    teacher_width: int
    teacher_heads: int
    grid: tuple[int, int]
    layers: int  # how many teacher blocks (one projector pair each)


class DistillLoss(nn.Module):
    """All loss parts for one batch; owns the training-only projectors (never exported)."""

    def __init__(
        self, loss: LossConfig, projectors: ProjectorConfig, spatial: SpatialShape | None, logit_scale: float
    ) -> None:
        super().__init__()
        self.w = loss
        self.logit_scale = 1 / loss.affinity_temperature if loss.affinity_temperature else logit_scale
        p, pca_on = projectors, loss.pca_attention > 0 or loss.pca_value > 0
        if (pca_on or loss.gl > 0) and spatial is None:
            raise ValueError("PCA/GL losses need the spatial shape of student and teacher")
        self.grid = spatial.grid if spatial is not None else (1, 1)
        n = spatial.layers if spatial is not None else 0
        self.pca = (
            nn.ModuleList(
                PCAProjector(
                    spatial.student_channels,
                    spatial.teacher_width,
                    spatial.teacher_heads,
                    p.pca_substitute_p,
                    p.pca_granularity,
                    p.pca_form,
                )
                for _ in range(n)
            )
            if pca_on
            else None
        )
        self.gl = (
            nn.ModuleList(
                GLProjector(spatial.student_channels, spatial.teacher_width, spatial.grid, p.gl_group, p.gl_dropout)
                for _ in range(n)
            )
            if loss.gl > 0
            else None
        )

    @property
    def needs_features(self) -> bool:
        return self.pca is not None or self.gl is not None

    @property
    def needs_cells(self) -> bool:
        """The student's per-cell embeddings and the teacher's per-patch ones are needed (the dense term)."""
        return self.w.dense > 0

    @property
    def substitution_rate(self) -> float:
        return sum(m.last_substitution_rate for m in self.pca) / len(self.pca) if self.pca else 0.0

    def forward(
        self,
        student: StudentOutput,
        teacher: TeacherFeatures | torch.Tensor,
        bank: ZeroShotBank | None,
        disc: nn.Module | None = None,
        adversarial_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        t_emb = teacher.embedding if isinstance(teacher, TeacherFeatures) else teacher
        s_emb = student.embedding
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if embedding_weight(self.w) > 0:
            parts["embed"], weights["embed"] = embed_cosine(s_emb, t_emb), embedding_weight(self.w)
        if self.w.affinity > 0 and bank is not None:
            b = bank.flat() if self.w.affinity_softmax == "flat" else bank
            parts["affinity"], weights["affinity"] = affinity_kl(s_emb, t_emb, b, self.logit_scale), self.w.affinity
        if self.needs_features:
            self._feature_parts(student, teacher, parts, weights)
        if self.needs_cells:
            t_dense = teacher.dense if isinstance(teacher, TeacherFeatures) else None
            if t_dense is None or student.cells is None:
                raise ValueError("the dense loss needs the teacher's patch embeddings and the student's cells")
            parts["dense"], weights["dense"] = dense_cosine(student.cells, t_dense), self.w.dense
        if disc is not None and self.w.adversarial > 0:
            # Always computed (so DDP sees the same graph every step); the ramp sets its weight.
            parts["adversarial"], weights["adversarial"] = adversarial_loss(disc, s_emb), adversarial_weight
        parts["total"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    def _feature_parts(
        self,
        student: StudentOutput,
        teacher: TeacherFeatures | torch.Tensor,
        parts: dict[str, torch.Tensor],
        weights: dict[str, float],
    ) -> None:
        """PCA and GL per teacher block, each averaged over the blocks."""
        if not isinstance(teacher, TeacherFeatures) or student.feature_map is None:
            raise ValueError("PCA/GL losses need the teacher's tokens and the student's feature map")
        fmap = student.feature_map
        if self.pca is not None:
            per_layer = [
                pca(fmap, *(teacher.patch(t) for t in (lf.q, lf.k, lf.v)), self.grid)
                for pca, lf in zip(self.pca, teacher.layers)
            ]
            for name in ("pca_attention", "pca_value"):
                parts[name] = sum(d[name] for d in per_layer) / len(per_layer)
            weights.update(pca_attention=self.w.pca_attention, pca_value=self.w.pca_value)
        if self.gl is not None:
            per_layer = [gl_loss(gl(fmap), teacher.patch(lf.tokens)) for gl, lf in zip(self.gl, teacher.layers)]
            parts["gl"], weights["gl"] = sum(per_layer) / len(per_layer), self.w.gl
