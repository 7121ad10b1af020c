"""Zero-shot tags from an image embedding and the cached text-prompt bank.

Cosine similarity × logit scale, softmax within each label group, a per-label threshold,
and optional temporal smoothing (EMA over frames with on/off hysteresis) so tags don't
flicker. Negative (background) labels take part in the softmax but never become tags.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrofit_agent.contract.bundle import BankSpec, TextBank
from retrofit_agent.contract.errors import ConfigError
from retrofit_agent.contract.zeroshot import group_softmax, zero_shot_logits
from retrofit_agent.daemon.config import LabelsConfig


@dataclass(frozen=True)
class Tag:
    group: str
    label: str
    score: float

    @property
    def key(self) -> str:
        return f"{self.group}.{self.label}"


@dataclass(frozen=True)
class TagChange:
    tag: Tag
    on: bool


@dataclass(frozen=True)
class LabelResult:
    tags: list[Tag]  # tags that are on after this frame
    tops: list[Tag]  # each group's most probable label
    changes: list[TagChange]  # tags that turned on or off on this frame


class ZeroShotLabeler:
    """Stateful (when smoothing) labeller for one camera stream."""

    def __init__(self, bank: TextBank, spec: BankSpec, cfg: LabelsConfig) -> None:
        self._emb = bank.embeddings
        self._scale = float(spec.logit_scale)
        self._keys = bank.keys
        self._groups: list[tuple[str, np.ndarray]] = []
        thresholds: list[float] = []
        negative: list[bool] = []
        for g in spec.groups:
            start = len(thresholds)
            for lab in g.labels:
                thresholds.append(lab.threshold)
                negative.append(lab.negative)
            self._groups.append((g.name, np.arange(start, len(thresholds))))
        unknown = sorted(set(cfg.thresholds) - set(self._keys))
        if unknown:
            raise ConfigError(
                f"config error: labels.thresholds: unknown label {unknown[0]!r} (known: group.label from the bundle)"
            )
        for key, value in cfg.thresholds.items():
            thresholds[self._keys.index(key)] = value
        self._on_at = np.asarray(thresholds, dtype=np.float32)
        self._off_at = self._on_at - np.float32(cfg.hysteresis)
        self._taggable = ~np.asarray(negative, dtype=bool)
        self._alpha = np.float32(cfg.smoothing_alpha)
        self._probs: np.ndarray | None = None
        self._on = np.zeros(len(self._keys), dtype=bool)

    def probabilities(self, embedding: np.ndarray) -> np.ndarray:
        """Per-label probability, softmax-normalised within each group (stateless).

        The definition is shared with training (``contract.zeroshot``), so the student is
        distilled on exactly the distributions the camera reports.
        """
        logits = zero_shot_logits(embedding, self._emb, self._scale)
        return group_softmax(logits, [idx for _, idx in self._groups])

    def reset(self) -> None:
        self._probs = None
        self._on[:] = False

    def __call__(self, embedding: np.ndarray) -> LabelResult:
        p = self.probabilities(embedding)
        if self._probs is None or self._alpha >= 1.0:
            self._probs = p
        else:
            self._probs = self._alpha * p + (1.0 - self._alpha) * self._probs
        p = self._probs
        on = np.where(self._on, p >= self._off_at, p >= self._on_at) & self._taggable
        changed = np.flatnonzero(on != self._on)
        self._on = on
        tags = [self._tag(int(i), p) for i in np.flatnonzero(on)]
        tops = [self._tag(int(idx[np.argmax(p[idx])]), p) for _, idx in self._groups]
        changes = [TagChange(self._tag(int(i), p), bool(on[i])) for i in changed]
        return LabelResult(tags=tags, tops=tops, changes=changes)

    def _tag(self, i: int, p: np.ndarray) -> Tag:
        group, _, label = self._keys[i].partition(".")
        return Tag(group=group, label=label, score=round(float(p[i]), 4))
