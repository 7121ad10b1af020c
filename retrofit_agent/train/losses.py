"""Distillation losses, returned as a dict of named parts (open_clip's distill style).

Every part is unweighted in the dict; :class:`DistillLoss` adds ``total``, the weighted
sum, so each part can be logged on its own scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from retrofit_agent.train.config import DistillConfig
from retrofit_agent.train.projectors import GLProjector, PCAProjector, adversarial_loss
from retrofit_agent.train.teacher import TeacherFeatures


def embed_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between (normalised) embeddings, mean over the batch."""
    return (student.float() - teacher.float()).pow(2).sum(-1).mean()


def embed_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity, mean over the batch."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def affinity_kl(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
    """TinyCLIP affinity mimicking: KL(teacher ‖ student) of the zero-shot distributions.

    Both directions: each image over the bank (image→text) and each bank entry over the
    batch's images (text→image), averaged. Identical embeddings give exactly zero.
    """
    ls, lt = student.float() @ bank.T / temperature, teacher.float() @ bank.T / temperature
    i2t = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")
    t2i = F.kl_div(F.log_softmax(ls.T, -1), F.log_softmax(lt.T, -1), log_target=True, reduction="batchmean")
    return (i2t + t2i) / 2


@dataclass
class StudentOutput:
    embedding: torch.Tensor
    feature_map: torch.Tensor | None = None


class DistillLoss(nn.Module):
    """All loss parts for one batch; owns the training-only projectors (never exported)."""

    def __init__(self, cfg: DistillConfig, student_channels: int, teacher_width: int, teacher_heads: int,
                 grid: tuple[int, int], temperature: float) -> None:
        super().__init__()
        self.w = cfg.loss
        self.temperature = cfg.loss.affinity_temperature or temperature
        p = cfg.projectors
        self.pca = (
            PCAProjector(student_channels, teacher_width, teacher_heads, p.pca_substitute_p, p.pca_granularity)
            if self.w.pca_attention > 0 or self.w.pca_value > 0 else None
        )
        self.gl = GLProjector(student_channels, teacher_width, grid, p.gl_group, p.gl_dropout) if self.w.gl > 0 else None
        self.grid = grid

    def forward(
        self, student: StudentOutput, teacher: TeacherFeatures | torch.Tensor, bank: torch.Tensor | None,
        disc: nn.Module | None = None, adversarial_weight: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        t_emb = teacher.embedding if isinstance(teacher, TeacherFeatures) else teacher
        s_emb = student.embedding
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if self.w.embed_l2 > 0:
            parts["embed_l2"], weights["embed_l2"] = embed_l2(s_emb, t_emb), self.w.embed_l2
        if self.w.embed_cosine > 0:
            parts["embed_cosine"], weights["embed_cosine"] = embed_cosine(s_emb, t_emb), self.w.embed_cosine
        if self.w.affinity > 0 and bank is not None:
            parts["affinity"], weights["affinity"] = affinity_kl(s_emb, t_emb, bank, self.temperature), self.w.affinity
        if self.pca is not None or self.gl is not None:
            self._feature_parts(student, teacher, parts, weights)
        if disc is not None and self.w.adversarial > 0:
            # Always computed (so DDP sees the same graph every step); the ramp sets its weight.
            parts["adversarial"], weights["adversarial"] = adversarial_loss(disc, s_emb), adversarial_weight
        parts["total"] = sum(weights[k] * v for k, v in parts.items())
        return parts

    def _feature_parts(self, student: StudentOutput, teacher: TeacherFeatures | torch.Tensor,
                       parts: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
        if not isinstance(teacher, TeacherFeatures) or student.feature_map is None:
            raise ValueError("PCA/GL losses need the teacher's tokens and the student's feature map")
        fmap = student.feature_map
        if self.pca is not None:
            tq, tk, tv = (teacher.patch(t) for t in (teacher.q, teacher.k, teacher.v))
            pca = self.pca(fmap, tq, tk, tv, self.grid)
            parts.update(pca)
            weights.update(pca_attention=self.w.pca_attention, pca_value=self.w.pca_value)
        if self.gl is not None:
            # Teacher tokens are layer-normalised (no affine) first: CLIP ViTs carry a few
            # tokens with very large norms that would otherwise dominate an L2.
            target = teacher.patch(teacher.tokens)
            target = F.layer_norm(target, target.shape[-1:])
            parts["gl"], weights["gl"] = F.mse_loss(self.gl(fmap).float(), target), self.w.gl
