"""The camera's zero-shot scores in torch: the twin of ``retrofit_agent.contract.zeroshot``.

The daemon's labeller computes ``logit_scale × cosine`` to every bank row and a softmax
within each label group. Training computes the same thing here (differentiably, in
float32 whatever autocast is active) so the affinity loss and the held-out agreement
measure what the camera reports; a test holds the two definitions equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from retrofit_agent.contract.zeroshot import group_index


def fp32(device: torch.device):
    """Autocast off: the numbers inside are computed in float32.

    Softmaxes and KL divergences of bf16 logits are 20-100 % off near convergence, where
    the student's and the teacher's distributions differ in the third digit.
    """
    return torch.autocast(device.type, enabled=False)


@dataclass(frozen=True)
class ZeroShotBank:
    """Text embeddings, one unit row per label, and the label groups the camera softmaxes in."""

    embeddings: torch.Tensor  # (L, D) float32, never requires grad
    groups: tuple[torch.Tensor, ...]  # row indices of each group
    keys: tuple[str, ...]  # 'group.label' per row

    @classmethod
    def build(cls, embeddings: torch.Tensor, group_names: Sequence[str], labels: Sequence[str]) -> ZeroShotBank:
        dev = embeddings.device
        groups = tuple(torch.from_numpy(idx).to(dev) for idx in group_index(group_names))
        return cls(embeddings.detach().float(), groups, tuple(f"{g}.{l}" for g, l in zip(group_names, labels)))

    def flat(self) -> ZeroShotBank:
        """The same rows as one group: one softmax over every label (the earlier recipe)."""
        everything = torch.arange(len(self.keys), device=self.embeddings.device)
        return ZeroShotBank(self.embeddings, (everything,), self.keys)

    def to(self, device: torch.device) -> ZeroShotBank:
        return ZeroShotBank(self.embeddings.to(device), tuple(g.to(device) for g in self.groups), self.keys)

    def logits(self, embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """``logit_scale`` × cosine to every row, in float32 even under autocast: (B, D) → (B, L)."""
        return zero_shot_logits(embeddings, self.embeddings, logit_scale)


def zero_shot_logits(embeddings: torch.Tensor, bank: torch.Tensor, logit_scale: float) -> torch.Tensor:
    with fp32(embeddings.device):
        return logit_scale * (embeddings.float() @ bank.float().T)


def group_log_softmax(logits: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of :func:`retrofit_agent.contract.zeroshot.group_softmax`, over the last axis.

    Columns outside every group get -inf (probability 0).
    """
    with fp32(logits.device):
        z = logits.float()
        out = torch.full_like(z, float("-inf"))
        for idx in groups:
            out[..., idx] = torch.log_softmax(z[..., idx], dim=-1)
        return out


def group_argmax(logits: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each group's winning row index: (B, L) → (B, G); the camera's top label per group."""
    return torch.stack([idx[logits[..., idx].argmax(-1)] for idx in groups], dim=-1)
