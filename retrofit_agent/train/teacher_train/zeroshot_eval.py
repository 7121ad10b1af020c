"""Held-out zero-shot evaluation of a world teacher, the way the camera will use it.

The bank is built exactly as ``retrofit-model prompts`` builds it (every template x phrase
of a label through the text tower, normalised mean: :func:`~retrofit_agent.train.bank.encode_prompt_set`);
image embeddings are scored against it and softmax-normalised within each group
(:mod:`retrofit_agent.contract.zeroshot`). Per group: top-1 against the world's ground
truth (pictures whose truth is null are skipped), a confusion table, and each label's
one-vs-rest AUROC of its in-group probability (:func:`~retrofit_agent.train.evaluate.auroc`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from retrofit_agent.contract.prompts import PromptSet
from retrofit_agent.contract.zeroshot import group_index, group_softmax, zero_shot_logits
from retrofit_agent.train.bank import encode_prompt_set
from retrofit_agent.train.evaluate import auroc
from retrofit_agent.train.teacher_train.stream import HeldOut


class TextEncoder(Protocol):
    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


class LiveText:
    """A training model's text tower behind the :class:`~retrofit_agent.train.teacher.Teacher` interface the bank uses."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts)).float(), dim=-1)


@torch.no_grad()
def embed_images(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 128) -> np.ndarray:
    out = [
        torch.nn.functional.normalize(encode(images[i : i + batch]).float(), dim=-1)
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).cpu().numpy()


def zero_shot_report(
    embeddings: np.ndarray, text: TextEncoder, logit_scale: float, prompts: PromptSet, held: HeldOut
) -> dict[str, Any]:
    """Per-group top-1, confusion and per-label AUROC of ``embeddings`` (N, D) on ``held``."""
    bank, groups, labels = encode_prompt_set(text, prompts)  # type: ignore[arg-type]  # duck-typed Teacher
    probs = group_softmax(zero_shot_logits(embeddings, bank, logit_scale), group_index(groups))
    report: dict[str, Any] = {"scenes": len(held.labels), "groups": {}}
    for rows in group_index(groups):
        g = groups[rows[0]]
        names = [labels[r] for r in rows]
        keep = [i for i, t in enumerate(held.labels) if t.get(g) in names]
        truth = np.array([held.labels[i][g] for i in keep])
        p = probs[keep][:, rows]
        pred = np.array(names)[p.argmax(axis=1)] if keep else np.array([])
        classes = {}
        for c, name in enumerate(names):
            pos = truth == name
            classes[name] = {
                "auroc": auroc(p[:, c], pos) if keep else float("nan"),
                "positives": int(pos.sum()),
                "negatives": int((~pos).sum()),
            }
        report["groups"][g] = {
            "top1": float((pred == truth).mean()) if keep else float("nan"),
            "scored": len(keep),
            "skipped_null": len(held.labels) - len(keep),
            "classes": classes,
            "confusion": {t: {q: int(((truth == t) & (pred == q)).sum()) for q in names} for t in names},
        }
    tops = [r["top1"] for r in report["groups"].values() if not np.isnan(r["top1"])]
    report["mean_top1"] = float(np.mean(tops)) if tops else float("nan")
    report["min_top1"] = float(np.min(tops)) if tops else float("nan")
    return report


def top1_by_group(report: dict[str, Any]) -> dict[str, float]:
    return {g: round(r["top1"], 4) for g, r in report["groups"].items()}


def report_table(report: dict[str, Any]) -> str:
    """Per-group top-1 and each label's AUROC, one group a line."""
    lines = [
        f"{'group':<14}{'scored':>7}{'top-1':>8}  AUROC per label",
    ]
    for g, r in report["groups"].items():
        aur = "  ".join(f"{n}={c['auroc']:.3f}" for n, c in r["classes"].items())
        lines.append(f"{g:<14}{r['scored']:>7}{r['top1']:>8.3f}  {aur}")
    lines.append(
        f"{'mean':<14}{'':>7}{report['mean_top1']:>8.3f}  (min {report['min_top1']:.3f}; {report['scenes']} held-out scenes)"
    )
    return "\n".join(lines)
