"""The int8 quality gate: compare quantized with float on held-out images.

Two figures: mean cosine between the float and int8 embeddings, and zero-shot top-1
agreement over the text bank (per label group, averaged). Models with per-cell output
(``export --dense``) also report the mean cosine of their cells, per cell; it is shown,
not gated. Below the thresholds the bundle
is refused unless forced, because a silently degraded model on a fleet is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrofit_agent.contract.bundle import TextBank
from retrofit_agent.contract.embedder import Embedder
from retrofit_agent.contract.errors import ConfigError, RetrofitError


class QualityGateError(RetrofitError):
    """The quantized model is too far from the float one."""


@dataclass(frozen=True)
class GateReport:
    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    images: int
    passed: bool
    cell_cosine: float | None = None  # mean over images and cells; None without cells
    cell_min_cosine: float | None = None

    def line(self) -> str:
        cells = ""
        if self.cell_cosine is not None:
            cells = f", cells mean cosine {self.cell_cosine:.4f} (min {self.cell_min_cosine:.4f})"
        return (
            f"int8 vs fp32 on {self.images} held-out images: mean cosine {self.mean_cosine:.4f} "
            f"(min {self.min_cosine:.4f}), zero-shot top-1 agreement {self.top1_agreement:.1%}{cells}"
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
    ea, eb = Embedder.from_onnx(fp32), Embedder.from_onnx(int8)
    a, b = ea.embed_many(x), eb.embed_many(x)
    cos = (a * b).sum(axis=1)
    agree = float((group_top1(a, bank) == group_top1(b, bank)).mean())
    passed = float(cos.mean()) >= min_cosine and agree >= min_agreement
    cell_cos = None
    if ea.has_cells and eb.has_cells:
        cell_cos = cell_cosines(ea, eb, x)
    return GateReport(
        float(cos.mean()),
        float(cos.min()),
        agree,
        len(x),
        passed,
        None if cell_cos is None else float(cell_cos.mean()),
        None if cell_cos is None else float(cell_cos.min()),
    )


def cell_cosines(a: Embedder, b: Embedder, x: np.ndarray) -> np.ndarray:
    """(N, H', W') cosine between two dense models' cells (each re-normalised: int8 cells drift off unit length)."""
    ca, cb = onnx_cells(a, x)[1], onnx_cells(b, x)[1]
    ca = ca / np.maximum(np.linalg.norm(ca, axis=-1, keepdims=True), 1e-12)
    cb = cb / np.maximum(np.linalg.norm(cb, axis=-1, keepdims=True), 1e-12)
    cos: np.ndarray = (ca * cb).sum(-1)
    return cos


def enforce(report: GateReport, min_cosine: float, min_agreement: float, force: bool) -> None:
    if report.passed or force:
        return
    raise QualityGateError(
        f"quality gate refused the int8 model: {report.line()}; need cosine >= {min_cosine} and agreement >= "
        f"{min_agreement:.0%}. Try excluding sensitive nodes (--exclude first_conv,se,head), more or more "
        "representative calibration images, or --force to write it anyway"
    )


def onnx_cells(embedder: Embedder, x: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) embeddings and (N, H', W', D) cells of a dense model, ``batch`` images per run."""
    if embedder.spec.dense is None:
        raise ConfigError(f"{embedder.spec.file}: the model has no cell output (export it with --dense)")
    names = [embedder.spec.output.name, embedder.spec.dense.name]
    runs = [embedder.session.run(names, {embedder.spec.input.name: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])
