"""One step's views and the teacher's targets on them.

``augment.views`` views per image are drawn from (run seed, step, rank). With
``augment.teacher_view = "same"`` the teacher sees each view as the student does (same
crop, rotation and colour, rendered at its own resolution and normalisation), so token
and attention targets describe the positions the student's feature map describes; the
student alone also gets patch masking. With ``"clean"`` the teacher sees the unperturbed
image (the earlier recipe). From the teacher cache a step replays one of the stored views
per image instead of drawing a new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch

from retrofit_agent.train.augment import Augmenter, Normalisation, ViewParams, step_generator
from retrofit_agent.train.cache import TeacherCache
from retrofit_agent.train.config import AugmentConfig
from retrofit_agent.train.teacher import Teacher, TeacherFeatures

Target = TeacherFeatures | torch.Tensor


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``fn`` applied to every tensor in a tensor, a tuple of them or a (nested) dataclass; other values kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(fn, getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        )
    return obj


@dataclass(frozen=True)
class StepViews:
    student: torch.Tensor  # (B', 3, H, W): what the student sees
    target: Target  # the teacher's outputs for those rows
    index: torch.Tensor  # (B',) training-set index of each row


@dataclass(frozen=True)
class TeacherSide:
    """How the teacher is asked: which blocks, whether Q/K/V, under which autocast."""

    teacher: Teacher
    layers: Sequence[int] | None  # None: the embedding only
    qkv: bool
    autocast: Callable[[], ContextManager]
    dense: bool = False  # also the per-patch embeddings (the dense loss)


class ViewTargets:
    """``views(batch, step)`` → :class:`StepViews` (the teacher live, or replayed from the cache)."""

    def __init__(
        self,
        cfg: AugmentConfig,
        seed: int,
        rank: int,
        student_norm: Normalisation,
        teacher: TeacherSide,
        cache: TeacherCache | None = None,
    ) -> None:
        self.cfg, self.seed, self.rank, self.cache = cfg, seed, rank, cache
        self.student_norm, self.side = student_norm, teacher
        self.teacher_norm = Normalisation(teacher.teacher.mean, teacher.teacher.std)
        self.augmenter = Augmenter(cfg, student_norm.mean, student_norm.std)

    @property
    def same_view(self) -> bool:
        return self.cfg.teacher_view == "same"

    def __call__(self, batch: dict, step: int) -> StepViews:
        gen = step_generator(self.seed, step, self.rank)
        device = self.side.teacher.device
        v = self.cfg.views
        index = batch["index"].repeat(v)  # view-major: all images' first view, then the second, ...
        x = batch["student"].to(device, non_blocking=True).repeat(v, 1, 1, 1)
        if self.cache is not None:
            return self._replayed(self.cache, x, index, gen, device)
        params = self.augmenter.sample(len(index), gen)
        mask = self.augmenter.sample_mask(len(index), gen)
        student = self.augmenter.apply(x, params, self.student_norm, mask)
        t = batch["teacher"].to(device, non_blocking=True)
        if self.same_view:
            target = self.teacher_targets(self.augmenter.apply(t.repeat(v, 1, 1, 1), params, self.teacher_norm))
        else:  # the clean image once per image, its outputs repeated for every view
            target = map_tensors(lambda a: a.repeat(v, *([1] * (a.ndim - 1))), self.teacher_targets(t))
        return StepViews(student, target, index)

    def teacher_targets(self, x: torch.Tensor) -> Target:
        s = self.side
        with s.autocast():
            if s.layers is not None or s.dense:
                return s.teacher.forward_features(x, s.layers or (), qkv=s.qkv, dense=s.dense)
            return s.teacher.encode_image(x)

    def _replayed(
        self, cache: TeacherCache, x: torch.Tensor, index: torch.Tensor, gen: torch.Generator, device: torch.device
    ) -> StepViews:
        stored = torch.randint(cache.views, (len(index),), generator=gen)
        c = cache.lookup(index, stored, device)
        # With the clean teacher view the cache holds one clean view; the student's view is drawn afresh.
        params = c.views if self.same_view else self.augmenter.sample(len(index), gen)
        mask = self.augmenter.sample_mask(len(index), gen)
        ok = c.ok
        if not bool(ok.all()):  # rows of images the teacher could not read
            keep = ok.to(device)
            x, index, params = x[keep], index[ok], _select_params(params, ok)
            mask = mask[ok] if mask is not None else None
            target = map_tensors(lambda a: a[keep], c.target)
        else:
            target = c.target
        return StepViews(self.augmenter.apply(x, params, self.student_norm, mask), target, index)


def _select_params(p: ViewParams, ok: torch.Tensor) -> ViewParams:
    return ViewParams(p.color_on[ok], p.color[ok], p.geometry_on[ok], p.theta[ok])
