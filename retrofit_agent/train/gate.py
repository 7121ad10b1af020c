"""The int8 quality gate: compare quantized with float on held-out images.

Two figures: mean cosine between the float and int8 embeddings, and zero-shot top-1
agreement over the text bank (per label group, averaged). Below the thresholds the bundle
is refused unless forced, because a silently degraded model on a fleet is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrofit_agent.contract.bundle import TextBank
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import RetrofitError


class QualityGateError(RetrofitError):
    """The quantized model is too far from the float one."""


@dataclass(frozen=True)
class GateReport:
    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    images: int
    passed: bool

    def line(self) -> str:
        return (
            f"int8 vs fp32 on {self.images} held-out images: mean cosine {self.mean_cosine:.4f} "
            f"(min {self.min_cosine:.4f}), zero-shot top-1 agreement {self.top1_agreement:.1%}"
        )


def group_top1(emb: np.ndarray, bank: TextBank) -> np.ndarray:
    """(images, groups) index of the best label within each group."""
    sims = emb @ bank.embeddings.T
    groups = list(dict.fromkeys(bank.groups))
    out = np.empty((emb.shape[0], len(groups)), dtype=np.int64)
    for j, g in enumerate(groups):
        idx = np.array([i for i, gg in enumerate(bank.groups) if gg == g])
        out[:, j] = idx[np.argmax(sims[:, idx], axis=1)]
    return out


def compare(
    fp32: Path,
    int8: Path,
    x: np.ndarray,
    bank: TextBank,
    min_cosine: float = 0.98,
    min_agreement: float = 0.95,
) -> GateReport:
    """Both models through the daemon's own Embedder (session options, manifest checks)."""
    a, b = Embedder.from_onnx(fp32).embed_many(x), Embedder.from_onnx(int8).embed_many(x)
    cos = (a * b).sum(axis=1)
    agree = float((group_top1(a, bank) == group_top1(b, bank)).mean())
    passed = float(cos.mean()) >= min_cosine and agree >= min_agreement
    return GateReport(float(cos.mean()), float(cos.min()), agree, len(x), passed)


def enforce(report: GateReport, min_cosine: float, min_agreement: float, force: bool) -> None:
    if report.passed or force:
        return
    raise QualityGateError(
        f"quality gate refused the int8 model: {report.line()}; need cosine >= {min_cosine} and agreement >= "
        f"{min_agreement:.0%}. Try excluding sensitive nodes (--exclude first_conv,se,head), more or more "
        "representative calibration images, or --force to write it anyway"
    )
