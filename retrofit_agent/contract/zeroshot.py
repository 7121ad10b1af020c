"""Zero-shot scores as the camera computes them: one definition for both halves.

An image embedding is compared with the text bank (cosine × the bank's logit scale), and
the logits are softmax-normalised **within each label group** ("weather", "road", ...),
never across the whole bank: a group is one question with one answer. The daemon's
labeller uses this module directly; the toolchain's affinity loss and held-out agreement
use a torch twin (``retrofit_agent.train.zeroshot``) that a test holds equal to it.

Pure numpy, no state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def group_index(groups: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each group, in order of first appearance.

    ``groups`` names the group of every bank row (``TextBank.groups``); rows of one group
    need not be contiguous.
    """
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(g, []).append(i)
    return [np.asarray(rows, dtype=np.int64) for rows in order.values()]


def zero_shot_logits(embedding: np.ndarray, bank: np.ndarray, logit_scale: float) -> np.ndarray:
    """``logit_scale`` × cosine similarity to each bank row: (D,) → (L,), (B, D) → (B, L).

    Both operands are unit vectors, so the dot product is the cosine. Computed in float32.
    """
    e = np.asarray(embedding, dtype=np.float32)
    return np.float32(logit_scale) * (e @ np.asarray(bank, dtype=np.float32).T)


def group_softmax(logits: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Softmax over the last axis within each group of columns; every group sums to 1.

    Columns that belong to no group are left at 0.
    """
    z = np.asarray(logits, dtype=np.float32)
    probs = np.zeros_like(z)
    for idx in groups:
        g = z[..., idx]
        e = np.exp(g - g.max(axis=-1, keepdims=True))  # shift by the group's max: no overflow
        probs[..., idx] = e / e.sum(axis=-1, keepdims=True)
    return probs


def group_argmax(logits: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Each group's winning column (a bank row index): (..., L) → (..., G).

    The softmax, the temperature and the logit scale never change a group's winner, so
    this is the camera's top label per group.
    """
    z = np.asarray(logits)
    return np.stack([idx[np.argmax(z[..., idx], axis=-1)] for idx in groups], axis=-1)
