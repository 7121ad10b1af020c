"""Held-out evaluation: how closely the student reproduces the teacher on clean, unseen images.

Two questions, each with the figure a constant predictor reaches (progress means beating
it): does the student's embedding point where the teacher's does (cosine, and the
centred cosine that ignores the direction all images share), and would the camera give
the same answer (top-1 agreement within each label group of the bank, as the labeller
softmaxes within groups)? With the dense term on, a third: do the student's cells point
where the teacher's patches do (the regions' input)?
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from retrofit_agent.train.data import DistillDataset, collate
from retrofit_agent.train.losses import resample_cells
from retrofit_agent.train.setup import Precision
from retrofit_agent.train.student import Student
from retrofit_agent.train.teacher import Teacher
from retrofit_agent.train.zeroshot import ZeroShotBank, group_argmax


def embedding_metrics(s: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Cosine, its constant baseline (the mean teacher direction) and the centred cosine."""
    mean_dir = nn.functional.normalize(t.mean(0), dim=-1)
    # Centred cosine: both sides minus the teacher's mean, i.e. only what varies from image
    # to image. A seeded random teacher maps all images near one direction, which makes the
    # plain cosine look good for a constant; the centred one is 0 for any constant.
    m = t.mean(0)
    centred = nn.functional.cosine_similarity(s - m, t - m, dim=-1).mean()
    return {
        "heldout_cosine": float((s * t).sum(-1).mean()),
        "heldout_cosine_constant_baseline": float((t @ mean_dir).mean()),
        "heldout_centred_cosine": float(centred),
    }


def agreement_metrics(s: torch.Tensor, t: torch.Tensor, bank: ZeroShotBank) -> dict[str, float]:
    """Top-1 agreement per label group (mean over images and groups) and its constant baseline.

    The baseline answers every image with the teacher's most frequent label of each group.
    Winners do not depend on the logit scale or the softmax, only on the groups.
    """
    t_top = group_argmax(bank.logits(t, 1.0), bank.groups)  # (N, G)
    s_top = group_argmax(bank.logits(s, 1.0), bank.groups)
    constant = torch.stack([torch.bincount(t_top[:, g]).max() for g in range(t_top.shape[1])]).float() / len(t_top)
    return {
        "heldout_top1_agreement": float((s_top == t_top).float().mean()),
        "heldout_top1_constant_baseline": float(constant.mean()),
    }


class HeldOut:
    """Evaluates a student on the held-out set; the frozen teacher's side is computed once."""

    def __init__(
        self, val_set: DistillDataset, teacher: Teacher, batch_size: int, precision: Precision, dense: bool = False
    ) -> None:
        self.val_set, self.teacher, self.batch_size, self.precision = val_set, teacher, batch_size, precision
        self.dense = dense  # also score the student's cells against the teacher's per-patch embeddings
        self._teacher_memo: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def evaluate(
        self, student: Student, bank: ZeroShotBank | None, on_batch: Callable[[dict], None] = lambda b: None
    ) -> dict[str, float]:
        """Clean views; ``on_batch`` sees each collated batch (the loop counts skipped images)."""
        if len(self.val_set) == 0:
            return {}
        device = self.teacher.device
        was_training = student.training
        student.eval()
        s_all, t_all, sc_all, tc_all = [], [], [], []
        for start in range(0, len(self.val_set), self.batch_size):
            b = collate([self.val_set[i] for i in range(start, min(len(self.val_set), start + self.batch_size))])
            on_batch(b)
            if len(b["index"]) == 0:
                continue
            with self.precision.autocast(device):
                if self.dense:
                    emb, cells = student.forward_dense(b["student"].to(device))
                    sc_all.append(cells.float())
                else:
                    emb = student(b["student"].to(device))
                s_all.append(emb.float())
            if start not in self._teacher_memo:
                x = b["teacher"].to(device)
                if self.dense:
                    t_emb, t_cells = self.teacher.encode_image_and_dense(x)
                    self._teacher_memo[start] = (t_emb.float(), t_cells.float())
                else:
                    self._teacher_memo[start] = (self.teacher.encode_image(x).float(), None)
            t_all.append(self._teacher_memo[start][0])
            tc_all.append(self._teacher_memo[start][1])
        student.train(was_training)
        s, t = torch.cat(s_all), torch.cat(t_all)
        out = embedding_metrics(s, t)
        if bank is not None:
            out.update(agreement_metrics(s, t, bank))
        if self.dense and sc_all:
            out.update(cell_metrics(torch.cat(sc_all), torch.cat([c for c in tc_all if c is not None])))
        return out


def cell_metrics(cells: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How well the student's (N, H', W', D) cells match the teacher's (N, gh, gw, D) patch
    embeddings resampled to (H', W') as the dense loss does: cosine, its constant baseline (the
    teacher's mean cell direction everywhere) and the centred cosine (0 for any constant)."""
    t = resample_cells(target, (int(cells.shape[1]), int(cells.shape[2]))).reshape(-1, target.shape[-1])
    s = cells.reshape(-1, cells.shape[-1])
    m = t.mean(0)
    return {
        "heldout_cell_cosine": float((s * t).sum(-1).mean()),
        "heldout_cell_cosine_constant_baseline": float((t @ nn.functional.normalize(m, dim=-1)).mean()),
        "heldout_cell_centred_cosine": float(nn.functional.cosine_similarity(s - m, t - m, dim=-1).mean()),
    }
